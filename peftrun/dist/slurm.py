"""`peftrun slurm`: a multi-node sbatch script that is right the first time and survives preemption.

What the shipped templates of other tools get wrong, and what the script here does instead:
- `#SBATCH --nodes=$NODES` never expands (sbatch reads #SBATCH lines before any shell runs): every
  #SBATCH value is written out literally, and `$` is refused there.
- every node taking rank 0: one srun task per node, each passing its own `$SLURM_NODEID` as
  `--machine_rank`; the head's address comes from Slurm (`scontrol show node`), since node names
  need not resolve.
- the launcher killed by the time-limit warning: `--signal=USR1@lead` (plain form) sends USR1 to
  every process of the step, launcher included, and USR1's default action kills. The launcher is
  started with USR1 ignored; the training processes install their own handler (signals.py), finish
  their step, checkpoint, and rank 0 requeues the job (`--requeue`, log in `--open-mode=append`).
  `B:USR1` would signal only the batch shell, which would then have to forward it by hand.
- a requeued job starting from scratch: training resumes from the newest complete checkpoint
  whenever SLURM_RESTART_COUNT is set (checkpoint.resolve_resume).

`render_script` is pure (golden files in tests/golden/); `write_job` keeps the script and a snapshot
of the resolved recipe (a requeued job must not pick up later edits) in `output_dir/slurm/`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from peftrun.dist.accelerator import grad_accum_steps
from peftrun.errors import UserError
from peftrun.recipe.load import recipe_to_yaml
from peftrun.recipe.schema import Recipe, SlurmConfig
from peftrun.staging import staged_file

SLURM_DIR = "slurm"
SCRIPT_FILE = "job.sbatch"
RECIPE_FILE = "recipe.yaml"
LOG_PATTERN = "%x-%j.out"  # sbatch expands %x (job name) and %j (job id) itself


@dataclass(frozen=True)
class SlurmJob:
    """Everything the script depends on; paths are as the job sees them from `workdir`."""

    settings: SlurmConfig
    output_dir: Path  # the recipe's, relative to workdir or absolute
    workdir: Path  # absolute: the job's working directory (--chdir)
    deepspeed: bool  # the accelerate config is a DeepSpeed one (needs the standard multinode launcher)

    @property
    def on_cpu(self) -> bool:
        return self.settings.gpus_per_node == 0

    @property
    def processes_per_node(self) -> int:
        return self.settings.cpu_processes_per_node if self.on_cpu else self.settings.gpus_per_node

    @property
    def total_processes(self) -> int:
        return self.settings.nodes * self.processes_per_node

    @property
    def job_dir(self) -> Path:
        return self.output_dir / SLURM_DIR

    @property
    def name(self) -> str:
        return self.settings.job_name or re.sub(r"[^\w.-]", "_", self.output_dir.resolve().name)


def plan_job(recipe: Recipe, workdir: Path) -> SlurmJob:
    """Check what can be checked before queueing (a mistake must not cost a wait in the queue)."""
    settings = recipe.slurm
    deepspeed = False
    if settings.accelerate_config is not None:
        config_path = workdir / settings.accelerate_config
        if not config_path.is_file():
            raise UserError(f"slurm.accelerate_config: '{settings.accelerate_config}': no such file")
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(
                f"slurm.accelerate_config: '{settings.accelerate_config}': not valid YAML: {exc}"
            ) from None
        deepspeed = isinstance(config, dict) and config.get("distributed_type") == "DEEPSPEED"
    job = SlurmJob(settings, recipe.output_dir, workdir.resolve(), deepspeed)
    for what, path in (("output_dir", job.output_dir), ("the working directory", job.workdir)):
        if re.search(r"[\s$%'\"]", str(path)):
            raise UserError(
                f"{what}: '{path}' goes on an #SBATCH line, which cannot hold spaces, quotes, $ or %"
            )
    grad_accum_steps(recipe, job.total_processes)  # global_batch_size must split over every process
    return job


def render_script(job: SlurmJob) -> str:
    s = job.settings
    kind = "CPU" if job.on_cpu else "GPU"
    script_path = job.job_dir / SCRIPT_FILE
    sbatch = [
        f"--job-name={job.name}",
        f"--nodes={s.nodes}",
        "--ntasks-per-node=1",
        *([] if job.on_cpu else [f"--gpus-per-node={s.gpus_per_node}"]),
        *([f"--cpus-per-task={s.cpus_per_task}"] if s.cpus_per_task else []),
        *([f"--time={s.time}"] if s.time else []),
        *([f"--partition={s.partition}"] if s.partition else []),
        *([f"--account={s.account}"] if s.account else []),
        f"--chdir={job.workdir}",
        f"--output={job.job_dir / LOG_PATTERN}",
        "--open-mode=append",
        "--requeue",
        f"--signal=USR1@{s.signal_lead_s}",
        *(line.strip().removeprefix("#SBATCH").strip() for line in s.sbatch),
    ]
    lines = [
        "#!/bin/bash",
        f"# Written by `peftrun slurm` for {job.output_dir}: {s.nodes} node(s) x {job.processes_per_node} "
        f"{kind} process(es) = {job.total_processes} training processes.",
        f"# Submit (again): sbatch {script_path}",
        *(f"#SBATCH {option}" for option in sbatch),
        "",
        "# Stop at the first failing line: a missing module must not start a job that cannot work.",
        "set -eo pipefail",
    ]
    if s.setup:
        lines += [
            "",
            "# Site setup (slurm.setup); srun passes the environment it leaves to every node.",
            *s.setup,
        ]
    exports = ({"ACCELERATE_USE_CPU": "true"} if job.on_cpu else {}) | s.env
    if exports:
        sources = [*(["CPU mode: accelerate runs the processes on CPUs, over gloo"] if job.on_cpu else [])]
        sources += ["slurm.env"] if s.env else []
        lines += ["", f"# Training environment ({'; '.join(sources)})."]
        lines += [f'export {name}="{_double_quoted(value)}"' for name, value in exports.items()]
    port = str(s.port) if s.port else "$((20000 + SLURM_JOB_ID % 10000))"
    lines += [
        "",
        "# --num_processes below counts on this many nodes: a different allocation would hang the rendezvous.",
        f'if [ "$SLURM_NNODES" != {s.nodes} ]; then',
        f'    echo "peftrun: this script is for {s.nodes} node(s), the job has $SLURM_NNODES: write it again with'
        f' peftrun slurm --nodes $SLURM_NNODES" >&2',
        "    exit 2",
        "fi",
        "",
        "# Rendezvous on the allocation's first node, at the address Slurm knows it by (names need not resolve).",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        "head_addr=$(scontrol show node \"$head_node\" -o | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')",
        'export PEFTRUN_HEAD_ADDR="${head_addr:-$head_node}"',
        f"export PEFTRUN_HEAD_PORT={port}",
        'echo "[peftrun] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:'
        ' head $head_node at $PEFTRUN_HEAD_ADDR:$PEFTRUN_HEAD_PORT"',
        "",
        "# One task per node, each starting its node's training processes. Slurm's USR1 (time-limit warning)",
        "# reaches every process of the step: the launcher ignores it, the training processes catch it, finish",
        "# their step, write a checkpoint and requeue the job, which then resumes from that checkpoint.",
        f"srun {' '.join(_srun_options(job))} bash -c '",
        'trap "" USR1',
        'echo "[peftrun] node $SLURMD_NODENAME: machine rank $SLURM_NODEID of $SLURM_NNODES"',
        "exec " + " \\\n    ".join(_launch_lines(job)) + "'",
    ]
    script = "\n".join(lines) + "\n"
    for line in script.splitlines():
        if line.startswith("#SBATCH") and "$" in line:  # refused above and by the schema: never written
            raise RuntimeError(f"an #SBATCH line would hold a variable: {line}")
    return script


def _srun_options(job: SlurmJob) -> list[str]:
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from the job: it is given again.
    cpus = [f"--cpus-per-task={job.settings.cpus_per_task}"] if job.settings.cpus_per_task else []
    # --kill-on-bad-exit: a node that fails ends the job instead of leaving the others in a collective.
    return ["--ntasks-per-node=1", *cpus, "--kill-on-bad-exit=1", "--label"]


def _launch_lines(job: SlurmJob) -> list[str]:
    """`accelerate launch` for one node, one group of options a line (inside the single-quoted bash -c)."""
    if job.settings.accelerate_config:
        backend = f"--config_file {_single_quote_safe(job.settings.accelerate_config)}"
    else:
        # accelerate refuses --multi_gpu for one process; a single process needs no backend option.
        backend = "--multi_gpu" if job.total_processes > 1 else ""
    lines = [f"accelerate launch {backend}".rstrip()]
    lines += [
        f'--num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" --num_processes {job.total_processes}',
        '--main_process_ip "$PEFTRUN_HEAD_ADDR" --main_process_port "$PEFTRUN_HEAD_PORT"',
        "--rdzv_backend static --same_network"
        # accelerate's default for DeepSpeed across nodes is pdsh (ssh from the head node): srun starts them.
        + (" --deepspeed_multinode_launcher standard" if job.deepspeed else ""),
        f"-m peftrun train {_single_quote_safe(str(job.job_dir / RECIPE_FILE))}",
    ]
    return lines


def _single_quote_safe(text: str) -> str:
    """A shell word that can sit inside the script's single-quoted `bash -c '...'`."""
    if "'" in text:
        raise UserError(f"'{text}': a path with a single quote cannot be used in the Slurm script")
    quoted = shlex.quote(text)
    return f'"{text}"' if quoted != text else text


def _double_quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")


# ---- writing and submitting ------------------------------------------------------------------------------


def write_job(job: SlurmJob, recipe: Recipe) -> Path:
    """Write the recipe snapshot and the script into output_dir/slurm, each atomically; the script's path."""
    directory = job.workdir / job.job_dir
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / RECIPE_FILE, recipe_to_yaml(recipe))
    script = directory / SCRIPT_FILE
    _write_atomic(script, render_script(job), mode=0o755)
    return script


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    with staged_file(path, mode=mode) as tmp:
        tmp.write_text(text)


def submit(script: Path) -> str:
    """`sbatch script`; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(
            "sbatch not found: run this on a Slurm login node (or use --dry-run to see the script)"
        )
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise UserError(f"sbatch {script}: {last[0]}")
    return done.stdout.strip().split(";")[0]
