"""The command line as a user meets it: real subprocesses, exit codes, one-line errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from peftrun.cli.main import without_launcher_rank

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def peftrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peftrun", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_help_lists_commands_and_documents_every_key() -> None:
    top = peftrun("--help")
    assert top.returncode == 0 and "train" in top.stdout and "validate" in top.stdout
    train_help = peftrun("train", "--help")
    assert train_help.returncode == 0
    for key in (
        "output_dir",
        "train.max_steps",
        "train.lr",
        "method.kind",
        "data.format",
        "model.quantization.bits",
    ):
        assert key in train_help.stdout


def test_validate_prints_the_resolved_recipe(write_recipe: Any) -> None:
    result = peftrun("validate", str(write_recipe()), "train.lr=5e-4")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.0005" in result.stdout and "trainable" in result.stdout and ": OK" in result.stdout


def test_the_deepspeed_launchers_local_rank_argument_is_accepted(write_recipe: Any) -> None:
    """`deepspeed -m peftrun RECIPE` runs `python -m peftrun --local_rank=0 RECIPE`."""
    result = peftrun("--local_rank=0", "validate", str(write_recipe()))
    assert result.returncode == 0, result.stderr
    assert without_launcher_rank(["--local_rank", "1", "r.yaml", "train.lr=1"]) == ["r.yaml", "train.lr=1"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trian.lr=1"], "command line: trian: unknown key; did you mean 'train'?"),
        (["method.target_modules=[q_proj, v_prj]"], "method.target_modules[1]: 'v_prj' matches no module"),
        (["data.path=/nonexistent/x.jsonl"], "data.path"),
        (["method.kind=lorra"], "did you mean 'lora'?"),
        (["model.name_or_path=/nonexistent/model"], "model.name_or_path: no such directory"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "train"])
def test_user_mistakes_exit_2_with_one_line(
    write_recipe: Any, capsys: pytest.CaptureFixture[str], command: str, overrides: list[str], message: str
) -> None:
    from peftrun.cli.main import main

    assert main([command, str(write_recipe()), *overrides]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("peftrun: error: ") and message in errors[0]


def test_a_mistake_in_a_real_process_has_no_traceback(write_recipe: Any) -> None:
    started = time.perf_counter()
    result = peftrun("train", str(write_recipe()), "method.droput=0.1")
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "method.droput: unknown option of method 'lora' (LoraConfig); did you mean 'dropout'?"
    )
    assert "Traceback" not in result.stderr
    assert time.perf_counter() - started < 60  # no model is loaded: seconds, not minutes


def test_python_dash_m_with_a_recipe_means_train(write_recipe: Any, tmp_path: Path) -> None:
    result = peftrun(str(write_recipe()), "train.max_steps=1", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(write_recipe: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = str(write_recipe(output_dir=str(out), train={"max_steps": 10_000, "epochs": 10_000}))
    process = subprocess.Popen(
        [sys.executable, "-m", "peftrun", "train", recipe],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-2000:]
    assert "stopped by SIGINT" in output and "Traceback" not in output
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints, output[-2000:]
    stopped_at = int(checkpoints[-1].name.removeprefix("step-"))
    assert stopped_at >= 2 and not (out / "final").exists()
    assert not list((out / "checkpoints").glob(".tmp-*")), "no partial checkpoint is left behind"

    resumed = peftrun("train", recipe, "train.resume=auto", f"train.max_steps={stopped_at + 2}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {checkpoints[-1]} at step {stopped_at}" in resumed.stdout
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped_at + 3))
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_validate_checks_every_dataset_of_a_mixture(
    write_recipe: Any, alpaca_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peftrun.cli.main import main

    (tmp_path / "shards").mkdir()
    good = {"instruction": "Say hi.", "input": "", "output": "hi"}
    (tmp_path / "shards" / "a.jsonl").write_text(json.dumps(good) + "\n")
    bad = tmp_path / "shards" / "b.jsonl"
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "no output"}) + "\n")
    datasets = [{"path": str(alpaca_file), "weight": 3}, {"path": str(tmp_path / "shards"), "weight": 1}]
    recipe = write_recipe(data={"_replace": True, "datasets": datasets, "max_seq_len": 256})
    assert main(["validate", str(recipe)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"peftrun: error: {bad}: row 2: missing 'output' (columns: instruction); map it with data.columns"
    ]
    bad.write_text(json.dumps(good) + "\n")
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "weight: 3.0" in out and ": OK" in out
