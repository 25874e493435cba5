"""The ZeRO-3 saves' publication: final/ appears only when the save's body found no failure, and an
earlier final/ stays as it was when it did. (The saves themselves run in tests/test_dist.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate import Accelerator

from peftrun.train.save_zero3 import _staged_save


def test_final_is_published_only_without_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    accelerator = Accelerator(cpu=True)
    final = tmp_path / "final"
    final.mkdir()
    (final / "weights").write_text("earlier")
    with _staged_save(accelerator, final) as save:
        (save.tmp / "weights").write_text("new")
        save.failure = "the check failed"
        save.report = "never printed"
    assert save.failure == "the check failed"
    assert (final / "weights").read_text() == "earlier" and "never printed" not in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["final"], "nothing of the failed save is left"

    with _staged_save(accelerator, final) as save:
        (save.tmp / "weights").write_text("new")
        save.report = "1 tensor verified"
    assert save.failure is None and (final / "weights").read_text() == "new"
    assert f"saved {final}: 1 tensor verified" in capsys.readouterr().out
