"""I/O problems as one line naming the path, found before any model loads where possible.

`check_output_dir` runs in preflight: output_dir (or its nearest existing parent) must be a directory
that this user can write (probed with a real file, which also catches read-only file systems) with room
for a checkpoint and the final artefact. `io_error_line` turns what a failing write raises (OSError,
torch's writer errors, safetensors' errors) into one line; `cleaning_up_on_failure` removes the
staged `.tmp-*` entries a failed save leaves, so a full disk does not stay full.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peftrun.errors import UserError

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a file where a directory is expected",
    errno.EISDIR: "a directory where a file is expected",
    errno.ENOENT: "no such file or directory",
}
# What torch.save says when the disk fills under it (the OSError is lost inside its C++ writer).
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


def check_output_dir(out: Path, need_bytes: int) -> None:
    """A UserError when `out` cannot become a writable run directory with `need_bytes` free."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} is a file, not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"output_dir: {out} is under {existing}, which is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(prefix=".tmp-peftrun-probe-", dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"output_dir: {existing} is not writable ({_reason(exc)})") from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise UserError(
            f"output_dir: {existing} has {free / 2**20:.0f} MiB free; a checkpoint and the final artefact "
            f"need about {need_bytes / 2**20:.0f} MiB"
        )


def expected_save_bytes(trainable: int, total: int, full_weights: bool) -> int:
    """One checkpoint (fp32 trainable weights + AdamW's two moments) and the final artefact."""
    return 12 * trainable + 4 * (total if full_weights else trainable)


def io_error_line(exc: BaseException, where: Path | str | None = None) -> str | None:
    """One line for an I/O failure, or None when `exc` is not one."""
    if isinstance(exc, OSError) and exc.errno in _REASONS:
        path = exc.filename or where
        return f"{path}: {_reason(exc)}" if path else _reason(exc)
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILURES):
        if where is not None and _nearly_full(Path(where)):
            return f"{where}: {_REASONS[errno.ENOSPC]}"
        return f"{where or 'a file'}: writing failed ({text.splitlines()[0][:120]})"
    if type(exc).__name__ == "SafetensorError":
        return f"{where or 'a safetensors file'}: unreadable safetensors file ({text.splitlines()[0][:160]})"
    return None


def _nearly_full(path: Path) -> bool:
    """torch's writer loses the OSError; a device with (almost) nothing free says what it was."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free < 16 * 2**20


def _reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0, exc.strerror or str(exc))


@contextmanager
def cleaning_up_on_failure(directory: Path, what: str) -> Iterator[None]:
    """On an I/O failure inside the block: remove `directory`'s staged `.tmp-*` entries and raise one line."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        line = io_error_line(exc, directory)
        if line is None:
            raise
        for staged in directory.glob(".tmp-*") if directory.is_dir() else []:
            if staged.is_dir():
                shutil.rmtree(staged, ignore_errors=True)
            else:
                staged.unlink(missing_ok=True)
        raise UserError(
            f"{what} failed: {line}; the staged files were removed, earlier outputs are intact"
        ) from None


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """A file that fails to read or parse inside the block becomes one line naming `path`."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # torch/safetensors/json raise many types for one damaged file
        line = io_error_line(exc, path) or f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:160]})"
        raise UserError(line) from None
