"""peftrun merge / export on real runs and real sharded checkpoints.

The strongest check is the one a user makes: the merged directory, loaded by plain transformers in a
fresh process with neither peft nor peftrun imported, gives the logits of base + adapter through peft.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import peft  # imported at collection: its one-time import cost is not any test's
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from peftrun.cli.main import main
from peftrun.errors import UserError
from peftrun.merge import MergeOptions, merge
from peftrun.merge.combine import combine_adapters
from peftrun.merge.export import export_adapter, inputs_for
from peftrun.merge.stream import SAFE_INDEX
from peftrun.merge.verdict import MergedFiles, MergeVerificationError, light_verdict, probe_batch
from peftrun.recipe.load import load_recipe
from peftrun.run.safe_paths import OUTPUT_MARKER
from peftrun.run.verify import ADAPTER_WEIGHTS
from peftrun.train.loop import train

SHARD = "60KB"  # the tiny Llama (~0.5 MB in fp32) in about ten shards


def logits(model: Any, vocab_size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**probe_batch(vocab_size, seed=3)).logits.float()


def merged_files(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def randomized(model: Any, seed: int) -> Any:
    """Adapter weights away from their init (B != 0, DoRA magnitudes moved), as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """The tiny Llama saved in several safetensors shards (+ index), like any real checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded_llama")
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(out, max_shard_size=SHARD)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    assert (out / SAFE_INDEX).is_file()
    return out


RUNS: dict[str, dict[str, Any]] = {
    "lora": {"method": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}},
    "dora+rslora+modules_to_save": {
        "method": {
            "kind": "lora",
            "r": 4,
            "alpha": 16,
            "use_dora": True,
            "use_rslora": True,
            "target_modules": ["v_proj", "down_proj"],
            "modules_to_save": ["lm_head"],
        }
    },
    "qlora": {
        "method": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "model": {"quantization": {"bits": 4, "quant_type": "nf4", "compute_dtype": "fp32"}},
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, sharded_llama: Path, chat_file: Path) -> dict[str, Path]:
    """Real peftrun runs (1 step each, chat data with a built-in template) on the sharded base."""
    root = tmp_path_factory.mktemp("runs")
    found = {}
    for name, sections in RUNS.items():
        recipe: dict[str, Any] = {
            "output_dir": str(root / name),
            "model": {"name_or_path": str(sharded_llama), **sections.get("model", {})},
            "method": sections["method"],
            "data": {"path": str(chat_file), "format": "chat", "chat_template": "chatml", "max_seq_len": 128},
            "train": {"max_steps": 1, "micro_batch_size": 2, "lr": 1e-2, "max_grad_norm": None},
            "logging": {"report_to": [], "progress_bar": False, "plot": False},
            "checkpoint": {"at_end": False},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        found[name] = train(load_recipe(path)).output_dir
        _reset_accelerate()
    return found


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def merged_runs(runs: dict[str, Path]) -> dict[str, Path]:
    # The full verdict on two of them; the test below checks all three end to end anyway.
    merged = {}
    for name, run in runs.items():
        options = MergeOptions(
            dtype="fp32", max_shard_size=SHARD, check="light" if "dora" in name else "full"
        )
        merged[name] = merge(inputs_for(str(run), None), run / "merged", options).out_dir
    return merged


FRESH_PROCESS = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    gen = GenerationConfig.from_pretrained(path)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    mask = torch.ones_like(ids); mask[1, :4] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.save(logits, path + "/fresh_logits.pt")
    out[name] = {"eos": gen.eos_token_id, "pad": gen.pad_token_id, "tok_eos": tok.eos_token_id,
                 "tok_pad": tok.pad_token_id, "template": tok.chat_template}
assert not any(m.split(".")[0] in ("peft", "peftrun") for m in sys.modules), "peft or peftrun was imported"
print(json.dumps(out))
"""


