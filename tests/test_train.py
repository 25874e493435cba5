"""Real training runs on a tiny Llama: every method, the invariances, resume, outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from peftrun.cpu import matmul as cpu_matmul
from peftrun.errors import UserError
from peftrun.recipe.load import load_recipe
from peftrun.train.loop import RunResult, train


def run(recipe_path: Path, *overrides: str) -> RunResult:
    return train(load_recipe(recipe_path, list(overrides)))


def adapter_tensors(final: Path) -> dict[str, torch.Tensor]:
    return load_file(final / "adapter_model.safetensors")


METHODS: list[tuple[str, dict[str, Any]]] = [
    ("lora", {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}),
    ("dora", {"kind": "lora", "r": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}),
    (
        "rslora+modules_to_save",
        {
            "kind": "lora",
            "r": 4,
            "use_rslora": True,
            "target_modules": ["q_proj"],
            "modules_to_save": ["lm_head"],
        },
    ),
    (
        "pissa",
        {
            "kind": "lora",
            "r": 4,
            "init_lora_weights": "pissa_niter_2",
            "target_modules": ["q_proj", "v_proj"],
        },
    ),
    ("ia3", {"kind": "ia3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    ("prefix_tuning", {"kind": "prefix_tuning", "num_virtual_tokens": 4}),
    ("prompt_tuning", {"kind": "prompt_tuning", "num_virtual_tokens": 4}),
    ("loha", {"kind": "loha", "r": 4, "target_modules": ["q_proj", "v_proj"]}),
    ("lokr", {"kind": "lokr", "r": 4, "target_modules": ["q_proj", "v_proj"]}),
    ("oft", {"kind": "oft", "r": 0, "oft_block_size": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("vera", {"kind": "vera", "r": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("adalora", {"kind": "adalora", "init_r": 6, "target_r": 2, "target_modules": ["q_proj", "v_proj"]}),
]


@pytest.mark.parametrize(("name", "method"), METHODS, ids=[m[0] for m in METHODS])
def test_each_adapter_trains_and_saves_a_loadable_verified_adapter(
    write_recipe: Any, tiny_llama: Path, name: str, method: dict[str, Any]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run(write_recipe(method={**method, "_replace": True}), "train.max_steps=3")
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    final = result.final_dir
    assert final is not None and (final / "adapter_config.json").is_file()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_llama
    )
    saved = adapter_tensors(final)
    nonzero = [bool(t.any()) for t in saved.values()]
    # AdaLoRA may prune a whole module to rank 0; every other adapter moves every tensor.
    assert saved and (any(nonzero) if method["kind"] == "adalora" else all(nonzero))
    # What a user does with it, with no peftrun involved.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), final)
    peft_type: Any = model.peft_config["default"].peft_type
    assert peft_type.value.lower() == method["kind"]


def test_packed_training_takes_the_step_unpacked_training_takes(write_recipe: Any) -> None:
    """One optimizer step over all 12 samples: packed into fewer sequences or padded one per row, the
    token-weighted loss and the trained adapter are the same (no attention, position or label crosses
    a sample boundary)."""
    results = {}
    for packing, micro in ((False, 12), (True, 2)):  # the 12 samples fill 2 packed rows of 1024
        recipe = write_recipe(
            data={"packing": packing, "max_seq_len": 1024},
            train={"max_steps": 1, "micro_batch_size": micro, "global_batch_size": micro, "lr": 1e-2},
        )
        results[packing] = run(recipe, f"output_dir={recipe.parent / f'packing-{packing}'}")
    unpacked, packed = results[False], results[True]
    rows = json.loads((packed.output_dir / "manifest.json").read_text())
    assert packed.losses[0] == pytest.approx(unpacked.losses[0], rel=1e-5)
    assert packed.final_dir is not None and unpacked.final_dir is not None
    got, expected = adapter_tensors(packed.final_dir), adapter_tensors(unpacked.final_dir)
    # Adam's first step moves each weight by ~lr * g/|g|: a weight whose gradient is ~0 moves by an
    # amount its gradient's last bits decide (measured: 1 of 128 elements off by 5e-5, lr 1e-2); the
    # gradients themselves are compared tightly in tests/data/test_packing.py.
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)
    assert rows["data"]["packed_rows"] == 2, "the step above must hold every packed row"


def test_full_fine_tune_saves_a_transformers_checkpoint(write_recipe: Any, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = run(write_recipe(method={"kind": "full", "_replace": True}))
    assert result.final_dir is not None
    before = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.final_dir).state_dict()
    assert set(before) == set(after)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("proj.weight"))


def test_frozen_layers_stay_bit_identical(write_recipe: Any, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    method = {"kind": "frozen", "freeze": ["all"], "train": ["layers[-1:]", "lm_head.*"], "_replace": True}
    result = run(write_recipe(method=method))
    assert result.final_dir is not None
    before = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.final_dir).state_dict()
    trained = [k for k in before if k.startswith("model.layers.1.") or k.startswith("lm_head.")]
    frozen = [k for k in before if k not in trained]
    assert trained and frozen
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("proj.weight"))


def test_qlora_on_a_4bit_nf4_base_on_cpu(write_recipe: Any) -> None:
    pytest.importorskip("bitsandbytes")
    quant = {"bits": 4, "quant_type": "nf4", "compute_dtype": "fp32"}
    result = run(write_recipe(model={"quantization": quant}))
    assert result.final_dir is not None and all(torch.isfinite(torch.tensor(result.losses)))
    cfg = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"


def test_accumulation_is_token_weighted(write_recipe: Any, tmp_path: Path) -> None:
    """micro 2 x accumulation 2 == micro 4 x accumulation 1: same losses and same adapter."""
    recipe = write_recipe(train={"max_steps": 3, "lr": 1e-2})
    a = run(recipe, "train.micro_batch_size=2", "train.grad_accum_steps=2", f"output_dir={tmp_path / 'a'}")
    b = run(recipe, "train.micro_batch_size=4", "train.grad_accum_steps=1", f"output_dir={tmp_path / 'b'}")
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=0)
    assert a.final_dir and b.final_dir
    ta, tb = adapter_tensors(a.final_dir), adapter_tensors(b.final_dir)
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_resumed_run_continues_exactly(write_recipe: Any, tmp_path: Path, packing: bool) -> None:
    """Stop at step 3, resume to 6: steps 4-6 have the uninterrupted run's losses (dropout on, so
    the dropout masks must continue too). Packed, the 12 samples fill 4 rows of 512 tokens, so
    the 6 steps of one row also cross an epoch boundary.

    The schedule is constant because max_steps=3 would also shorten a decaying schedule.
    """
    recipe = write_recipe(
        method={"dropout": 0.1},
        data={"packing": packing, "max_seq_len": 512 if packing else 256},
        train={"max_steps": 6, "lr": 1e-2, "micro_batch_size": 1 if packing else 2, "scheduler": "constant"},
        checkpoint={"every_steps": 3, "at_end": True},
    )
    full = run(recipe, f"output_dir={tmp_path / 'full'}")
    first = run(recipe, f"output_dir={tmp_path / 'split'}", "train.max_steps=3")
    second = run(recipe, f"output_dir={tmp_path / 'split'}", "train.resume=auto")
    assert first.steps == 3 and second.steps == 6 and len(second.losses) == 3
    torch.testing.assert_close(
        torch.tensor(first.losses + second.losses), torch.tensor(full.losses), rtol=1e-5, atol=0
    )
    assert full.final_dir and second.final_dir
    ta, tb = adapter_tensors(full.final_dir), adapter_tensors(second.final_dir)
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-5, atol=1e-7)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [s for s in steps if s] == sorted(s for s in steps if s), "metrics.jsonl tells one history"


def test_a_run_resumed_from_the_end_of_an_epoch_goes_on(write_recipe: Any, tmp_path: Path) -> None:
    """The checkpoint of step 6 is taken after the epoch's last batch (12 samples, micro 2): the resumed
    run skips the whole epoch, finds nothing left in it, and goes on into the next one."""
    recipe = write_recipe(train={"max_steps": 6}, checkpoint={"at_end": True})
    run(recipe, f"output_dir={tmp_path / 'run'}")
    resumed = run(recipe, f"output_dir={tmp_path / 'run'}", "train.resume=auto", "train.max_steps=8")
    assert resumed.steps == 8 and len(resumed.losses) == 2


def test_run_directory_describes_itself(write_recipe: Any) -> None:
    recipe = write_recipe(
        data={"val_fraction": 0.25},
        eval={"every_steps": 2},
        logging={"plot": True, "report_to": ["tensorboard"]},
        checkpoint={"every_steps": 1, "keep_last": 2, "at_end": True},
        train={"max_steps": 4},
    )
    result = run(recipe)
    out = result.output_dir
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4], (
        "no second eval of the same weights at the end"
    )
    assert all(r["eval_perplexity"] > 1 for r in records if "eval_loss" in r)
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000003", "step-00000004"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 4 and "torch" in manifest["versions"] and "peft" in manifest["versions"]
    assert manifest["matmul"] == ("onednn" if cpu_matmul.resolve("auto") else "torch")
    assert load_recipe(out / "resolved_recipe.yaml").train.max_steps == 4
    assert (out / "final" / "tokenizer.json").is_file()


def test_max_steps_override_caps_the_run(write_recipe: Any) -> None:
    result = run(write_recipe(train={"max_steps": None, "epochs": 50}), "train.max_steps=2")
    assert result.steps == 2 and len(result.losses) == 2


def test_too_little_data_for_one_step_is_a_clear_error(write_recipe: Any) -> None:

    with pytest.raises(UserError, match="fewer than one optimizer step needs"):
        run(write_recipe(train={"micro_batch_size": 4, "grad_accum_steps": 8}))


def test_eos_is_learned_even_when_pad_is_eos(write_recipe: Any, tiny_llama: Path, tmp_path: Path) -> None:
    """The classic bug: pad == eos, padding masked by id, so EOS is never a target and the model rambles."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "pad_is_eos"
    shutil.copytree(tiny_llama, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "two.jsonl"
    data.write_text(
        '{"instruction": "Say hi.", "input": "", "output": "hi"}\n{"instruction": "Say a long greeting please.", "input": "", "output": "hello there my friend"}\n'
    )

    recipe = write_recipe(
        model={"name_or_path": str(model_dir)},
        data={"path": str(data), "prompt_template": "plain"},
        train={"max_steps": 60, "micro_batch_size": 2, "lr": 5e-3, "scheduler": "constant"},
        method={"r": 8, "alpha": 16},
    )
    result = run(recipe)
    assert result.final_dir is not None
    assert result.losses[-1] < 0.05 * result.losses[0], result.losses
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), result.final_dir
    ).eval()
    prompt = [tokenizer.bos_token_id, *tokenizer("Say hi.\n", add_special_tokens=False)["input_ids"]]
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    generated = out[0, len(prompt) :].tolist()
    assert tokenizer.eos_token_id in generated, tokenizer.decode(generated)
    assert tokenizer.decode(generated[: generated.index(tokenizer.eos_token_id)]) == "hi"


