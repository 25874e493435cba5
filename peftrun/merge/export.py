"""peftrun export: what leaves a run directory for deployment.

`--format adapter`: a clean adapter directory that peft and vLLM load as is: adapter_config.json (with the
base model recorded and the target modules peft resolved), adapter_model.safetensors and the tokenizer the
run trained with; nothing else from the run (no checkpoints, optimizer state or logs).
`--format merged`: `peftrun merge`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peftrun.errors import UserError
from peftrun.merge import CHECKS, MergeOptions, merge, meta_model
from peftrun.merge.combine import combine_adapters
from peftrun.merge.files import TOKENIZER_FILES
from peftrun.merge.qlora import QLORA_BASES
from peftrun.merge.sources import (
    ADAPTER_CONFIG,
    MergeInputs,
    inputs_from_adapter,
    inputs_from_run,
    is_run_dir,
)
from peftrun.merge.spec import DEFAULT_MAX_SHARD_SIZE, MergeSpec, spec_from_args
from peftrun.run.safe_paths import check_output, check_replaceable_dir, staged_output
from peftrun.run.verify import ADAPTER_WEIGHTS

FORMATS = ("adapter", "merged", "gguf")


def inputs_for(source: str, base: str | None) -> MergeInputs:
    """A run directory (its recipe knows the base) or an adapter directory (+ --base)."""
    path = Path(source)
    if not path.is_dir():
        raise UserError(f"{source}: no such directory (expected a run directory or an adapter directory)")
    if is_run_dir(path):
        if base is not None:
            raise UserError(f"--base: {source} is a run directory, whose recipe names its base; drop --base")
        return inputs_from_run(path)
    return inputs_from_adapter(path, base)


def export_adapter(inputs: MergeInputs, out_dir: Path, overwrite: bool = False) -> Path:
    check_replaceable_dir(out_dir, "--out", overwrite)
    config: dict[str, Any] = inputs.adapter_config
    config["base_model_name_or_path"] = inputs.base
    config["revision"] = inputs.revision
    config["inference_mode"] = True
    config["target_modules"] = short_target_modules(config.get("target_modules"), inputs)
    out_dir = out_dir.resolve()
    with staged_output(out_dir) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        shutil.copy(inputs.adapter_dir / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
        for name in TOKENIZER_FILES:
            if (inputs.tokenizer_source / name).is_file():
                shutil.copy(inputs.tokenizer_source / name, tmp / name)
    return out_dir


def short_target_modules(targets: Any, inputs: MergeInputs) -> Any:
    """peft records 'all-linear' as every full module name; serving stacks (vLLM) match leaf names
    ('q_proj'). Leaf names are written when they select exactly the same modules of the base."""
    if not isinstance(targets, list) or not any("." in t for t in targets):
        return sorted(targets) if isinstance(targets, list) else targets
    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    names = [n for n, _ in meta_model(inputs).named_modules()]
    selected = {n for n in names if n.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if selected == set(targets) else sorted(targets)


# ---- the command line's two commands -----------------------------------------------------------------------


def merge_options(spec: MergeSpec) -> MergeOptions:
    return MergeOptions(
        dtype=spec.dtype,
        max_shard_size=spec.max_shard_size,
        check=spec.check,
        qlora_base=spec.qlora_base,
        overwrite=spec.overwrite,
    )


def merge_command(args: argparse.Namespace) -> int:
    return run_merge(spec_from_args(args))


def run_merge(spec: MergeSpec) -> int:
    """`peftrun merge`: one adapter into its base, or several combined first."""
    if spec.adapters:
        return _combine(spec, spec.adapters)
    if spec.source is None:
        raise UserError("merge: give a run or adapter directory, or --adapters A B ... to combine several")
    misplaced = spec.combining_options_without_adapters()
    if misplaced:
        flag = misplaced[0].replace("_", "-")
        raise UserError(f"--{flag}: only with --adapters (combining several adapters)")
    inputs = inputs_for(spec.source, spec.base)
    if spec.out is None and not is_run_dir(Path(spec.source)):
        raise UserError(
            "--out: required when merging an adapter directory (a run directory defaults to RUN/merged)"
        )
    out = Path(spec.out) if spec.out else Path(spec.source) / "merged"
    checked_output(out, [spec.source], [inputs])
    merge(inputs, out, merge_options(spec))
    return 0


def _combine(spec: MergeSpec, sources: list[str]) -> int:
    if spec.source is not None:
        raise UserError(f"merge: give either a directory ({spec.source}) or --adapters, not both")
    if spec.out is None:
        raise UserError("--out: required when combining adapters")
    adapters = [
        inputs_for(a, spec.base) if not is_run_dir(Path(a)) else inputs_from_run(Path(a)) for a in sources
    ]
    weights = spec.weights if spec.weights is not None else [1.0 / len(adapters)] * len(adapters)
    out = Path(spec.out)
    combination = spec.combination or "linear"
    checked_output(out, sources, adapters)
    with tempfile.TemporaryDirectory(prefix=".combined-adapter-", dir=out.resolve().parent) as tmp:
        combined = combine_adapters(
            adapters, weights, combination, spec.density, spec.svd_rank, spec.seed, Path(tmp)
        )
        print(f"[peftrun] combined {len(adapters)} adapters ({combination}, weights {weights})")
        merge(combined, out, merge_options(spec))
    return 0


def export_command(args: argparse.Namespace) -> int:
    from peftrun.merge.model_card import publish_export

    if args.format == "gguf":  # also takes a merged directory, which has no adapter inputs
        from peftrun.merge.gguf import export_gguf

        publish_export(args, export_gguf(args))
        return 0
    spec = spec_from_args(args)  # the merge settings; `run` and `format` are export's own
    inputs = inputs_for(args.run, spec.base)
    out = Path(args.out)
    checked_output(out, [args.run], [inputs])
    if args.format == "merged":
        merge(inputs, out, merge_options(spec))
    else:
        export_adapter(inputs, out, spec.overwrite)
        print(f"[peftrun] exported the adapter of {args.run} to {out} (base: {inputs.base})")
    publish_export(args, inputs.base)
    return 0


def checked_output(out: Path, sources: list[str], inputs: list[MergeInputs]) -> Path:
    """--out must stay clear of every directory the command reads (see safe_paths)."""
    runs = [s for s in sources if is_run_dir(Path(s))]
    read: list[str | Path] = [p for i in inputs for p in (i.adapter_dir, i.base_dir, i.tokenizer_source)]
    read += [s for s in sources if s not in runs]
    return check_output(out, "--out", inputs=read, run_dirs=runs)


def add_merge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", help="base model path or Hub id (default: the run's recipe / the adapter's record)"
    )
    parser.add_argument("--dtype", help="fp32 | bf16 | fp16 (default: the dtype the adapter was trained on)")
    parser.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="largest output shard (e.g. 2GB)"
    )
    parser.add_argument(
        "--check",
        default="full",
        choices=CHECKS,
        help="full: logits of base+adapter (peft) vs merged on a fixed batch; light: a sample of layers, "
        "one weight in memory at a time (for models too big to load)",
    )
    parser.add_argument(
        "--qlora-base",
        default="dequantized",
        choices=QLORA_BASES,
        help="QLoRA runs: merge into the NF4 weights the adapter was trained on (dequantized), or into the "
        "original weights (the verdict reports the difference to the trained model)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists and peftrun wrote it"
    )
