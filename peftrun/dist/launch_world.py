"""The world a launch asked for against the world the launcher made, checked before anything loads.

A multi-machine launch can lose what the user asked for on the way to the training processes and
then train N separate copies without an error: every process sees a consistent, but smaller, world.
What reaches a process from each launcher path (accelerate 1.15, deepspeed 0.19, torch 2.13):

- `accelerate launch` passes its config and arguments on as the command it runs, not as variables:
  ACCELERATE_* carry the backend's settings but neither the number of machines nor of processes. Its
  command line (and so its config file) is read from this process's ancestry in /proc.
- DDP, and DeepSpeed with `--deepspeed_multinode_launcher standard`, run torchrun inside accelerate:
  WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_WORLD_SIZE (machines), GROUP_RANK, TORCHELASTIC_RUN_ID.
- DeepSpeed with more than one machine and any other launcher (the default is `pdsh`) is handed to
  `deepspeed --hostfile <--deepspeed_hostfile, None by default>`; without a hostfile that runner
  starts this machine's processes only: WORLD_SIZE, CROSS_SIZE (machines), CROSS_RANK, LOCAL_SIZE,
  all counting this machine alone. Each machine then trains its own copy.
- `deepspeed` run directly: the same variables, from its hostfile.
- srun: SLURM_STEP_NUM_TASKS, SLURM_STEP_NUM_NODES, SLURM_PROCID for each task of a step. srun is
  no launcher torch knows: tasks that run peftrun directly each make a world of one, and tasks that
  each run a launcher make one world only when those launchers are told of each other.

Two launches of the same single-machine command on two machines make two worlds that are each
consistent; nothing inside one process tells them apart (the run directory's owner does).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftrun.errors import UserError

# Process-count variables of MPI implementations (mpirun starts the processes itself).
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# Slurm's step ids at and above this are its batch, extern and interactive steps, not srun's.
_FIRST_SPECIAL_SLURM_STEP = 0xFFFFFFF0
# Launchers that sit between `accelerate launch` and the training process.
_INNER_LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner")
_MAX_ANCESTORS = 4


@dataclass(frozen=True)
class World:
    """Machines and processes of a training world; None where the source does not say."""

    machines: int | None
    processes: int | None

    def describe(self) -> str:
        machines = f"{self.machines} machine{'s' if self.machines != 1 else ''}"
        processes = f"{self.processes} process{'es' if self.processes != 1 else ''}"
        if self.processes is None:
            return machines
        if self.machines is None:
            return processes
        return f"{machines} ({processes} in all)"


@dataclass(frozen=True)
class AccelerateLaunch:
    """What `accelerate launch` was asked for: its command line over its config file over its defaults."""

    machines: int
    processes: int | None
    machine_rank: int
    multinode_launcher: str
    hostfile: str | None = None

    @property
    def world(self) -> World:
        return World(self.machines, self.processes)


def check_launch_world() -> None:
    """Refuse to train when the launcher made another world than the launch asked for (one line)."""
    message = launch_world_error(os.environ, find_accelerate_launch())
    if message:
        raise UserError(message)


def launch_world_error(env: Mapping[str, str], launch: AccelerateLaunch | None) -> str | None:
    """Why this process's world is not the one the launch asked for, with the fix; None when it is."""
    launcher, got = launched_world(env)
    srun_tasks = _srun_tasks(env)
    if launch is not None:
        message = _accelerate_error(launch, launcher, got)
        if message:
            return message
    if srun_tasks is not None and srun_tasks > 1:
        return _srun_error(env, srun_tasks, launcher, got)
    return None


def launched_world(env: Mapping[str, str]) -> tuple[str, World]:
    """Which launcher made this process's world (by the variables it sets) and that world."""
    world_size = _int(env, "WORLD_SIZE")
    if "GROUP_WORLD_SIZE" in env or "TORCHELASTIC_RUN_ID" in env:
        return "torchrun", World(_int(env, "GROUP_WORLD_SIZE"), world_size)
    if "CROSS_SIZE" in env:
        return "deepspeed", World(_int(env, "CROSS_SIZE"), world_size)
    for name in _MPI_SIZE_VARS:
        if name in env:
            return "mpirun", World(None, _int(env, name))
    if world_size is not None:
        return "a launcher", World(None, world_size)
    return "none", World(1, 1)


def _accelerate_error(launch: AccelerateLaunch, launcher: str, got: World) -> str | None:
    asked = launch.world
    if launch.machine_rank >= launch.machines:
        return (
            f"`accelerate launch` got --machine_rank {launch.machine_rank} but {launch.machines} machine(s) "
            f"(--num_machines or the config's num_machines): this machine would train its own copy; give "
            "every machine the same --num_machines N and its own --machine_rank 0..N-1"
        )
    if _same(asked, got):
        return None
    if launcher == "deepspeed" and launch.machines > 1:
        return (
            f"`accelerate launch` asked for {asked.describe()}, but DeepSpeed's `{launch.multinode_launcher}` "
            f"multi-node launcher, given --hostfile {launch.hostfile}, started a world of {got.processes} "
            "process(es) on this machine alone: each machine would train its own copy; "
            "add `--deepspeed_multinode_launcher standard` to the command on every machine"
        )
    if launcher == "none" and asked.processes is not None and asked.processes > 1:
        return (
            f"`accelerate launch` asked for {asked.describe()} but started this process alone (no "
            "WORLD_SIZE reached it: `--cpu` and MULTI_CPU configs start one process without mpirun): "
            "it would train alone; on CPU use ACCELERATE_USE_CPU=true with a ddp.yaml or zero*.yaml config"
        )
    return (
        f"`accelerate launch` asked for {asked.describe()} but {launcher} made a world of {got.describe()}: "
        "its processes would not train one model together; check that --num_machines, --num_processes "
        "and the config file are the same on every machine"
    )


