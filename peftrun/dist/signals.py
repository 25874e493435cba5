"""Stop requests (Ctrl-C, SIGTERM, Slurm's USR1): finish the step, checkpoint, exit or requeue.

Handlers only set a flag, so a signal delivered twice (Slurm and the launcher both forward
SIGTERM) is harmless. A third Ctrl-C means "now": it raises KeyboardInterrupt.

Under Slurm (see slurm.py): USR1 is the warning the job asked for before its time limit (or an
operator's `scancel --signal=USR1`); after the checkpoint, rank 0 requeues the job, which restarts
with SLURM_RESTART_COUNT set and resumes from that checkpoint. SIGTERM only stops: it is what
`scancel` sends to cancel a job, and when Slurm preempts a job with requeue it requeues it itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from types import FrameType

# What a scheduler sends (SIGTERM: stop; SIGUSR1: the time-limit warning a `peftrun slurm` job asks for).
SCHEDULER_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)
STOP_SIGNALS = (signal.SIGINT, *SCHEDULER_SIGNALS)
REQUEUE_SIGNAL = "SIGUSR1"

_received_early: list[str] = []  # scheduler signals that came before a StopRequest was installed


def catch_scheduler_signals() -> None:
    """Remember SIGTERM/USR1 from now on, for the StopRequest that training installs later.

    `peftrun train` calls this before its heavy imports: under `peftrun slurm` the launcher ignores
    USR1 and its training processes inherit that, so a time-limit warning that arrived while they
    import and load would otherwise be lost, and the job killed at its limit without a requeue.
    """

    def remember(signum: int, frame: FrameType | None) -> None:
        _received_early.append(signal.Signals(signum).name)

    for sig in SCHEDULER_SIGNALS:
        signal.signal(sig, remember)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._interrupts = 0

    def install(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> StopRequest:
        for sig in signals:
            signal.signal(sig, self._handle)
        if _received_early:
            self._handle(signal.Signals[_received_early[0]], None)
            _received_early.clear()
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts >= 3:
                raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            print(
                f"\n[peftrun] {self.signal_name}: finishing this step, then saving a checkpoint", flush=True
            )

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def wants_requeue(self) -> bool:
        """Stopped by USR1 inside a Slurm job: the job should run again after the checkpoint."""
        return self.signal_name == REQUEUE_SIGNAL and "SLURM_JOB_ID" in os.environ


def slurm_restarts() -> int:
    """How often Slurm has requeued the running job (0 outside Slurm or on the first run)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def requeue_slurm_job() -> str:
    """`scontrol requeue` this job (it must allow requeueing: `peftrun slurm` scripts do); a line to log.

    Slurm then SIGTERMs the job's processes (harmless here: the checkpoint is written and the
    handlers only set a flag) and runs the job again once it is scheduled.
    """
    job_id = os.environ.get("SLURM_JOB_ID", "")
    scontrol = shutil.which("scontrol")
    if not job_id or scontrol is None:
        return "not requeued: not in a Slurm job with scontrol available; resubmit to continue"
    done = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    # Slurm may SIGTERM the job's processes, scontrol included, before scontrol has returned: the
    # requeue went through then.
    if done.returncode not in (0, -signal.SIGTERM):
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return f"scontrol requeue {job_id} failed ({why[0]}); resubmit the job to continue"
    return f"requeued Slurm job {job_id}: it resumes from this checkpoint when it runs again"
