"""Recipe loading: every user mistake becomes one line naming the file (or command line) and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from peftrun.errors import UserError
from peftrun.recipe.load import load_recipe, load_run_recipe, parse_override, recipe_to_yaml
from peftrun.recipe.schema import DataConfig

BASE: dict[str, Any] = {"output_dir": "runs/x", "model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}}


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _merge(**sections: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


BAD_RECIPES = [
    (_merge(trian={}), "trian: unknown key; did you mean 'train'?"),
    (_merge(model={"dtpye": "bf16"}), "model.dtpye: unknown key; did you mean 'dtype'?"),
    (
        _merge(method={"kind": "lora", "droput": 0.1}),
        "method.droput: unknown option of method 'lora' (LoraConfig); did you mean 'dropout'?",
    ),
    (_merge(method={"kind": "lorra"}), "method.kind: unknown method 'lorra'; did you mean 'lora'?"),
    (_merge(method={"kind": "lora", "r": 0}), "method.r: must be a positive integer (got 0)"),
    (_merge(method={"kind": "lora", "r": "big"}), "method.r: Input should be a valid integer"),
    (
        _merge(method={"kind": "lora", "bias": "nonee"}),
        "method.bias: Input should be 'none', 'all' or 'lora_only' (got 'nonee')",
    ),
    (_merge(method={"kind": "lora", "task_type": "SEQ_CLS"}), "method.task_type: is set by peftrun"),
    (_merge(method={"kind": "full", "r": 8}), "method.r: not an option of method 'full'"),
    (_merge(method={"kind": "frozen"}), "method.freeze: method 'frozen' needs at least one pattern"),
    (_merge(method={"kind": "lora", "freeze": ["all"]}), "method.freeze: only for kind: frozen"),
    (_merge(method={"kind": "ia3", "r": 4}), "method.r: unknown option of method 'ia3' (IA3Config)"),
    (_merge(train={"lr": -1}), "train.lr: Input should be greater than 0 (got -1)"),
    (_merge(train={"cpu_matmul": "torch"}), "train.cpu_matmul: moved to cpu.matmul (the cpu: section)"),
    (_merge(train={"fused_lora": False}), "train.fused_lora: moved to cpu.fused_lora"),
    (_merge(train={"cpu_malloc_cache": False}), "train.cpu_malloc_cache: moved to cpu.malloc_cache"),
    (_merge(cpu={"matmull": "torch"}), "cpu.matmull: unknown key; did you mean 'matmul'?"),
    (_merge(train={"epochs": "two"}), "train.epochs: Input should be a valid integer"),
    (
        _merge(train={"scheduler": "cosin"}),
        "train.scheduler: Input should be 'cosine', 'linear' or 'constant'",
    ),
    (
        _merge(data={"format": "sharegpt"}),
        "data.format: Input should be 'alpaca', 'chat', 'text', 'classification' or 'images'",
    ),
    (
        _merge(data={"val_fraction": 0.1, "val_path": "v.jsonl"}),
        "data: set either val_fraction or val_path, not both",
    ),
    (
        _merge(model={"name_or_path": "m", "quantization": {"bits": 3}}),
        "model.quantization.bits: Input should be 4 or 8",
    ),
    (
        _merge(method={"kind": "full"}, model={"quantization": {"bits": 4}}),
        "method.kind=full cannot train quantized weights",
    ),
    (
        _merge(method={"kind": "prompt_tuning", "num_virtual_tokens": 4}, data={"packing": True}),
        "data.packing cannot be used with method.kind=prompt_tuning",
    ),
    (
        {**BASE, "task": "sequence_classification", "data": {"path": "d", "packing": True}},
        "data.packing is for causal_lm, not sequence_classification",
    ),
    ({"model": {"name_or_path": "m"}, "data": {"path": "d"}}, "output_dir: required key is missing"),
    ("model: [unclosed", "not valid YAML"),
    # what training used to hit late (issue 17)
    (_merge(train={"lr": float("inf")}), "train.lr: Input should be a finite number"),
    (_merge(train={"lr": float("nan")}), "train.lr: Input should be a finite number"),
    (_merge(train={"betas": [0.9, 1.0]}), "train.betas: each beta must be in [0, 1) (got [0.9, 1.0])"),
    (_merge(train={"betas": [-0.1, 0.9]}), "train.betas: each beta must be in [0, 1)"),
    (
        _merge(train={"warmup_steps": 6, "max_steps": 5}),
        "train.warmup_steps (6) does not fit in train.max_steps (5)",
    ),
    (
        _merge(train={"warmup_steps": 1, "max_steps": 1}),
        "train.warmup_steps (1) does not fit in train.max_steps (1)",
    ),
    (
        _merge(slurm={"time": "00:04:00", "signal_lead_s": 300}),
        "slurm.signal_lead_s (300 s) must be shorter than the time limit 00:04:00 (240 s)",
    ),
    (
        _merge(method={"kind": "lora", "alpha": 8, "lora_alpha": 16}),
        "method.alpha: and lora_alpha are the same option",
    ),
    ({**BASE, "output_dir": ""}, "output_dir: empty"),
    (_merge(train={"overwrite": True, "resume": "auto"}), "train.overwrite (--fresh) and train.resume both"),
    (
        "output_dir: a\nmodel: {name_or_path: m}\noutput_dir: b\n",
        ":3:1: not valid YAML: duplicate key 'output_dir' (first on line 1)",
    ),
    ("- a list", "a recipe is a YAML mapping"),
    # data.datasets: several datasets (issue 15)
    (
        _merge(data={"datasets": [{"path": "b.jsonl"}]}),
        "data: give data.path (one dataset) or data.datasets (a list of them), not both",
    ),
    (
        {**BASE, "data": {"format": "alpaca"}},
        "data: give data.path (one dataset) or data.datasets (a list of them), one of them is required",
    ),
    (
        {**BASE, "data": {"datasets": [{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": 1, "samples": 5}]}},
        "data.datasets[1].weight: give weight or samples, not both",
    ),
    (
        {**BASE, "data": {"datasets": [{"path": "a.jsonl", "wieght": 0.5}]}},
        "data.datasets[0].wieght: unknown key; did you mean 'weight'?",
    ),
    (
        {**BASE, "data": {"datasets": [{"path": "a.jsonl", "weight": 0}]}},
        "data.datasets[0].weight: Input should be greater than 0 (got 0)",
    ),
    (
        {**BASE, "data": {"datasets": [{"path": "a.jsonl", "samples": 2.5}]}},
        "data.datasets[0].samples: Input should be a valid integer",
    ),
    (
        {**BASE, "data": {"datasets": [{"weight": 1}]}},
        "data.datasets[0].path: required key is missing",
    ),
    (
        {**BASE, "data": {"datasets": [{"path": "a.jsonl"}], "val_path": "v.jsonl"}},
        "data.val_path: set it per dataset (data.datasets[].val_path) with data.datasets",
    ),
    (
        {
            **BASE,
            "data": {"datasets": [{"path": "a.jsonl"}, {"path": "b", "val_path": "v"}], "val_fraction": 0.1},
        },
        "data.datasets[1].val_path: set either data.val_fraction or a dataset's val_path/val_split, not both",
    ),
    (
        {**BASE, "data": {"datasets": [{"path": "org/d", "val_path": "v.jsonl", "val_split": "test"}]}},
        "data.datasets[0].val_split: give val_path or val_split, not both",
    ),
    (
        {**BASE, "data": {"datasets": [{"path": "a.jsonl", "format": "classification"}]}},
        "data.datasets[0].format 'classification' does not fit task causal_lm (use alpaca or chat or text)",
    ),
    (
        {**BASE, "task": "sequence_classification", "data": {"datasets": [{"path": "a.csv"}]}},
        "data.datasets is for causal_lm; sequence_classification reads one dataset: give data.path",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_RECIPES, ids=[m[:40] for _, m in BAD_RECIPES])
def test_bad_recipe_gives_one_clear_line(tmp_path: Path, data: object, message: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    text = str(info.value)
    assert message in text
    assert text.startswith(str(path)), "the error must name the recipe file"
    assert "Traceback" not in text


def test_both_forms_give_one_list_of_sources(tmp_path: Path) -> None:
    short = load_recipe(
        _write(tmp_path, _merge(data={"path": "org/d", "subset": "en", "data_files": ["en/*.parquet"]}))
    )
    (only,) = short.data.sources()
    assert (only.key, only.path, only.subset, only.data_files, only.split) == (
        "data",
        "org/d",
        "en",
        ("en/*.parquet",),
        "train",
    )
    assert only.key_of("path") == "data.path"
    data = {
        "format": "chat",
        "columns": {"messages": "conversation"},
        "chat_template": "chatml",
        "datasets": [
            {"path": "a.jsonl", "weight": 3},
            {
                "path": "org/b",
                "split": "test",
                "subset": "x",
                "samples": 10,
                "columns": {},
                "val_split": "dev",
            },
            {"path": "c.jsonl", "format": "text", "chat_template": "llama3", "val_path": "cv.jsonl"},
        ],
    }
    mixed = load_recipe(_write(tmp_path, {**BASE, "data": data})).data
    a, b, c = mixed.sources()
    assert (a.key, a.format, a.columns, a.weight, a.chat_template, a.split) == (
        "data.datasets[0]",
        "chat",
        {"messages": "conversation"},
        3.0,
        "chatml",
        "train",
    )
    assert (b.columns, b.split, b.subset, b.samples, b.val_split) == ({}, "test", "x", 10, "dev")
    assert (c.format, c.chat_template, c.val_path, c.key_of("val_path")) == (
        "text",
        "llama3",
        "cv.jsonl",
        "data.datasets[2].val_path",
    )
    single = mixed.for_source(c)
    assert (single.path, single.datasets, single.format, single.val_path) == (
        "c.jsonl",
        None,
        "text",
        "cv.jsonl",
    )
    assert single.sources() == [c.__class__(**{**c.__dict__, "key": "data", "weight": None})]


def test_several_mistakes_are_all_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, _merge(trian={}, model={"dtpye": "bf16"}))
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert len(str(info.value).splitlines()) == 2


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_go_through_the_schema(tmp_path: Path) -> None:
    path = _write(tmp_path, _merge(method={"kind": "lora", "r": 8}))
    recipe = load_recipe(
        path, ["train.lr=1e-4", "method.r=32", "train.max_steps=20", "data.columns={output: answer}"]
    )
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.method.options["r"] == 32
    assert recipe.train.max_steps == 20
    assert recipe.data.columns == {"output": "answer"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1e-4", "command line: train.lrr: unknown key; did you mean 'lr'?"),
        ("train.cpu_matmul=torch", "command line: train.cpu_matmul: moved to cpu.matmul"),
        ("method.r=0", "command line: method.r: must be a positive integer"),
        ("train.max_steps=-2", "command line: train.max_steps: Input should be greater than 0"),
        ("train.lr", "expected dotted.key=value"),
        ("output_dir.x=1", "'output_dir' is not a section"),
        ("train.lr=[1e-4", "override 'train.lr=[1e-4': the value is not valid YAML"),
        ("output_dir=", "command line: output_dir: empty"),
    ],
)
def test_bad_override(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        load_recipe(_write(tmp_path, BASE), [override])
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("a=1e-4", 1e-4),
        ("a=3", 3),
        ("a=true", True),
        ("a=null", None),
        ("a=[x, y]", ["x", "y"]),
        ("a=cosine", "cosine"),
        ('a="1"', "1"),  # quoted: a string (e.g. slurm.time="90"), not a number
        ("a='24:00:00'", "24:00:00"),
    ],
)
def test_parse_override_values(text: str, value: object) -> None:
    assert parse_override(text) == (["a"], value)


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, _merge(method={"kind": "lora", "r": 8, "alpha": 16})))
    again = load_recipe(_write(tmp_path, recipe_to_yaml(recipe)))
    assert again == recipe
    assert again.method.options == {"r": 8, "alpha": 16}
    entries = [{"path": "a.jsonl", "weight": 2}, {"path": "org/b", "subset": "en", "samples": 5}]
    mixed = load_recipe(_write(tmp_path, {**BASE, "data": {"datasets": entries}}))
    assert load_recipe(_write(tmp_path, recipe_to_yaml(mixed))) == mixed


def test_a_recipe_that_is_not_utf8_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"output_dir: runs/x\nmodel: {name_or_path: caf\xe9}\n")
    with pytest.raises(UserError, match=r"r.yaml:2: not UTF-8 text \(byte 0xe9\)"):
        load_recipe(path)


@pytest.mark.parametrize(("text", "seconds"), [("30", 1800), ("1:30", 90), ("2:00:00", 7200), ("1-2", 93600)])
def test_slurm_time_formats(text: str, seconds: int) -> None:
    from peftrun.recipe.slurm import slurm_time_seconds

    assert slurm_time_seconds(text) == seconds


def test_a_run_directory_of_an_older_peftrun_still_loads(tmp_path: Path) -> None:
    """Before the cpu: section, resolved recipes carried train.cpu_matmul, train.fused_lora and
    train.cpu_malloc_cache: eval, merge, generate and resume read them under the new names, while a
    user's recipe with those keys is told where they went."""
    resolved = yaml.safe_load(recipe_to_yaml(load_recipe(_write(tmp_path, BASE))))
    cpu = resolved.pop("cpu")
    resolved["train"].update(cpu_matmul="torch", fused_lora=not cpu["fused_lora"], cpu_malloc_cache=False)
    path = _write(tmp_path, resolved)
    recipe = load_run_recipe(path)
    assert (recipe.cpu.matmul, recipe.cpu.fused_lora, recipe.cpu.malloc_cache) == (
        "torch",
        not cpu["fused_lora"],
        False,
    )
    with pytest.raises(UserError, match=r"moved to cpu\.matmul"):
        load_recipe(path)


def test_read_paths_are_every_dataset_path_and_a_globs_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    for name in ("b.jsonl", "a.jsonl", "notes.md"):
        (tmp_path / "shards" / name).write_text("{}\n")
    data = DataConfig(
        datasets=[
            {"path": "shards/*.jsonl"},
            {"path": "org/hub", "val_split": "dev"},
            {"path": "folder", "val_path": "v.jsonl"},
            {"path": "none/*.jsonl"},
        ]
    )
    assert data.read_paths() == ["shards/a.jsonl", "shards/b.jsonl", "org/hub", "folder", "v.jsonl"]
    assert DataConfig(path="t.jsonl", val_path="v.jsonl").read_paths() == ["t.jsonl", "v.jsonl"]
