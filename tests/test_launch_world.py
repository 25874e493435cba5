"""The world a launch asked for against the world it got: case tables of what each launcher path puts
in the environment (read from accelerate 1.15, deepspeed 0.19, torch 2.13 and Slurm's srun), and the
launch of issue 19 for real: two "machines" over loopback under ZeRO-3, refused with DeepSpeed's
default multi-node launcher, one world of 2 with `--deepspeed_multinode_launcher standard`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from peftrun.dist.launch_world import (
    AccelerateLaunch,
    World,
    accelerate_launch_args,
    find_accelerate_launch,
    launch_world_error,
    launched_world,
    parse_accelerate_launch,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"
VENV_BIN = Path(sys.executable).parent


# ---- what each launcher sets -------------------------------------------------------------------------


def torchrun_env(machines: int, processes: int, machine: int = 0) -> dict[str, str]:
    """torchrun's variables (also accelerate's DDP and DeepSpeed `standard` paths, which run torchrun)."""
    return {
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes // machines),
        "GROUP_WORLD_SIZE": str(machines),
        "GROUP_RANK": str(machine),
        "ROLE_WORLD_SIZE": str(processes),
        "TORCHELASTIC_RUN_ID": "none",
    }


def deepspeed_env(machines: int, processes: int, machine: int = 0) -> dict[str, str]:
    """deepspeed.launcher.launch's variables (the `deepspeed` command, and accelerate's pdsh path)."""
    return {
        "WORLD_SIZE": str(processes),
        "CROSS_SIZE": str(machines),
        "CROSS_RANK": str(machine),
        "LOCAL_SIZE": str(processes // machines),
    }


def srun_env(tasks: int, nodes: int, step: str = "0") -> dict[str, str]:
    return {
        "SLURM_STEP_ID": step,
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_NTASKS": str(tasks),
        "SLURM_NNODES": str(nodes),
        "SLURM_PROCID": "0",
    }


def asked(machines: int, processes: int | None, rank: int = 0, launcher: str = "pdsh") -> AccelerateLaunch:
    return AccelerateLaunch(machines, processes, rank, launcher)


@pytest.mark.parametrize(
    ("env", "launcher", "world"),
    [
        ({}, "none", World(1, 1)),
        (torchrun_env(1, 2), "torchrun", World(1, 2)),
        (torchrun_env(2, 4, machine=1), "torchrun", World(2, 4)),
        (deepspeed_env(1, 1), "deepspeed", World(1, 1)),
        (deepspeed_env(2, 4), "deepspeed", World(2, 4)),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, "mpirun", World(None, 4)),
        ({"PMI_SIZE": "3"}, "mpirun", World(None, 3)),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "a launcher", World(None, 2)),
        (srun_env(2, 2), "none", World(1, 1)),  # srun makes no torch world
    ],
    ids=[
        "python",
        "torchrun",
        "torchrun-2-machines",
        "deepspeed-1",
        "deepspeed-2",
        "openmpi",
        "pmi",
        "bare",
        "srun",
    ],
)
def test_the_launcher_and_its_world_are_read_from_its_variables(
    env: dict[str, str], launcher: str, world: World
) -> None:
    assert launched_world(env) == (launcher, world)


PDSH = "DeepSpeed's `pdsh` multi-node launcher, given --hostfile None, started a world of 1 process(es)"


@pytest.mark.parametrize(
    ("env", "launch", "expected"),
    [
        # accelerate + DeepSpeed on two machines: issue 19's default (pdsh) path, and `standard`
        (deepspeed_env(1, 1), asked(2, 2), PDSH),
        (deepspeed_env(1, 1, machine=0), asked(2, 2, rank=1), PDSH),
        (deepspeed_env(1, 2), asked(2, 4, launcher="nossh"), "DeepSpeed's `nossh` multi-node launcher"),
        (torchrun_env(2, 2), asked(2, 2, launcher="standard"), None),
        # accelerate + DDP (torchrun inside accelerate)
        (torchrun_env(1, 2), asked(1, 2), None),
        (torchrun_env(2, 2, machine=1), asked(2, 2, rank=1), None),
        (torchrun_env(1, 2), asked(1, None), None),  # no count given: accelerate's choice
        (torchrun_env(1, 2), asked(1, 2, rank=1), "got --machine_rank 1 but 1 machine(s)"),
        (torchrun_env(1, 2), asked(1, 4), "asked for 1 machine (4 processes in all) but torchrun made"),
        # accelerate's single-process launcher: --cpu and MULTI_CPU configs without mpirun
        ({}, asked(1, 2), "started this process alone"),
        ({}, asked(1, 1), None),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, asked(1, 2), None),  # mpirun + a MULTI_CPU config
        # torchrun and the deepspeed command run directly: their own world is what was asked
        (torchrun_env(2, 8), None, None),
        (deepspeed_env(2, 4), None, None),
        # srun directly: each task alone
        (srun_env(2, 2), None, "srun started 2 tasks that each run peftrun alone"),
        (srun_env(1, 1), None, None),
        # srun, one launcher per node (what `peftrun slurm` writes), and its mistakes
        ({**srun_env(2, 2), **torchrun_env(2, 4)}, asked(2, 4, launcher="standard"), None),
        ({**srun_env(2, 2), **torchrun_env(1, 2)}, asked(1, 2), "srun started 2 torchrun launchers but each"),
        ({**srun_env(4, 2), **torchrun_env(2, 4)}, asked(2, 4), "(`srun --ntasks-per-node=1`)"),
        ({**srun_env(2, 2), **deepspeed_env(2, 4)}, None, None),  # deepspeed --no_ssh on each node
        ({**srun_env(2, 2), **deepspeed_env(1, 2)}, None, "srun started 2 deepspeed launchers but each"),
        # a batch script (no srun step) running one process of a many-task allocation
        ({**srun_env(4, 2, step="4294967291")}, None, None),
        ({"SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_PROCID": "0"}, None, None),
    ],
)
def test_a_world_other_than_the_one_asked_for_is_refused(
    env: dict[str, str], launch: AccelerateLaunch | None, expected: str | None
) -> None:
    message = launch_world_error(env, launch)
    if expected is None:
        assert message is None
    else:
        assert message is not None and expected in message, message
        assert "\n" not in message


# ---- reading `accelerate launch` back --------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "args"),
    [
        (["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "x.py"], ["--cpu", "x.py"]),
        (["accelerate", "launch", "-m", "peftrun", "r.yaml"], ["-m", "peftrun", "r.yaml"]),
        (["python", "-m", "accelerate.commands.launch", "x.py"], ["x.py"]),
        (["/venv/bin/python", "/venv/bin/accelerate-launch", "x.py"], ["x.py"]),
        (["/venv/bin/python", "/venv/bin/accelerate", "config"], None),
        (["/venv/bin/python", "-m", "peftrun", "launch"], None),
        (["/venv/bin/python", "/venv/bin/deepspeed", "--hostfile", "None", "x.py"], None),
        ([], None),
    ],
)
def test_the_accelerate_launch_command_is_recognised(argv: list[str], args: list[str] | None) -> None:
    assert accelerate_launch_args(argv) == args


def test_command_line_wins_over_the_config_file_relative_to_the_launchers_directory(tmp_path: Path) -> None:
    multinode = yaml.safe_load((CONFIGS / "zero3.yaml").read_text())
    multinode["num_machines"] = 2
    multinode["deepspeed_config"]["deepspeed_multinode_launcher"] = "standard"
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(multinode))
    script = ["-m", "peftrun", "r.yaml"]

    issue = ["--config_file", "accelerate_configs/zero3.yaml", "--num_machines", "2", "--machine_rank", "1"]
    got = parse_accelerate_launch([*issue, "--num_processes", "2", *script], REPO)
    assert got == AccelerateLaunch(machines=2, processes=2, machine_rank=1, multinode_launcher="pdsh")
    standard = [*issue, "--deepspeed_multinode_launcher", "standard", *script]
    assert parse_accelerate_launch(standard, REPO) == AccelerateLaunch(2, 2, 1, "standard")
    hyphens = ["--config-file", "two.yaml", "--num-processes", "4", "--machine-rank", "1", *script]
    assert parse_accelerate_launch(hyphens, tmp_path) == AccelerateLaunch(2, 4, 1, "standard")
    assert parse_accelerate_launch(["--config_file", str(CONFIGS / "ddp.yaml"), *script], tmp_path) == (
        AccelerateLaunch(1, 2, 0, "pdsh")
    )
    hostfile = ["--config_file", "two.yaml", "--deepspeed_hostfile", "/etc/hosts.ds", *script]
    assert parse_accelerate_launch(hostfile, tmp_path) == AccelerateLaunch(
        2, 2, 0, "standard", "/etc/hosts.ds"
    )
    assert parse_accelerate_launch(["--cpu", "--num_processes", "2", "x.py"], tmp_path) == AccelerateLaunch(
        1, 2, 0, "pdsh"
    )
    assert parse_accelerate_launch(["--num_machines", "two", "x.py"], tmp_path) is None  # not accelerate's


def test_a_process_not_started_by_accelerate_finds_no_launch() -> None:
    assert find_accelerate_launch() is None


def test_the_launch_is_read_from_the_parent_process(tmp_path: Path) -> None:
    """A parent whose command line is `python .../accelerate launch ...` (as the real console script's
    is), read back by its child from /proc, its relative config file from the parent's directory."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "zero3.yaml").write_text((CONFIGS / "zero3.yaml").read_text())
    child = (
        "from peftrun.dist.launch_world import find_accelerate_launch; print(repr(find_accelerate_launch()))"
    )
    launcher = tmp_path / "accelerate"
    launcher.write_text(
        f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)\n"
    )
    args = [
        "--config_file",
        "configs/zero3.yaml",
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "-m",
        "peftrun",
    ]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(
        [sys.executable, str(launcher), "launch", *args, "r.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == repr(AccelerateLaunch(2, 2, 1, "pdsh"))


# ---- issue 19 for real: two "machines" over loopback under ZeRO-3 ---------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_llama: Path, alpaca_file: Path) -> Path:
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(tiny_llama)},
        "data": {"path": str(alpaca_file), "max_seq_len": 256},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "train": {"max_steps": 2, "global_batch_size": 2, "micro_batch_size": 1, "lr": 1e-2},
        "checkpoint": {"at_end": False},
        "logging": {"report_to": [], "progress_bar": False, "plot": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def two_machines(recipe: Path, *extra: str) -> list[subprocess.CompletedProcess[str]]:
    """Issue 19's command on machine 0 and machine 1 at once, as a user types it on each."""
    # accelerate's pdsh path runs the `deepspeed` command (found on PATH) and appends the environment to
    # ./.deepspeed_env: the launch runs in the recipe's directory, not in the checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    port = str(free_port())

    def machine(rank: int) -> subprocess.CompletedProcess[str]:
        cmd = [str(VENV_BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "zero3.yaml")]
        cmd += ["--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2"]
        cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
        cmd += ["--rdzv_backend", "static", "--same_network", *extra, "-m", "peftrun", str(recipe)]
        return subprocess.run(cmd, env=env, cwd=recipe.parent, capture_output=True, text=True, timeout=420)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(machine, (0, 1)))


@pytest.mark.slow
def test_zero3_on_two_machines_with_deepspeeds_default_launcher_is_refused_on_both(tiny_recipe: Path) -> None:
    done = two_machines(tiny_recipe)
    line = (
        "peftrun: error: `accelerate launch` asked for 2 machines (2 processes in all), but " + PDSH + " on "
        "this machine alone: each machine would train its own copy; add `--deepspeed_multinode_launcher "
        "standard` to the command on every machine"
    )
    for rank, run in enumerate(done):
        assert run.returncode != 0, f"machine {rank} trained:\n{run.stderr[-3000:]}"
        assert line in run.stderr.splitlines(), run.stderr[-3000:]
        # accelerate reports the exit status of the deepspeed runner, which passes peftrun's on
        assert "returned non-zero exit status 2." in run.stderr
        assert "Traceback" not in run.stderr.split(line)[0], "peftrun stopped with a traceback"
    assert not (tiny_recipe.parent / "run").exists(), "something was written before the refusal"


@pytest.mark.slow
def test_zero3_on_two_machines_with_the_standard_launcher_trains_one_world(tiny_recipe: Path) -> None:
    done = two_machines(tiny_recipe, "--deepspeed_multinode_launcher", "standard")
    for rank, run in enumerate(done):
        assert run.returncode == 0, f"machine {rank}: exit {run.returncode}\n{run.stderr[-4000:]}"
    out = tiny_recipe.parent / "run"
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    steps = [
        r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert steps == [1, 2], "one history: the two machines trained one run, not two"
    assert (out / "final" / "adapter_model.safetensors").is_file()
