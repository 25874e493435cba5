"""Stop requests (Ctrl-C, SIGTERM, Slurm's USR1): finish the step, checkpoint, exit.

Handlers only set a flag, so a signal delivered twice (Slurm and the launcher both forward
SIGTERM) is harmless. A third Ctrl-C means "now": it raises KeyboardInterrupt.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = tuple(
    s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None
)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._interrupts = 0

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
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
