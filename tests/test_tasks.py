"""Real training runs of the non-causal tasks on tiny models: masked LM, text and image classification.

Each run goes through the one training loop and saves a verified artefact; the tests then load that
artefact the way a user would (transformers/peft, no peftrun) and check what it must hold.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import peft  # noqa: F401  (imported at collection: its one-time import cost is not any test's)
import pytest
import torch
from safetensors.torch import load_file

from peftrun.cli.main import main
from peftrun.errors import UserError
from peftrun.evaluation.metrics import classification_metrics
from peftrun.recipe.load import load_recipe
from peftrun.train.loop import RunResult, train

TOPIC_NAMES = ["food", "sports", "weather"]  # sorted: the default class order
COLOUR_NAMES = ["blue", "green", "red"]


def merged(base: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """`sections` over `base`, section by section (a section given with `_replace` replaces base's)."""
    out = dict(base)
    for key, value in sections.items():
        keep = isinstance(value, dict) and isinstance(base.get(key), dict) and not value.get("_replace")
        out[key] = {**base[key], **value} if keep else value
    return out


def run(recipe_path: Path, *overrides: str) -> RunResult:
    return train(load_recipe(recipe_path, list(overrides)))


def eval_records(output_dir: Path) -> list[dict[str, Any]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval_loss" in r]


@pytest.fixture
def bert_recipe(write_recipe: Any, tiny_bert: Path, classification_file: Path) -> Any:
    def write(**sections: Any) -> Path:
        base: dict[str, Any] = {
            "task": "sequence_classification",
            "model": {"name_or_path": str(tiny_bert)},
            "method": {
                "kind": "lora",
                "r": 4,
                "alpha": 8,
                "target_modules": ["query", "value"],
                "_replace": True,
            },
            "data": {
                "path": str(classification_file),
                "max_seq_len": 32,
                "val_fraction": 0.25,
                "_replace": True,
            },
            "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-2, "max_grad_norm": None},
        }
        return write_recipe(**merged(base, sections))

    return write


@pytest.fixture
def image_recipe(write_recipe: Any, image_folder: Path) -> Any:
    def write(model_dir: Path, **sections: Any) -> Path:
        base: dict[str, Any] = {
            "task": "image_classification",
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(image_folder), "val_fraction": 0.25, "_replace": True},
            "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-2, "max_grad_norm": None},
        }
        return write_recipe(**merged(base, sections))

    return write


# ---- sequence classification ------------------------------------------------------------------------------


def test_lora_classifier_trains_its_new_head_and_reloads_with_its_label_names(
    bert_recipe: Any, tiny_bert: Path, classification_file: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = run(bert_recipe(train={"max_steps": 12, "lr": 2e-2}, eval={"every_steps": 6}))
    final = result.final_dir
    assert final is not None
    saved = load_file(final / "adapter_model.safetensors")
    head = [n for n in saved if ".classifier." in n]
    assert head and all(bool(saved[n].any()) for n in head), "the new head is trained and saved"
    resolved = load_recipe(final / "resolved_recipe.yaml")
    assert resolved.data.labels == TOPIC_NAMES

    # Every eval (periodic and final) reports scikit-learn's metrics over the 6 held-out rows.
    records = eval_records(result.output_dir)
    assert [r["step"] for r in records] == [6, 12]
    for record in records:
        assert set(record["eval_per_class"]) == set(TOPIC_NAMES)
        matrix = torch.tensor(record["eval_confusion_matrix"])
        assert matrix.shape == (3, 3) and int(matrix.sum()) == 6
        assert record["eval_accuracy"] == pytest.approx(float(matrix.trace()) / 6)

    # A user's reload: the base with a head for the resolved labels, plus the adapter.
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert,
        num_labels=3,
        id2label=dict(enumerate(TOPIC_NAMES)),
        label2id={n: i for i, n in enumerate(TOPIC_NAMES)},
    )
    model = PeftModel.from_pretrained(base, final).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    rows = [json.loads(line) for line in classification_file.read_text().splitlines()]
    held_out = [rows[i - 1] for i in _held_out_rows(len(rows))]
    batch = tokenizer([r["text"] for r in held_out], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    truth = [TOPIC_NAMES.index(r["label"]) for r in held_out]
    expected = classification_metrics(truth, predicted, TOPIC_NAMES)
    assert records[-1]["eval_accuracy"] == pytest.approx(expected["accuracy"])
    assert records[-1]["eval_confusion_matrix"] == expected["confusion_matrix"]


def _held_out_rows(count: int) -> list[int]:
    from peftrun.data.rows import holdout_rows

    return sorted(holdout_rows(count, 0.25, 0))


def test_full_classifier_saves_label_names_in_its_config(bert_recipe: Any) -> None:
    from transformers import AutoModelForSequenceClassification

    result = run(
        bert_recipe(method={"kind": "full", "_replace": True}, data={"labels": ["weather", "food", "sports"]})
    )
    assert result.final_dir is not None
    model = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert model.config.id2label == {0: "weather", 1: "food", 2: "sports"}  # data.labels fixes the order
    assert model.config.label2id == {"weather": 0, "food": 1, "sports": 2}


def test_frozen_encoder_stays_bit_identical(bert_recipe: Any, tiny_bert: Path) -> None:
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    method = {
        "kind": "frozen",
        "freeze": ["all"],
        "train": ["bert.encoder.layer[-1:]", "bert.pooler.*", "classifier.*"],
    }
    result = run(bert_recipe(method={**method, "_replace": True}))
    assert result.final_dir is not None
    before = AutoModelForMaskedLM.from_pretrained(tiny_bert).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(result.final_dir).state_dict()
    frozen = [k for k in after if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))]
    trained = [k for k in after if k.startswith("bert.encoder.layer.1.") and k.endswith("dense.weight")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)


