"""benchmarks/gpu.py's CPU dry path (tiny shape, 2 steps), so the script is known to work when a GPU
is lent: every side trains, and the plan's prediction sits beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_trains_each_side_and_prints_the_plan(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--sides", "lora_packed", "qlora",
           "full_packed", "lora_packed_liger", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures) == {"lora_packed", "qlora", "full_packed"}  # Liger: CUDA only, skipped here
    for side in figures.values():
        assert side["planned_bytes"] > 0 and side["tokens_per_s"] and side["final_loss"] > 0
    # Full fine-tuning holds gradients and Adam moments of every weight: the plan says more than LoRA.
    assert figures["full_packed"]["planned_bytes"] > figures["lora_packed"]["planned_bytes"]
    assert "| full_packed |" in done.stdout and "MFU = tokens/s x FLOPs/token" in done.stdout
