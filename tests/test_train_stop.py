"""A signal mid-run: train() stops at the next step boundary, checkpoints, and a resume finishes the run."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peftrun.dist.signals import STOP_SIGNALS
from peftrun.recipe.load import load_recipe
from peftrun.train.loop import train


@pytest.fixture
def restore_signal_handlers() -> Iterator[None]:
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint_and_resume_finishes(
    write_recipe: Any, restore_signal_handlers: None
) -> None:
    path: Path = write_recipe(train={"max_steps": 12, "micro_batch_size": 2})
    recipe = load_recipe(path, [])
    metrics = recipe.output_dir / "metrics.jsonl"

    def signal_after_the_first_step() -> None:
        while not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_after_the_first_step, daemon=True).start()
    stopped = train(recipe)
    assert stopped.stopped_by == "SIGTERM" and stopped.final_dir is None
    assert 1 <= stopped.steps < 12 and len(stopped.losses) == stopped.steps
    assert (recipe.output_dir / "checkpoints" / f"step-{stopped.steps:08d}").is_dir()
    assert not (recipe.output_dir / "final").exists()

    resumed = train(load_recipe(path, ["train.resume=auto"]))
    assert resumed.stopped_by is None and resumed.final_dir is not None
    assert resumed.steps == 12 and len(resumed.losses) == 12 - stopped.steps