@pytest.mark.parametrize(
    "override",
    [
        "train.optimizer=adamw_8bit",
        "train.mixed_precision=bf16",
        "model.gradient_checkpointing=true",
        "model.dtype=bf16",
    ],
)
def test_training_options_train_and_verify(write_recipe: Any, override: str) -> None:
    """Each option trains and its save passes verification (bf16 autocast once broke the logit check)."""
    if "8bit" in override:
        pytest.importorskip("bitsandbytes")
    result = run(write_recipe(), override, "train.max_steps=2")
    assert result.final_dir is not None and len(result.losses) == 2
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_a_failed_save_check_keeps_what_was_trained_in_a_checkpoint(write_recipe: Any) -> None:
    """A learning rate below fp32's smallest step leaves every LoRA B at zero: a real save that fails
    its check. The final artefact is not published; the run's weights are kept in a checkpoint."""
    from peftrun.train.checkpoint import complete_checkpoints

    recipe = write_recipe()  # checkpoint.at_end is off: the failed check writes the checkpoint itself
    with pytest.raises(UserError, match=r"is all zeros; the trained weights are kept in .*step-00000003"):
        run(recipe, "train.lr=1e-46")
    out = load_recipe(recipe).output_dir
    assert not (out / "final").exists()
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000003"]
