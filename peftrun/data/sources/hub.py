"""Datasets that `datasets` itself loads: Hub ids (failing fast, in one line, when the Hub cannot serve
them) and folders written by `save_to_disk`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftrun.errors import UserError, did_you_mean

_HUB_TIMEOUT_S = 5.0


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _probe_hub(path: str, key: str) -> None:
    """Fail fast, with one line, when the Hub cannot serve dataset `path`.

    `datasets` retries an unreachable Hub for about half a minute before failing; one request with a
    short timeout answers the same question at once.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(path, timeout=_HUB_TIMEOUT_S)
    except GatedRepoError:
        raise UserError(
            f"{key}: Hub dataset '{path}' is gated; accept its terms and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{key}: '{path}' is neither a local file nor a Hub dataset (or it is private: hf auth login)"
        ) from None
    except Exception as exc:
        raise UserError(
            f"{key}: '{path}' is not a local file, and the Hugging Face Hub cannot be reached to load it as a "
            f"dataset ({exc}); download it first, or set HF_HUB_OFFLINE=1 to use a cached copy"
        ) from None


def hub_load_args(
    path: str,
    split: str,
    subset: str | None = None,
    data_files: Sequence[str] | None = None,
    *,
    streaming: bool = False,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The keyword arguments of `datasets.load_dataset` for a Hub dataset: `subset` is its config name."""
    return {
        "path": path,
        "name": subset,
        "split": split,
        "data_files": list(data_files) if data_files is not None else None,
        "streaming": streaming,
        "cache_dir": str(cache_dir) if cache_dir else None,
    }


def load_hub(path: str, split: str, key: str, **options: Any) -> Any:
    """`datasets.load_dataset` for Hub id `path`; `options` are hub_load_args' (subset, data_files, ...)."""
    import datasets

    if not hub_offline():
        _probe_hub(path, key)
    args = hub_load_args(path, split, **options)
    try:
        return datasets.load_dataset(**args)
    except ConnectionError as exc:
        raise UserError(
            f"{key}: cannot load Hub dataset '{path}' offline and it is not in the cache ({exc})"
        ) from None
    except ValueError as exc:  # unknown split, subset and similar
        subset = f" subset '{args['name']}'" if args["name"] else ""
        raise UserError(f"{key}: cannot load Hub dataset '{path}'{subset} split '{split}': {exc}") from None


def load_saved(folder: Path, split: str, key: str) -> Any:
    """A folder written by `save_to_disk`: the Dataset, or split `split` of a DatasetDict (memory-mapped)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise UserError(f"{key}: {folder} is not a readable saved dataset ({exc})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise UserError(
                f"{key}: {folder} has no split '{split}'{did_you_mean(split, saved)} (splits: {', '.join(saved)})"
            )
        return saved[split]
    return saved
