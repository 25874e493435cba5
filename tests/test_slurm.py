"""`peftrun slurm`: the rendered script (golden files), and real jobs on a local 2-node Slurm cluster.

The cluster tests run what a user runs: `peftrun slurm` renders and submits the script, sbatch and
srun start one `accelerate launch` per (simulated) node, the two CPU processes train over gloo.
- a 2-node job trains and saves a verified adapter;
- the same job preempted by `scancel --signal=USR1` checkpoints, requeues itself, resumes, and ends
  with the uninterrupted job's losses and adapter;
- a job whose time limit runs out gets Slurm's USR1 warning, checkpoints and requeues itself.
Regenerate the golden files with PEFTRUN_UPDATE_GOLDEN=1 after a deliberate change to the script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftrun.cli.main import main
from peftrun.dist.signals import SCHEDULER_SIGNALS, StopRequest, catch_scheduler_signals
from peftrun.dist.slurm import RECIPE_FILE, SCRIPT_FILE, plan_job, render_script, write_job
from peftrun.errors import UserError
from peftrun.recipe.load import load_recipe
from peftrun.recipe.schema import Recipe
from peftrun.train.checkpoint import resolve_resume

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
SITE = Path("/home/user/project")  # the working directory the golden scripts are rendered for
# Measured here: the preempted job's losses equal the uninterrupted job's exactly (same ranks, same
# gloo reduction order, optimizer/RNG state restored); the tolerances only allow for other platforms.
LOSS_RTOL = 1e-5
ADAPTER_RTOL, ADAPTER_ATOL = 1e-4, 1e-6


# ---- the rendered script ------------------------------------------------------------------------------


def _recipe(**slurm: Any) -> Recipe:
    return Recipe.model_validate(
        {
            "output_dir": "runs/gpt_lora",
            "model": {"name_or_path": "openai-community/gpt2"},
            "data": {"path": "data/alpaca.jsonl"},
            "train": {"micro_batch_size": 2},
            "slurm": slurm,
        }
    )


GOLDEN_CASES: dict[str, dict[str, Any]] = {
    # One GPU: no multi-process backend option (accelerate refuses --multi_gpu for one process).
    "slurm_1_node.sbatch": {"time": "04:00:00", "partition": "gpu"},
    # CPU cluster: 2 processes per node over gloo, site setup, extra #SBATCH lines and environment.
    "slurm_2_nodes_cpu.sbatch": {
        "nodes": 2,
        "gpus_per_node": 0,
        "cpu_processes_per_node": 2,
        "cpus_per_task": 8,
        "account": "proj42",
        "setup": ["source /opt/venvs/peftrun/bin/activate"],
        "env": {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": 4},
        "sbatch": ["--mem=16G", "#SBATCH --exclusive"],
    },
    # 16 nodes x 8 GPUs under DeepSpeed ZeRO-3 (standard multinode launcher, not pdsh).
    "slurm_16_nodes_zero3.sbatch": {
        "nodes": 16,
        "gpus_per_node": 8,
        "cpus_per_task": 96,
        "time": "2-00:00:00",
        "partition": "gpu",
        "job_name": "gpt-lora-16n",
        "signal_lead_s": 600,
        "accelerate_config": "accelerate_configs/zero3.yaml",
        "setup": ["module load cuda/12.4 nccl", "source $HOME/venvs/peftrun/bin/activate"],
        "env": {"NCCL_DEBUG": "WARN", "HF_HOME": "$SCRATCH/hf"},
    },
}


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_script_matches_golden_file(name: str) -> None:
    job = dataclasses.replace(plan_job(_recipe(**GOLDEN_CASES[name]), REPO), workdir=SITE)
    script = render_script(job)
    golden = GOLDEN / name
    if os.environ.get("PEFTRUN_UPDATE_GOLDEN") == "1":
        golden.write_text(script)
    assert script == golden.read_text(), f"{name} changed; regenerate with PEFTRUN_UPDATE_GOLDEN=1 if meant"

    sbatch_lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert not [line for line in sbatch_lines if "$" in line], "sbatch does not expand variables there"
    nodes = GOLDEN_CASES[name].get("nodes", 1)
    assert f"#SBATCH --nodes={nodes}" in sbatch_lines and "#SBATCH --requeue" in sbatch_lines
    assert '--machine_rank "$SLURM_NODEID"' in script and '--num_machines "$SLURM_NNODES"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_plan_reads_the_accelerate_config_and_checks_the_global_batch() -> None:
    assert plan_job(_recipe(accelerate_config="accelerate_configs/zero2.yaml"), REPO).deepspeed
    assert not plan_job(_recipe(accelerate_config="accelerate_configs/ddp.yaml"), REPO).deepspeed
    with pytest.raises(UserError, match=r"slurm\.accelerate_config: 'nope\.yaml': no such file"):
        plan_job(_recipe(accelerate_config="nope.yaml"), REPO)
    spaced = _recipe()
    spaced.output_dir = Path("runs/my run")
    with pytest.raises(UserError, match=r"output_dir: 'runs/my run' goes on an #SBATCH line"):
        plan_job(spaced, REPO)
    # 4 nodes x 8 GPUs x micro 2 = 64 samples per step at least: a global batch of 32 cannot split.
    recipe = _recipe(nodes=4, gpus_per_node=8)
    recipe.train.global_batch_size = 32
    with pytest.raises(UserError, match=r"global_batch_size: 32 is not a multiple .* processes \(32\)"):
        plan_job(recipe, REPO)


def test_write_job_keeps_script_and_a_recipe_snapshot_that_loads_back(tmp_path: Path) -> None:
    recipe = _recipe(nodes=2, gpus_per_node=0)
    recipe.output_dir = tmp_path / "run"
    script = write_job(plan_job(recipe, tmp_path), recipe)
    assert script == tmp_path / "run" / "slurm" / SCRIPT_FILE and os.access(script, os.X_OK)
    snapshot = script.parent / RECIPE_FILE
    assert load_recipe(snapshot) == recipe, "a requeued job must train exactly the submitted recipe"
    assert f"-m peftrun train {snapshot}'" in script.read_text()
    assert sorted(p.name for p in script.parent.iterdir()) == [SCRIPT_FILE, RECIPE_FILE], "no temp files left"


def test_dry_run_prints_the_script_with_flags_over_the_recipe(
    write_recipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(slurm={"nodes": 4, "gpus_per_node": 0, "partition": "cpu"})
    # Overrides may follow the flags; the time is taken as written (YAML would read 24:00:00 as 86400).
    assert (
        main(["slurm", str(recipe), "--nodes", "2", "--time", "24:00:00", "--dry-run", "slurm.port=29400"])
        == 0
    )
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --time=24:00:00\n" in script
    assert "#SBATCH --partition=cpu\n" in script and "export PEFTRUN_HEAD_PORT=29400\n" in script
    assert not (tmp_path / "run").exists(), "--dry-run writes nothing"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--time", "soon"], "command line: slurm.time: 'soon': expected minutes, HH:MM:SS or D-HH:MM:SS"),
        (["--nodes", "0"], "command line: slurm.nodes: Input should be greater than 0"),
        (
            ["slurm.sbatch=['--nodes=$N']"],
            "command line: slurm.sbatch.0: '--nodes=$N': an option without $VARIABLES",
        ),
        (["--partition", "a b"], "command line: slurm.partition: 'a b': one word without $VARIABLES"),
        (["--accelerate-config", "missing.yaml"], "slurm.accelerate_config: 'missing.yaml': no such file"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    write_recipe: Any, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["slurm", str(write_recipe()), *args, "--dry-run"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"peftrun: error: {message}") and stderr.count("\n") == 1, stderr


def test_unquoted_time_in_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    data = _recipe().model_dump(mode="json")
    path.write_text(yaml.safe_dump(data).replace("time: null", "time: 24:00:00"))
    with pytest.raises(UserError, match=r"slurm\.time: quote the time limit"):
        load_recipe(path)


# ---- the training side: signals and resume -------------------------------------------------------------


@pytest.fixture
def restore_signal_handlers() -> Any:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *SCHEDULER_SIGNALS)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.usefixtures("restore_signal_handlers")
def test_usr1_twice_is_one_stop_and_asks_for_a_requeue_only_in_a_slurm_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    catch_scheduler_signals()
    os.kill(os.getpid(), signal.SIGUSR1)  # before training installs its handler: remembered, not lost
    stop = StopRequest().install()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signal_name == "SIGUSR1" and not stop.wants_requeue
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert stop.wants_requeue
    term = StopRequest().install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert term.signal_name == "SIGTERM" and not term.wants_requeue, "SIGTERM (scancel) stops, never requeues"


def test_a_requeued_job_resumes_from_its_newest_checkpoint(tmp_path: Path) -> None:
    for step in (2, 4):
        (tmp_path / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".tmp-step-00000006").mkdir()  # a partial one never counts
    newest = tmp_path / "checkpoints" / "step-00000004"
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, None, requeued=True) == newest
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-00000002"), requeued=True) == newest
    assert resolve_resume(tmp_path / "empty", None, requeued=True) is None


# ---- real jobs on the local cluster ----------------------------------------------------------------------


def _submit(cluster: Any, recipe: Path, *overrides: str) -> str:
    """`peftrun slurm RECIPE ...` as typed on a login node (SLURM_CONF points at the local cluster)."""
    out = io.StringIO()
    with (
        mock.patch.dict(os.environ, {"SLURM_CONF": cluster.env["SLURM_CONF"]}),
        contextlib.redirect_stdout(out),
    ):
        assert main(["slurm", str(recipe), *overrides]) == 0
    found = re.search(r"submitted job (\d+)", out.getvalue())
    assert found, out.getvalue()
    return found.group(1)


def _log(output_dir: Path, job_id: str) -> str:
    logs = list((output_dir / "slurm").glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else ""


def _wait(what: str, ready: Any, timeout: float, log: Any) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; job log:\n{log()[-6000:]}")
        time.sleep(0.2)


def _losses(output_dir: Path) -> list[float]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _finished(cluster: Any, job_id: str, output_dir: Path, timeout: float) -> str:
    _wait(
        f"job {job_id} to end",
        lambda: cluster.job_state(job_id) is None,
        timeout,
        lambda: _log(output_dir, job_id),
    )
    return _log(output_dir, job_id)


@pytest.fixture(scope="module")
def cluster_recipe(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, alpaca_file: Path) -> Path:
    path = tmp_path_factory.mktemp("slurm_jobs") / "recipe.yaml"
    recipe = {
        "output_dir": str(path.parent / "unused"),
        "model": {"name_or_path": str(tiny_llama)},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"path": str(alpaca_file), "max_seq_len": 256},
        # 30 steps: long enough for a signal sent at step 2 to land mid-run on a busy machine.
        "train": {"max_steps": 30, "micro_batch_size": 2, "lr": 1e-3, "max_grad_norm": None},
        "logging": {"report_to": [], "progress_bar": False, "plot": False},
        "checkpoint": {"at_end": False},
        "slurm": {
            "nodes": 2,
            "gpus_per_node": 0,
            # This interpreter's environment on every node (on a real site: module load / venv activate).
            "setup": [f"export PATH={Path(sys.executable).parent}:$PATH", f"export PYTHONPATH={REPO}"],
            # The simulated nodes share the loopback interface; gloo must not pick another one.
            "env": {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": 1},
        },
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def plain_and_preempted(slurm_cluster: Any, cluster_recipe: Path) -> dict[str, Any]:
    """Two identical 2-node jobs, run side by side (one CPU of each node each); one gets USR1 at step 2."""
    root = cluster_recipe.parent
    jobs = {name: root / name for name in ("plain", "preempted")}
    ids = {name: _submit(slurm_cluster, cluster_recipe, f"output_dir={out}") for name, out in jobs.items()}
    try:
        out = jobs["preempted"]
        _wait(
            "the job to train 2 steps",
            lambda: len(_losses(out)) >= 2,
            300,
            lambda: _log(out, ids["preempted"]),
        )
        slurm_cluster.run("scancel", "--signal=USR1", ids["preempted"])
    except BaseException:
        for job_id in ids.values():
            slurm_cluster.run("scancel", job_id)
        raise
    return {"cluster": slurm_cluster, "ids": ids, "dirs": jobs}


@pytest.mark.slow
def test_two_node_job_trains_and_saves_a_verified_adapter(plain_and_preempted: dict[str, Any]) -> None:
    cluster, out = plain_and_preempted["cluster"], plain_and_preempted["dirs"]["plain"]
    log = _finished(cluster, plain_and_preempted["ids"]["plain"], out, timeout=300)

    # Both nodes took part, each with its own machine rank, in one world of 2 processes.
    assert re.search(r"^0: \[peftrun\] node node1: machine rank 0 of 2$", log, re.M), log[-4000:]
    assert re.search(r"^1: \[peftrun\] node node2: machine rank 1 of 2$", log, re.M), log[-4000:]
    assert "global batch 4 samples = 2 process(es) x micro 2" in log
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2
    assert re.search(
        r"saved \S+/final: \d+ tensors verified, saved adapter.s logits in a second slot max rel diff 0\.0e\+00",
        log,
    ), log[-4000:]
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert adapter and all(t.any() for name, t in adapter.items() if "lora_B" in name), "the adapter trained"
    assert len(_losses(out)) == 30


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_ends_like_the_uninterrupted_one(
    plain_and_preempted: dict[str, Any],
) -> None:
    cluster, dirs, ids = (
        plain_and_preempted["cluster"],
        plain_and_preempted["dirs"],
        plain_and_preempted["ids"],
    )
    out = dirs["preempted"]
    log = _finished(cluster, ids["preempted"], out, timeout=420)

    stopped = re.search(r"^0: \[peftrun\] stopped by SIGUSR1 at step (\d+); checkpoint (\S+)$", log, re.M)
    assert stopped, log[-6000:]
    step = int(stopped.group(1))
    assert 2 <= step < 30, "the signal must land mid-run for this test to mean anything"
    assert f"0: [peftrun] requeued Slurm job {ids['preempted']}" in log
    assert "(restart 1) on node[1-2]" in log, "Slurm ran the job again"
    assert f"0: [peftrun] resumed from {stopped.group(2)} at step {step}" in log
    assert f"1: [peftrun] resumed from {stopped.group(2)} at step {step}" in log

    # One history in metrics.jsonl, the uninterrupted job's, and the same adapter at the end.
    plain = dirs["plain"]
    _finished(cluster, ids["plain"], plain, timeout=300)
    torch.testing.assert_close(
        torch.tensor(_losses(out), dtype=torch.float64),
        torch.tensor(_losses(plain), dtype=torch.float64),
        rtol=LOSS_RTOL,
        atol=0,
    )
    got = load_file(out / "final" / "adapter_model.safetensors")
    expected = load_file(plain / "final" / "adapter_model.safetensors")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=ADAPTER_RTOL, atol=ADAPTER_ATOL)


@pytest.mark.slow
def test_time_limit_warning_checkpoints_and_requeues(slurm_cluster: Any, cluster_recipe: Path) -> None:
    """--time=1 with USR1 10 s before: Slurm checks limits every 30 s, so USR1 comes 20-50 s in."""
    out = cluster_recipe.parent / "time_limited"
    job_id = _submit(
        slurm_cluster,
        cluster_recipe,
        f"output_dir={out}",
        "train.max_steps=1000000",  # it cannot finish before its time runs out
        "--time",
        "1",
        "slurm.signal_lead_s=10",
    )
    try:
        _wait(
            "the job to requeue itself",
            lambda: "Restarts=1" in slurm_cluster.run("scontrol", "show", "job", job_id).stdout,
            150,
            lambda: _log(out, job_id),
        )
        log = _log(out, job_id)
    finally:
        slurm_cluster.run("scancel", job_id)
        slurm_cluster.wait_gone(job_id, 60)
    stopped = re.search(r"^0: \[peftrun\] stopped by SIGUSR1 at step (\d+); checkpoint (\S+)$", log, re.M)
    assert stopped, log[-6000:]
    assert f"0: [peftrun] requeued Slurm job {job_id}" in log
    assert "DUE TO TIME LIMIT" not in log, "the job was requeued before its time ran out"
    checkpoint = Path(stopped.group(2))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == int(stopped.group(1)) >= 1 and (checkpoint / "trainable.safetensors").is_file()