def test_label_outside_the_classes_names_file_and_row(
    bert_recipe: Any, tmp_path: Path, classification_file: Path
) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text(
        '{"text": "the goal was great", "label": "sports"}\n{"text": "a film", "label": "movies"}\n'
    )
    with pytest.raises(
        UserError,
        match=r"val\.jsonl: row 2: label 'movies' is not one of the classes \(food, sports, weather\)",
    ):
        run(
            bert_recipe(
                data={
                    "path": str(classification_file),
                    "val_path": str(val),
                    "max_seq_len": 32,
                    "_replace": True,
                }
            )
        )


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"data": {"format": "alpaca"}}, "data.format 'alpaca' does not fit task sequence_classification"),
        ({"task": "masked_lm", "data": {"labels": ["a", "b"]}}, "data.labels is for classification tasks"),
        ({"data": {"labels": ["a", "a"]}}, "the class names must be distinct"),
    ],
)
def test_task_and_data_mismatches_are_recipe_errors(
    bert_recipe: Any, sections: dict[str, Any], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        load_recipe(bert_recipe(**sections))


def test_one_class_is_an_error(bert_recipe: Any, tmp_path: Path) -> None:
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": 7}) + "\n" for i in range(8)))
    with pytest.raises(UserError, match=r"at least 2 classes; the labels are \['7'\]"):
        run(bert_recipe(data={"path": str(data), "max_seq_len": 32, "_replace": True}))


def test_metrics_on_known_predictions() -> None:
    names = ["cat", "dog", "eel"]
    result = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], names)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # cat: P 1/2 R 1/2; dog: P 2/3 R 1; eel: P 0 R 0 (never predicted: 0, not a warning)
    assert result["per_class"]["cat"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert result["per_class"]["dog"]["f1"] == pytest.approx(0.8)
    assert result["per_class"]["eel"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


# ---- masked LM ---------------------------------------------------------------------------------------------


def test_masked_lm_trains_reports_perplexity_and_reloads(bert_recipe: Any, text_file: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    recipe = bert_recipe(
        task="masked_lm",
        data={
            "path": str(text_file),
            "val_fraction": 0.25,
            "mask_rate": 0.3,
            "max_seq_len": 32,
            "_replace": True,
        },
        method={
            "kind": "lora",
            "r": 4,
            "target_modules": ["query", "value"],
            "modules_to_save": ["cls"],
            "_replace": True,
        },
        train={"max_steps": 8, "lr": 1e-2},
    )
    result = run(recipe)
    assert result.final_dir is not None and result.losses[-1] < result.losses[0]
    record = eval_records(result.output_dir)[-1]
    assert record["eval_perplexity"] == pytest.approx(
        torch.tensor(record["eval_loss"]).exp().item(), rel=1e-6
    )
    assert "eval_accuracy" not in record
    base = AutoModelForMaskedLM.from_pretrained(load_recipe(recipe).model.name_or_path)
    PeftModel.from_pretrained(base, result.final_dir)


def test_masking_depends_on_the_sample_only(tiny_bert: Path) -> None:
    """Same sample, same masks, whatever batch it is in: resume and multi-process runs see the same."""
    from transformers import AutoTokenizer

    from peftrun.data.encoder_text import MaskingCollator

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    samples = [
        {"input_ids": tokenizer(f"today the {w} was great and the {w} was bad")["input_ids"]}
        for w in ("goal", "rain", "soup")
    ]
    collate = MaskingCollator(tokenizer, mask_rate=0.4, seed=0, pad_id=tokenizer.pad_token_id)
    together = collate(samples)
    alone = collate(samples[1:2])
    length = len(samples[1]["input_ids"])
    assert torch.equal(together["labels"][1, :length], alone["labels"][0])
    assert torch.equal(together["input_ids"][1, :length], alone["input_ids"][0])
    labels = together["labels"]
    masked = labels != -100
    assert masked.any() and not masked[:, 0].any(), "[CLS] is never masked"
    assert torch.equal(
        labels[masked],
        torch.tensor(
            [
                s["input_ids"][j]
                for i, s in enumerate(samples)
                for j in range(len(s["input_ids"]))
                if masked[i, j]
            ]
        ),
    )
    other_seed = MaskingCollator(tokenizer, mask_rate=0.4, seed=1, pad_id=tokenizer.pad_token_id)(samples)
    assert not torch.equal(other_seed["labels"], labels)


# ---- image classification -----------------------------------------------------------------------------------


def test_resnet_frozen_stages_stay_bit_identical_buffers_included(
    image_recipe: Any, tiny_resnet: Path
) -> None:
    from transformers import AutoModelForImageClassification

    method = {"kind": "frozen", "freeze": ["all"], "train": ["stages[-1:]", "classifier.*"], "_replace": True}
    result = run(image_recipe(tiny_resnet, method=method, data={"augment": True}))
    assert result.final_dir is not None
    model = AutoModelForImageClassification.from_pretrained(result.final_dir)
    assert model.config.id2label == dict(enumerate(COLOUR_NAMES))  # 5-class head replaced by a 3-class one
    before = AutoModelForImageClassification.from_pretrained(tiny_resnet).state_dict()
    after = model.state_dict()
    frozen = [k for k in after if k.startswith(("resnet.embedder.", "resnet.encoder.stages.0."))]
    # Batch-norm running statistics of frozen stages are held too (their layers stay in eval mode).
    assert any(k.endswith("running_mean") for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    trained = [
        k for k in after if k.startswith("resnet.encoder.stages.1.") and k.endswith("convolution.weight")
    ]
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained)
    assert (result.final_dir / "preprocessor_config.json").is_file()
    assert eval_records(result.output_dir)[-1]["eval_confusion_matrix"]


def test_vit_lora_on_attention_from_a_jsonl_of_image_paths(
    image_recipe: Any, tiny_vit: Path, image_folder: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    # Paths relative to the data file, labels given as-is.
    data = tmp_path / "data" / "images.jsonl"
    shutil.copytree(image_folder, data.parent / "img")
    rows = [
        {"image": str(p.relative_to(data.parent)), "label": p.parent.name}
        for p in sorted((data.parent / "img").rglob("*.png"))
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    method = {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "_replace": True}
    result = run(
        image_recipe(
            tiny_vit, method=method, data={"path": str(data), "val_fraction": 0.25, "_replace": True}
        )
    )
    assert result.final_dir is not None
    saved = load_file(result.final_dir / "adapter_model.safetensors")
    assert any(".classifier." in n for n in saved) and any("q_proj.lora_B" in n for n in saved)
    base = AutoModelForImageClassification.from_pretrained(
        tiny_vit, num_labels=3, id2label=dict(enumerate(COLOUR_NAMES)), ignore_mismatched_sizes=True
    )
    PeftModel.from_pretrained(base, result.final_dir)


def test_missing_image_names_the_row(image_recipe: Any, tiny_vit: Path, tmp_path: Path) -> None:
    data = tmp_path / "images.jsonl"
    data.write_text('{"image": "nowhere.png", "label": "red"}\n')
    with pytest.raises(UserError, match=r"images\.jsonl: row 1: image file not found: .*nowhere\.png"):
        run(image_recipe(tiny_vit, data={"path": str(data), "_replace": True}))


# ---- peftrun eval / predict ---------------------------------------------------------------------------------


def test_eval_and_predict_commands_on_a_finished_run(
    bert_recipe: Any, classification_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run(bert_recipe(method={"kind": "full", "_replace": True}, train={"max_steps": 10, "lr": 1e-3}))
    run_dir = result.output_dir
    assert main(["eval", str(run_dir), "--data", str(classification_file)]) == 0
    out = run_dir / "eval" / classification_file.name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 24 and sum(map(sum, metrics["confusion_matrix"])) == 24
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert f"accuracy {metrics['accuracy']:.4f}" in capsys.readouterr().out

    unlabelled = tmp_path / "new.jsonl"
    unlabelled.write_text('{"text": "today the soup was great"}\n{"text": "today the snow was bad"}\n')
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", str(run_dir), "--data", str(unlabelled), "--out", str(preds)]) == 0
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["row"] for r in lines] == [1, 2]
    for line in lines:
        assert line["label"] in TOPIC_NAMES and set(line["probs"]) == set(TOPIC_NAMES)
        assert sum(line["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert line["score"] == max(line["probs"].values())

    # Predictions agree with the eval's confusion matrix on the labelled file itself.
    assert main(["predict", str(run_dir), "--data", str(classification_file), "--out", str(preds)]) == 2
    assert "exists; remove it or pass --overwrite" in capsys.readouterr().err
    argv = ["predict", str(run_dir), "--data", str(classification_file), "--out", str(preds), "--overwrite"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in classification_file.read_text().splitlines()]
    predicted = [json.loads(line)["label"] for line in preds.read_text().splitlines()]
    correct = sum(p == r["label"] for p, r in zip(predicted, rows, strict=True))
    assert correct / len(rows) == pytest.approx(metrics["accuracy"])


def test_eval_of_something_that_is_not_a_run(
    tmp_path: Path, classification_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path), "--data", str(classification_file)]) == 2
    assert "not a finished peftrun run" in capsys.readouterr().err


def test_verification_catches_an_adapter_whose_head_was_not_trained(bert_recipe: Any, tmp_path: Path) -> None:
    """The classic failure: a LoRA classifier saved with its head as initialised (not trained)."""
    from safetensors.torch import save_file

    from peftrun.model.load import load_base
    from peftrun.run.run_dir import reload_artefact
    from peftrun.run.verify import VerificationError, check_reload

    result = run(bert_recipe())
    assert result.final_dir is not None
    recipe = load_recipe(result.final_dir / "resolved_recipe.yaml")
    broken = tmp_path / "broken"
    shutil.copytree(result.final_dir, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    initial = load_base(recipe).state_dict()
    heads = [k for k in tensors if ".classifier." in k]
    assert heads
    for key in heads:
        tensors[key] = initial[key.removeprefix("base_model.model.")].clone()
    save_file(tensors, broken / "adapter_model.safetensors")
    batch = {
        "input_ids": torch.tensor([[2, 40, 41, 42, 3]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
    }
    intact = reload_artefact(result.final_dir, recipe)
    assert check_reload(reload_artefact(result.final_dir, recipe), intact, batch, 1e-4) == 0.0
    with pytest.raises(VerificationError, match="logits differ"):
        check_reload(reload_artefact(broken, recipe), intact, batch, 1e-4)


LORA_AND_HEAD = {"peft_type": "LORA", "r": 4, "target_modules": "all-linear", "modules_to_save": ["lm_head"]}


@pytest.mark.parametrize(
    ("base_name", "adapter", "checkpointing"),
    [
        ("tiny_llama", LORA_AND_HEAD, False),
        ("tiny_llama", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}, False),
        ("tiny_gpt2", {"peft_type": "LORA", "r": 4, "target_modules": "all-linear"}, False),
        ("tiny_llama", LORA_AND_HEAD, True),
    ],
    ids=["lora+head", "prompt_tuning", "gpt2", "gradient_checkpointing"],
)
def test_causal_lm_head_on_supervised_positions_only_gives_the_same_loss_and_gradients(
    request: pytest.FixtureRequest, base_name: str, adapter: dict[str, Any], checkpointing: bool
) -> None:
    """The training loss runs the LM head and the last layer's MLP only where labels are supervised
    (tasks.py); it must equal the loss on the full logits, per sample, with the same gradients, padding
    and prompts included. Under gradient checkpointing the MLP runs everywhere (backward recomputes it)."""
    from peft import get_peft_config, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftrun.data import collate
    from peftrun.model.tasks import TASKS, causal_lm_loss, forward_logits

    base = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(base_name))
    base.config.use_cache = False
    config = {"task_type": "CAUSAL_LM", **adapter}
    if adapter["peft_type"] == "LORA":
        config["init_lora_weights"] = False  # B != 0: the adapter changes the logits
    model = get_peft_model(base, get_peft_config(config))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for module in model.modules():  # dropout off: the two passes must compute the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    gen = torch.Generator().manual_seed(0)
    samples = []
    for length, prompt in ((9, 4), (15, 6), (5, 5), (12, 0)):  # one with nothing supervised
        ids = torch.randint(3, 250, (length,), generator=gen).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = collate(samples, pad_id=0)

    def loss_and_grads(compute: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        per_sample = compute()
        per_sample.sum().backward()
        return per_sample.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full, full_grads = loss_and_grads(lambda: causal_lm_loss(forward_logits(model, batch), batch))
    head_outputs: list[tuple[int, ...]] = []
    mlp_rows: list[int] = []
    last_mlp = [m for name, m in model.named_modules() if name.endswith(".mlp")][-1]
    spies = [
        model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: head_outputs.append(tuple(out.shape))
        ),
        last_mlp.register_forward_hook(lambda module, args, out: mlp_rows.append(args[0].shape[:-1].numel())),
    ]
    fast, fast_grads = loss_and_grads(lambda: TASKS["causal_lm"].loss_per_sample(model, batch))
    for spy in spies:
        spy.remove()
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    assert head_outputs == [(supervised, base.config.vocab_size)]  # not batch x length x vocabulary
    virtual = adapter.get("num_virtual_tokens", 0)
    every_position = batch["input_ids"].numel() + virtual * len(samples)
    assert mlp_rows[0] == (every_position if checkpointing else supervised)
    assert full[2] == 0 and bool((full[[0, 1, 3]] > 0).all())
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6)
    assert len(fast_grads) == len(full_grads) > 0
    for got, expected in zip(fast_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_merged_classifier_loads_with_transformers_and_predicts_the_same_labels(
    bert_recipe: Any, tmp_path: Path, quantized: bool
) -> None:
    """`peftrun merge` of a LoRA (or QLoRA: its verdict loads the 4-bit base with the run's head) classifier
    run: a plain AutoModelForSequenceClassification checkpoint with the label names, whose predictions
    equal the adapter model's."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftrun.model.load import load_base

    overrides = ["model.quantization.bits=4", "model.quantization.compute_dtype=fp32"] if quantized else []
    result = run(bert_recipe(), f"output_dir={tmp_path / 'cls'}", "train.max_steps=6", *overrides)
    assert result.final_dir is not None
    merged_dir = tmp_path / "merged"
    assert main(["merge", str(result.output_dir), "--out", str(merged_dir)]) == 0

    merged_model = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert merged_model.config.id2label == dict(enumerate(TOPIC_NAMES))
    recipe = load_recipe(result.final_dir / "resolved_recipe.yaml")
    adapter_model = PeftModel.from_pretrained(load_base(recipe), result.final_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = tokenizer(
        ["today the soup was great", "today the wind was bad", "today the match was great"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        merged_logits = merged_model(**batch).logits
        adapter_logits = adapter_model(**batch).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    assert merged_logits.argmax(-1).tolist() == adapter_logits.argmax(-1).tolist()


def test_a_position_wise_module_runs_only_at_the_selected_positions() -> None:
    from peftrun.model.tasks import _run_only_at

    layer = torch.nn.Linear(4, 3)
    selected = torch.tensor([[True, False, True, False, False], [False, False, False, False, True]])
    handles = _run_only_at(layer, lambda hidden: selected)
    seen: list[tuple[int, ...]] = []
    spy = layer.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    x = torch.randn(2, 5, 4)
    out = layer(x)
    assert seen == [(3, 4)]  # the three selected positions only
    torch.testing.assert_close(
        out[selected], torch.nn.functional.linear(x[selected], layer.weight, layer.bias)
    )
    assert bool((out[~selected] == 0).all())
    other = torch.randn(3, 7, 4)  # not the batch the mask is for (a vision tower's input, say)
    torch.testing.assert_close(layer(other), torch.nn.functional.linear(other, layer.weight, layer.bias))
    for handle in [*handles, spy]:
        handle.remove()