@pytest.mark.slow  # three real runs and a fresh interpreter
def test_merged_runs_load_without_peft_and_give_the_adapter_models_logits(
    runs: dict[str, Path], merged_runs: dict[str, Path], sharded_llama: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftrun.data.templates import CHAT_TEMPLATES
    from peftrun.model.load import load_model

    paths = {name: str(path) for name, path in merged_runs.items()}
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps(paths)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = json.loads(done.stdout.strip().splitlines()[-1])
    for name, run in runs.items():
        merged = merged_runs[name]
        assert (merged / SAFE_INDEX).is_file() and len(list(merged.glob("model-*.safetensors"))) > 1
        recipe = load_recipe(run / "resolved_recipe.yaml")
        # The reference is the model that was trained: for QLoRA the 4-bit base + adapter.
        base = (
            load_model(recipe.model, "causal_lm")
            if name == "qlora"
            else AutoModelForCausalLM.from_pretrained(sharded_llama)
        )
        expected = logits(PeftModel.from_pretrained(base, run / "final"), base.config.vocab_size)
        got = torch.load(merged / "fresh_logits.pt")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        # ... and not trivially: the adapter changed the logits.
        assert (
            float(
                (
                    expected
                    - logits(AutoModelForCausalLM.from_pretrained(sharded_llama), base.config.vocab_size)
                )
                .abs()
                .max()
            )
            > 1e-3
        )
        info = files[name]
        assert info["eos"] == info["tok_eos"] == 2 and info["pad"] == info["tok_pad"] == 3
        assert info["template"] == CHAT_TEMPLATES["chatml"]  # the template the run trained with


def test_streamed_merge_equals_peft_merge_and_unload(
    tmp_path: Path, sharded_llama: Path, tiny_gpt2: Path
) -> None:
    """Tensor by tensor, for LoRA, DoRA, rsLoRA with patterns, embeddings, modules_to_save and GPT-2's Conv1D."""
    from transformers import AutoModelForCausalLM

    cases = {
        "llama": (
            sharded_llama,
            peft.LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "o_proj", "gate_proj", "embed_tokens"],
                rank_pattern={"gate_proj": 2},
                alpha_pattern={"o_proj": 3},
                modules_to_save=["lm_head"],
                init_lora_weights=False,
            ),
        ),
        "dora+rslora": (
            sharded_llama,
            peft.LoraConfig(r=4, use_dora=True, use_rslora=True, target_modules=["k_proj", "down_proj"]),
        ),
        "gpt2": (
            tiny_gpt2,
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        ),
    }
    for name, (base_dir, config) in cases.items():
        torch.manual_seed(0)
        model = randomized(
            peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config), seed=1
        )
        model.save_pretrained(tmp_path / name / "adapter")
        expected = model.merge_and_unload().state_dict()
        out = merge(
            inputs_for(str(tmp_path / name / "adapter"), str(base_dir)),
            tmp_path / name / "merged",
            MergeOptions(dtype="fp32", max_shard_size=SHARD, check="light"),
        )
        assert out.streamed and out.shards > 1
        got = merged_files(out.out_dir)
        shared = set(got) & set(expected)
        assert shared == set(got), (
            f"{name}: merged names {sorted(set(got) - set(expected))[:3]} not in peft's"
        )
        assert not set(expected) - set(got) - {"lm_head.weight"}  # GPT-2's head is tied, saved once
        for key in shared:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=f"{name}: {key}")


def test_light_verdict_catches_a_wrong_merged_weight(tmp_path: Path, sharded_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    from peftrun.merge import meta_model
    from peftrun.merge.lora import MergePlan, plan

    torch.manual_seed(0)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(sharded_llama), peft.LoraConfig(r=4, target_modules=["q_proj"])
    )
    randomized(model, seed=2).save_pretrained(tmp_path / "adapter")
    inputs = inputs_for(str(tmp_path / "adapter"), str(sharded_llama))
    out = merge(inputs, tmp_path / "merged", MergeOptions(check="light")).out_dir
    merge_plan = plan(
        inputs.adapter_config, load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS), meta_model(inputs)
    )
    assert isinstance(merge_plan, MergePlan)
    name = "model.layers.1.self_attn.q_proj.weight"
    files = MergedFiles(out)
    shard = out / files.weight_map[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name] * 1.01  # a 1% error in one merged layer
    save_file(tensors, shard, metadata={"format": "pt"})

    def check() -> Any:
        return light_verdict(
            merge_plan,
            peft.PeftConfig.from_pretrained(str(tmp_path / "adapter")),
            MergedFiles(sharded_llama),
            MergedFiles(out),
            lambda n, t: t,
            torch.float32,
            1e-4,
        ).check()

    with pytest.raises(MergeVerificationError, match="differs from peft's LoRA layers"):
        check()


