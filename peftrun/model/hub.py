"""Hub ids without a network: one clear line instead of 30 s of retries."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from peftrun.errors import UserError

_PATH_PREFIXES = (".", "/", "~")


def looks_like_local_path(name: str) -> bool:
    """A Hub id is 'name' or 'org/name'; anything else is meant as a path on disk."""
    return name.startswith(_PATH_PREFIXES) or name.count("/") > 1 or (os.sep in name and name.count("/") != 1)


@functools.cache
def hub_unreachable_reason() -> str | None:
    """None when the Hub answers a TCP connect within 3 s; otherwise why not."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection(
            (endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=3
        ):
            return None
    except OSError as exc:
        return f"{endpoint.hostname} is unreachable ({exc.strerror or exc})"


def require_local_or_reachable(name: str, key: str, is_cached: bool) -> None:
    """Raise a UserError when `name` (from recipe key `key`) can be neither found on disk nor fetched."""
    if Path(name).expanduser().exists():
        return
    if looks_like_local_path(name):
        raise UserError(f"{key}: no such directory: {Path(name).expanduser().resolve()}")
    if is_cached:
        return
    reason = hub_unreachable_reason()
    if reason is not None:
        raise UserError(
            f"{key}: '{name}' is not a local path and not in the Hugging Face cache, and the Hub cannot be "
            f"reached ({reason}); download it where there is a network and point {key} at the directory"
        )
