"""The recipe's `slurm:` section (`peftrun slurm`) and Slurm's time format."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from peftrun.errors import OptionError
from peftrun.recipe.section import Section


class SlurmConfig(Section):
    """`peftrun slurm`: the sbatch script it writes (each key also has a command-line flag)."""

    nodes: int = Field(1, gt=0, description="Nodes to run on; one `accelerate launch` per node.")
    gpus_per_node: int = Field(
        1,
        ge=0,
        description="GPUs per node, one training process each. 0 runs on CPUs (ACCELERATE_USE_CPU=true), "
        "cpu_processes_per_node processes per node.",
    )
    cpu_processes_per_node: int = Field(
        1, gt=0, description="Training processes per node when gpus_per_node is 0."
    )
    cpus_per_task: int | None = Field(
        None, gt=0, description="CPU cores per node for its training processes (--cpus-per-task)."
    )
    time: str | None = Field(
        None,
        description="Time limit (--time), e.g. 24:00:00 or 2-00:00:00; the job checkpoints and requeues "
        "itself before it runs out.",
    )
    partition: str | None = Field(None, description="Partition (--partition).")
    account: str | None = Field(None, description="Account to charge (--account).")
    job_name: str | None = Field(None, description="Job name (--job-name); default: the output_dir's name.")
    signal_lead_s: int = Field(
        300,
        ge=1,
        le=65535,
        description="Seconds before the time limit at which Slurm sends USR1 (it may come up to 60 s "
        "earlier): enough to finish a step and write a checkpoint.",
    )
    port: int | None = Field(
        None,
        ge=1024,
        le=65535,
        description="Rendezvous port on the head node; default 20000 + job id % 10000 (jobs sharing a node "
        "do not collide).",
    )
    accelerate_config: str | None = Field(
        None,
        description="accelerate config for every node (e.g. accelerate_configs/zero3.yaml); default: DDP.",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the launch, e.g. 'module load cuda/12.4' or 'source venv/bin/activate'; "
        "srun passes the environment they set to every node.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables exported for training, e.g. {NCCL_DEBUG: INFO, GLOO_SOCKET_IFNAME: eth0}; "
        "values are double-quoted, so $VARS expand on the node.",
    )
    sbatch: list[str] = Field(
        default_factory=list,
        description="Extra #SBATCH options, e.g. ['--qos=high', '--exclusive', '--mem=0']; sbatch does not expand "
        "$VARIABLES there, so they are refused.",
    )

    @field_validator("time", mode="before")
    @classmethod
    def _time_as_written(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 24:00:00 as the number 86400 (base 60): what was meant is lost.
            raise ValueError("quote the time limit, e.g. '24:00:00': YAML reads it unquoted as a number")
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env_values_as_text(cls, value: Any) -> Any:
        # YAML reads `OMP_NUM_THREADS: 4` as a number and `X: true` as a bool; the shell wants text.
        if not isinstance(value, dict):
            return value
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}

    @model_validator(mode="after")
    def _signal_before_the_limit(self) -> SlurmConfig:
        limit = slurm_time_seconds(self.time) if self.time else None
        if limit is not None and self.signal_lead_s >= limit:
            raise ValueError(
                f"slurm.signal_lead_s ({self.signal_lead_s} s) must be shorter than the time limit "
                f"{self.time} ({limit} s), or the job is told to stop before it starts"
            )
        return self

    @model_validator(mode="after")
    def _sbatch_lines_are_literal(self) -> SlurmConfig:
        # Everything here lands on #SBATCH lines, which sbatch reads before any shell runs.
        words = {"partition": self.partition, "account": self.account, "job_name": self.job_name}
        for key, value in words.items():
            if value is not None and (not value or "$" in value or any(c.isspace() for c in value)):
                raise OptionError(key, f"'{value}': one word without $VARIABLES (it goes on an #SBATCH line)")
        if self.time is not None and not _SLURM_TIME.match(self.time):
            raise OptionError(
                "time", f"'{self.time}': expected minutes, HH:MM:SS or D-HH:MM:SS (e.g. 24:00:00)"
            )
        for i, option in enumerate(self.sbatch):
            if "$" in option or not option.strip().removeprefix("#SBATCH").strip():
                raise OptionError(
                    f"sbatch.{i}", f"'{option}': an option without $VARIABLES (sbatch does not expand them)"
                )
        for name in self.env:
            if not name.isidentifier():
                raise OptionError(f"env.{name}", "not a valid environment variable name")
        return self


_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")


def slurm_time_seconds(text: str) -> int | None:
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None if unparsable."""
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        day_count = int(days) if days else 0
    except ValueError:
        return None
    if days:  # after a day count: hours, then minutes and seconds
        parts = [*parts, 0, 0][:3]
        return day_count * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    factors = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}.get(len(parts))
    return None if factors is None else sum(p * f for p, f in zip(parts, factors, strict=True))