def test_other_adapters_merge_through_peft_and_say_so(
    tmp_path: Path, sharded_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = randomized(
        peft.get_peft_model(AutoModelForCausalLM.from_pretrained(sharded_llama), config), seed=3
    )
    model.save_pretrained(tmp_path / "ia3")
    result = merge(inputs_for(str(tmp_path / "ia3"), None), tmp_path / "merged", MergeOptions(dtype="bf16"))
    assert not result.streamed and "merge_and_unload" in capsys.readouterr().out
    assert result.verdict.kind == "logits" and result.verdict.max_rel <= result.verdict.tolerance
    assert json.loads((result.out_dir / "config.json").read_text())["dtype"] == "bfloat16"


# ---- several adapters --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory: pytest.TempPathFactory, sharded_llama: Path) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    variants = {
        "a": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "b": {"r": 4, "target_modules": ["q_proj", "up_proj"]},
        "r8": {"r": 8, "target_modules": ["q_proj"]},
        "dora": {"r": 4, "target_modules": ["q_proj"], "use_dora": True},
        "rslora": {"r": 4, "target_modules": ["q_proj"], "use_rslora": True},
        "saves_head": {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    }
    for seed, (name, options) in enumerate(variants.items()):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(sharded_llama)
        model = peft.get_peft_model(base, peft.LoraConfig(lora_alpha=8, **options))  # type: ignore[arg-type]
        randomized(model, seed).save_pretrained(root / name)
    return {name: root / name for name in variants}


COMBINED_CASES = [
    ("linear", [0.7, 0.3], None),
    ("ties", [0.6, 0.4], 0.5),
    ("dare_ties", [0.5, 0.5], 0.7),
    ("dare_linear", [1.0, 0.5], 0.5),
    ("svd", [0.7, 0.3], None),
]


def test_combined_adapters_equal_peft_add_weighted_adapter(
    tmp_path: Path, two_adapters: dict[str, Path], sharded_llama: Path
) -> None:
    from transformers import AutoModelForCausalLM

    for combination, weights, density in COMBINED_CASES:
        argv = ["merge", "--adapters", str(two_adapters["a"]), str(two_adapters["b"]), "--out"]
        argv += [str(tmp_path / combination), "--weights", *map(str, weights), "--combination", combination]
        argv += ["--density", str(density)] if density is not None else []
        argv += ["--check", "light"]  # the full verdict is exercised on the runs above
        assert main(argv) == 0
        model = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(sharded_llama), two_adapters["a"], adapter_name="a"
        )
        model.load_adapter(str(two_adapters["b"]), adapter_name="b")
        torch.manual_seed(0)
        model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination, density=density)
        model.set_adapter("mix")
        expected = model.merge_and_unload().state_dict()
        got = merged_files(tmp_path / combination)
        assert set(got) == set(expected)
        changed = [k for k in got if not torch.equal(got[k], load_base_tensor(sharded_llama, k))]
        assert changed, combination
        for key in got:
            torch.testing.assert_close(
                got[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{combination}: {key}"
            )


def load_base_tensor(base_dir: Path, name: str) -> torch.Tensor:
    return MergedFiles(base_dir).get(name)


@pytest.mark.parametrize(
    ("adapters", "extra", "message"),
    [
        (["a", "r8"], ["--combination", "linear"], "needs one rank"),
        (["a", "r8"], ["--combination", "ties", "--density", "0.5"], "needs one rank"),
        (["a", "dora"], ["--combination", "svd"], "DoRA adapters cannot be combined"),
        (["a", "rslora"], ["--combination", "cat"], "rsLoRA adapters cannot be combined"),
        (["a", "saves_head"], ["--combination", "svd"], "modules_to_save"),
        (["a", "b"], ["--combination", "ties"], "needs a density in"),
        (["a", "b"], ["--weights", "1.0"], "1 weight(s) for 2 adapters"),
        (["a", "b"], ["--combination", "tie"], "did you mean 'ties'"),
    ],
)
def test_combinations_that_give_wrong_models_are_refused(
    tmp_path: Path,
    two_adapters: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    adapters: list[str],
    extra: list[str],
    message: str,
) -> None:
    argv = [
        "merge",
        "--adapters",
        *(str(two_adapters[a]) for a in adapters),
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written, nothing half-written


def test_combining_refuses_before_loading_the_base(two_adapters: dict[str, Path], tmp_path: Path) -> None:
    inputs = [inputs_for(str(two_adapters[n]), None) for n in ("a", "dora")]
    with pytest.raises(UserError, match="DoRA"):
        combine_adapters(inputs, [0.5, 0.5], "svd", None, None, 0, tmp_path / "x")


def test_an_inline_chat_template_ships_with_the_merged_tokenizer(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """data.chat_template may be Jinja itself, not a built-in's name: the merged tokenizer renders with it."""
    from transformers import AutoTokenizer

    from peftrun.run.outputs import RESOLVED_RECIPE

    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    inline = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    recipe = yaml.safe_load((run / RESOLVED_RECIPE).read_text())
    recipe["data"]["chat_template"] = inline
    (run / RESOLVED_RECIPE).write_text(yaml.safe_dump(recipe))
    inputs = inputs_for(str(run), None)
    assert inputs.chat_template == inline
    merged = merge(inputs, tmp_path / "merged", MergeOptions(check="light")).out_dir
    rendered = AutoTokenizer.from_pretrained(merged).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert rendered == "<user>hi\n"


# ---- user mistakes -------------------------------------------------------------------------------------------


def test_an_adapter_from_another_base_is_refused(
    tmp_path: Path, two_adapters: dict[str, Path], tiny_gpt2: Path, tiny_llama: Path
) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    with pytest.raises(
        UserError, match="GPT2LMHeadModel does not have: the adapter was trained on another base"
    ):
        merge(inputs_for(str(two_adapters["a"]), str(tiny_gpt2)), tmp_path / "m", MergeOptions())
    wider = tmp_path / "wider"
    config = LlamaConfig.from_pretrained(tiny_llama)
    config.hidden_size, config.intermediate_size = 96, 192
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    with pytest.raises(UserError, match=r"fits a weight of shape \[64, 64\] but the base's .* is \[64, 96\]"):
        merge(inputs_for(str(two_adapters["a"]), str(wider)), tmp_path / "m", MergeOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wider"]


def test_missing_shards_unknown_dtype_and_existing_output(
    tmp_path: Path, two_adapters: dict[str, Path], sharded_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(sharded_llama, broken)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    adapter = str(two_adapters["a"])
    out = str(tmp_path / "out")
    cases = [
        (["merge", adapter, "--base", str(broken), "--out", out], "are missing (model-00002-of-"),
        (["merge", adapter, "--out", out, "--dtype", "bf32"], "unknown dtype 'bf32'; did you mean"),
        (
            ["merge", adapter, "--out", out, "--max-shard-size", "big"],
            "--max-shard-size: 'big' is not a size",
        ),
        (["merge", adapter], "--out: required"),
        (["merge", adapter, "--out", str(broken)], "exists and is not empty"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("peftrun: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


# ---- export ----------------------------------------------------------------------------------------------------


def test_export_adapter_is_clean_and_loads_with_peft(
    runs: dict[str, Path], tmp_path: Path, sharded_llama: Path
) -> None:
    from transformers import AutoModelForCausalLM

    run = runs["lora"]
    assert main(["export", str(run), "--format", "adapter", "--out", str(tmp_path / "adapter")]) == 0
    out = tmp_path / "adapter"
    assert {p.name for p in out.iterdir()} - {OUTPUT_MARKER} <= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(sharded_llama) and config["inference_mode"] is True
    # all-linear, as leaf names (what vLLM matches), not peft's list of every full module name
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    base = AutoModelForCausalLM.from_pretrained(sharded_llama)
    expected = logits(peft.PeftModel.from_pretrained(base, run / "final"), base.config.vocab_size)
    base = AutoModelForCausalLM.from_pretrained(sharded_llama)
    assert torch.equal(logits(peft.PeftModel.from_pretrained(base, out), base.config.vocab_size), expected)
    with pytest.raises(UserError, match="exists and is not empty"):
        export_adapter(inputs_for(str(run), None), out)


def test_export_merged_is_merge(runs: dict[str, Path], merged_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    argv = ["export", str(runs["lora"]), "--format", "merged", "--out", str(out), "--max-shard-size", SHARD]
    assert main([*argv, "--dtype", "fp32", "--check", "light"]) == 0
    expected = merged_files(merged_runs["lora"])
    got = merged_files(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_merge_file_is_the_command_written_down(
    tmp_path: Path, two_adapters: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`peftrun merge merge.yaml` (paths relative to the file) gives what the flags give."""
    import yaml

    settings = {
        "adapters": [str(two_adapters["a"]), str(two_adapters["b"])],
        "weights": [0.6, 0.4],
        "combination": "ties",
        "density": 0.5,
        "out": "from_file",
        "check": "light",
    }
    spec = tmp_path / "merge.yaml"
    spec.write_text(yaml.safe_dump(settings))
    assert main(["merge", str(spec)]) == 0
    argv = ["merge", "--adapters", str(two_adapters["a"]), str(two_adapters["b"]), "--weights", "0.6", "0.4"]
    argv += ["--combination", "ties", "--density", "0.5", "--out", str(tmp_path / "from_flags")]
    assert main([*argv, "--check", "light"]) == 0
    from_file, from_flags = merged_files(tmp_path / "from_file"), merged_files(tmp_path / "from_flags")
    assert set(from_file) == set(from_flags)
    assert all(torch.equal(from_file[k], from_flags[k]) for k in from_flags)

    spec.write_text(yaml.safe_dump({**settings, "densty": 0.5, "out": "other"}))
    assert main(["merge", str(spec)]) == 2
    assert f"{spec}: densty: unknown key; did you mean 'density'?" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("layer", [0, 1])
def test_full_verdict_names_the_layer_with_a_corrupted_merged_weight(
    tmp_path: Path, sharded_llama: Path, layer: int
) -> None:
    """One weight of one layer flipped in the merged checkpoint: the layer-by-layer verdict fails and names
    that layer (every block runs on the reference's hidden states, so later layers still agree)."""
    from peftrun.merge import judge, meta_model
    from peftrun.merge.lora import plan
    from peftrun.merge.stream import base_weight_map

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(sharded_llama),
        peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]),
    )
    randomized(model, seed=4).save_pretrained(tmp_path / "adapter")
    inputs = inputs_for(str(tmp_path / "adapter"), str(sharded_llama))
    out = merge(inputs, tmp_path / "merged", MergeOptions(dtype="fp32", max_shard_size=SHARD)).out_dir
    merge_plan = plan(
        inputs.adapter_config, load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS), meta_model(inputs)
    )

    def verdict() -> Any:
        return judge(
            inputs,
            out,
            torch.float32,
            "full",
            merge_plan,
            base_weight_map(sharded_llama),
            lambda n, t: t,
            None,
        )

    passed = verdict()
    assert passed.blocks and {f"model.layers.{i}" for i in (0, 1)} <= {b.block for b in passed.blocks}
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= {b.block for b in passed.blocks}

    name = f"model.layers.{layer}.mlp.up_proj.weight"  # not adapted: the copy of the base is checked too
    shard = out / MergedFiles(out).weight_map[name]
    tensors = load_file(shard)
    flat = tensors[name].view(-1)
    flat[int(flat.abs().argmax())] *= -1  # one weight's sign flipped
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(
        MergeVerificationError, match=rf"block model\.layers\.{layer} of the merged model differs"
    ):
        verdict()

    del tensors[name]  # and a tensor missing altogether
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((out / SAFE_INDEX).read_text())
    del index["weight_map"][name]
    (out / SAFE_INDEX).write_text(json.dumps(index))
    with pytest.raises(MergeVerificationError, match=f"the merged checkpoint lacks tensor '{name}'"):
        verdict()


def test_the_layer_walk_runs_the_model_as_its_own_forward_does(
    tmp_path: Path, sharded_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk's reference (blocks built one at a time, embeddings from the probe's rows, the head a slice
    of rows at a time) gives the logits of base + adapter through peft, loaded whole."""
    from transformers import AutoModelForCausalLM

    from peftrun.merge import walk
    from peftrun.merge.verdict import adapter_layers

    monkeypatch.setattr(walk, "HEAD_SLICE_ELEMENTS", 64 * 50)  # the tiny head in several slices
    torch.manual_seed(0)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(sharded_llama),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], modules_to_save=["lm_head"]),
    )
    randomized(model, seed=5).save_pretrained(tmp_path / "adapter")
    inputs = inputs_for(str(tmp_path / "adapter"), str(sharded_llama))
    base = MergedFiles(sharded_llama)
    reference = walk.Source("reference", base.get, adapter_layers(tmp_path / "adapter"), base.rows)
    plain = walk.Source("base", base.get, None, base.rows)
    batch = probe_batch(model.config.vocab_size)
    result = walk.run_blocks(walk.weightless_model(inputs), [reference, plain], batch)
    mask = batch["attention_mask"][..., None]
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits * mask
        without = model.get_base_model()
        with model.disable_adapter():
            expected_base = without(**batch).logits * mask
    torch.testing.assert_close(result.logits[0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.logits[1], expected_base, rtol=0, atol=1e-5)
    assert float((expected - expected_base).abs().max()) > 1e-3  # the adapter matters


def test_combining_holds_no_base_weights(two_adapters: dict[str, Path]) -> None:
    from peftrun.merge.combine import shape_only_base

    model = shape_only_base(inputs_for(str(two_adapters["a"]), None))
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(storages.values()) <= 4 and sum(p.numel() for p in model.parameters()) > 10_000


def test_the_whole_model_path_checks_memory_before_loading(
    tmp_path: Path, sharded_llama: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where the model would not fit: peft's whole-model merge stops with one line before loading, and a
    full verdict that cannot run layer by layer falls back to the light check, saying so."""
    from transformers import AutoModelForCausalLM

    from peftrun.merge import full
    from peftrun.merge.walk import WalkUnsupported

    monkeypatch.setattr(full, "available_bytes", lambda: 1024)
    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(sharded_llama), config)
    model.save_pretrained(str(tmp_path / "ia3"))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "ia3"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "holds the whole model in fp32" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()

    def unsupported(*args: Any) -> Any:
        raise WalkUnsupported("an architecture it does not know")

    monkeypatch.setattr(full, "_layer_by_layer", unsupported)
    torch.manual_seed(0)
    lora = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(sharded_llama), peft.LoraConfig(r=4, target_modules=["q_proj"])
    )
    randomized(lora, seed=6).save_pretrained(tmp_path / "lora")
    result = merge(inputs_for(str(tmp_path / "lora"), None), tmp_path / "m2", MergeOptions())
    assert result.verdict.kind == "per-layer sample"
    assert (
        "cannot run" in capsys.readouterr().out and "ran the light check instead" in result.verdict.notes[-1]
    )


def test_a_classifier_merge_streams_with_the_trained_head(tmp_path: Path, tiny_bert: Path) -> None:
    """The classifier's tensors only (not the base's own head), its head from the adapter, its class named
    in config.json; the merged model gives the adapter model's logits."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = peft.get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
        peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
    )
    randomized(model, seed=7).save_pretrained(str(tmp_path / "adapter"))
    result = merge(inputs_for(str(tmp_path / "adapter"), str(tiny_bert)), tmp_path / "merged", MergeOptions())
    assert result.streamed and result.verdict.blocks
    merged = AutoModelForSequenceClassification.from_pretrained(result.out_dir).eval()
    assert set(merged_files(result.out_dir)) == set(merged.state_dict()) - {"bert.embeddings.position_ids"}
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    batch = probe_batch(merged.config.vocab_size)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)


ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # sliding-window layers (per-layer attention types and masks), scaled embeddings, a tied head
    "gemma3": (
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    ),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"sliding_window": 4, "final_logit_softcapping": 30.0}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_the_layer_walk_follows_each_architectures_own_forward(tmp_path: Path, architecture: str) -> None:
    """Rotary embeddings, sliding-window masks, embedding scales, logit soft-caps and tied heads come from
    the model's own forward: the walk's reference gives peft's logits exactly."""
    import transformers

    from peftrun.merge import walk
    from peftrun.merge.verdict import adapter_layers

    model_class, config_class, extra = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        **extra,
    )
    torch.manual_seed(0)
    base_model = getattr(transformers, model_class)(config)
    base_model.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    model = peft.get_peft_model(
        base_model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model.save_pretrained(str(tmp_path / "adapter"))
    base = MergedFiles(tmp_path / "base")
    reference = walk.Source("reference", base.get, adapter_layers(tmp_path / "adapter"), base.rows)
    inputs = inputs_for(str(tmp_path / "adapter"), str(tmp_path / "base"))
    batch = probe_batch(300)
    got = walk.run_blocks(walk.weightless_model(inputs), [reference], batch).logits[0]
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits * batch["attention_mask"][..., None]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    result = merge(inputs, tmp_path / "merged", MergeOptions(dtype="fp32"))
    assert len(result.verdict.blocks) == 6 and result.verdict.max_rel < 1e-4