def _srun_error(env: Mapping[str, str], tasks: int, launcher: str, got: World) -> str | None:
    if launcher == "none":
        return (
            f"srun started {tasks} tasks that each run peftrun alone (srun makes no torch world): each would "
            "train its own copy; run one launcher per node (`srun --ntasks-per-node=1 accelerate launch "
            '--num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" ...`) or let `peftrun slurm` '
            "write the job"
        )
    if got.machines is None or got.machines == tasks:
        return None
    nodes = _int(env, "SLURM_STEP_NUM_NODES")
    if nodes is not None and tasks > nodes:
        return (
            f"srun started {tasks} {launcher} launchers on {nodes} node(s) for a world of {got.describe()}: "
            "start one launcher per node (`srun --ntasks-per-node=1`)"
        )
    return (
        f"srun started {tasks} {launcher} launchers but each made a world of {got.describe()}: each would "
        'train its own copy; tell every launcher the machines, e.g. `--num_machines "$SLURM_NNODES" '
        '--machine_rank "$SLURM_NODEID"` (or let `peftrun slurm` write the job)'
    )


def _same(asked: World, got: World) -> bool:
    """Equal where both say; a count a source does not know is no disagreement."""
    pairs = ((asked.machines, got.machines), (asked.processes, got.processes))
    return all(a is None or b is None or a == b for a, b in pairs)


def _srun_tasks(env: Mapping[str, str]) -> int | None:
    """Tasks of the srun step this process belongs to; None outside one (a batch script is no srun step)."""
    step = env.get("SLURM_STEP_ID", "")
    if not step.isdigit() or int(step) >= _FIRST_SPECIAL_SLURM_STEP:
        return None
    return _int(env, "SLURM_STEP_NUM_TASKS")


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    return int(value) if value.isdigit() else None


# ---- the `accelerate launch` command line above this process ---------------------------------------


def find_accelerate_launch(pid: int | None = None) -> AccelerateLaunch | None:
    """The `accelerate launch` that started this process (directly, or through DeepSpeed's launcher).

    Read from /proc (Linux); None elsewhere, when no such ancestor is found, or when its command
    line cannot be read back.
    """
    current = os.getpid() if pid is None else pid
    for _ in range(_MAX_ANCESTORS):
        parent = _parent_pid(current)
        if parent is None or parent <= 1:
            return None
        argv = _cmdline(parent)
        launch_args = accelerate_launch_args(argv)
        if launch_args is not None:
            return parse_accelerate_launch(launch_args, _cwd(parent))
        if not any(module in argv for module in _INNER_LAUNCHER_MODULES) and not _is_deepspeed_runner(argv):
            return None
        current = parent
    return None


def accelerate_launch_args(argv: Sequence[str]) -> list[str] | None:
    """The arguments after `accelerate launch` when argv is that command (as a script or a module)."""
    for i, word in enumerate(argv[:3]):
        name = os.path.basename(word)
        if name == "accelerate" and argv[i + 1 : i + 2] == ["launch"]:
            return list(argv[i + 2 :])
        if name == "accelerate-launch":
            return list(argv[i + 1 :])
        if word == "-m" and argv[i + 1 : i + 2] == ["accelerate.commands.launch"]:
            return list(argv[i + 2 :])
    return None


def parse_accelerate_launch(args: Sequence[str], cwd: Path) -> AccelerateLaunch | None:
    """What these `accelerate launch` arguments ask for, with the config file they name (or the default
    one, which accelerate reads unless --cpu), as accelerate 1.15 combines them: the command line wins."""
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parsed = launch_command_parser().parse_args(list(args))
    except SystemExit:
        return None
    config_file = parsed.config_file
    if config_file is None and not parsed.cpu and os.path.isfile(default_config_file):
        config_file = default_config_file
    config = None
    if config_file is not None:
        try:
            config = load_config_from_file(str(cwd / config_file))
        except Exception:  # the launcher itself would have stopped on an unreadable config
            return None
    deepspeed = getattr(config, "deepspeed_config", None) or {}
    processes = _first(parsed.num_processes, getattr(config, "num_processes", None))
    return AccelerateLaunch(
        machines=int(_first(parsed.num_machines, getattr(config, "num_machines", None), 1)),
        # accelerate's config says -1 when it leaves the count to the launcher
        processes=int(processes) if processes is not None and int(processes) > 0 else None,
        machine_rank=int(_first(parsed.machine_rank, getattr(config, "machine_rank", None), 0)),
        multinode_launcher=str(
            _first(parsed.deepspeed_multinode_launcher, deepspeed.get("deepspeed_multinode_launcher"), "pdsh")
        ),
        hostfile=_first(parsed.deepspeed_hostfile, deepspeed.get("deepspeed_hostfile")),
    )


def _first(*values: Any) -> Any:
    """The first value that is set (accelerate's precedence: command line, config file, default)."""
    return next((value for value in values if value is not None), None)


def _is_deepspeed_runner(argv: Sequence[str]) -> bool:
    return any(os.path.basename(word) == "deepspeed" for word in argv[:2])


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (in parentheses) may hold spaces; the parent pid is the second field after it.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _cwd(pid: int) -> Path:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return Path.cwd()
