"""Several LoRA adapters folded into one through peft's add_weighted_adapter, then merged like any adapter.

peft combines whatever it is given; some combinations give wrong models without an error, so they are
refused here with the reason (checked on the adapter configs, before any weight is loaded):
- DoRA: the combined adapter keeps the first adapter's DoRA flag but no magnitudes;
- rsLoRA: the combined adapter's scaling is alpha/r with alpha = r, rsLoRA's would be sqrt(r);
- modules_to_save: the combined adapter does not carry them, so they would be silently dropped;
- mixed ranks (or rank patterns) for the combinations that add A and B matrices elementwise;
- adapters trained on different bases.

Combining reads the adapters' matrices only, so the base peft builds its layers on holds no weights
(shape_only_base): memory is the adapters, not the model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from peftrun.errors import UserError, did_you_mean
from peftrun.merge.sources import ADAPTER_CONFIG, MergeInputs
from peftrun.run.verify import ADAPTER_WEIGHTS

SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
WITH_DENSITY = (
    "ties",
    "dare_ties",
    "dare_linear",
    "magnitude_prune",
    "ties_svd",
    "dare_ties_svd",
    "dare_linear_svd",
)
COMBINATIONS = (
    *SAME_RANK,
    "cat",
    "svd",
    "ties_svd",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune_svd",
)
COMBINED = "combined"


def check_combination(
    adapters: list[MergeInputs], weights: list[float], combination: str, density: float | None
) -> None:
    if combination not in COMBINATIONS:
        raise UserError(
            f"--combination: unknown '{combination}'{did_you_mean(combination, COMBINATIONS)} "
            f"(choose from {', '.join(COMBINATIONS)})"
        )
    if len(adapters) < 2:
        raise UserError(
            "--adapters: give two or more adapters to combine (one adapter: peftrun merge ADAPTER)"
        )
    if len(weights) != len(adapters):
        raise UserError(
            f"--weights: {len(weights)} weight(s) for {len(adapters)} adapters; give one per adapter"
        )
    needs_density = combination in WITH_DENSITY or combination.startswith("magnitude_prune")
    if needs_density and (density is None or not 0.0 < density <= 1.0):
        raise UserError(f"--density: combination '{combination}' needs a density in (0, 1] (got {density})")
    if not needs_density and density is not None:
        raise UserError(f"--density: combination '{combination}' does not prune; drop --density")
    bases = {str(a.base_dir.resolve()) for a in adapters}
    if len(bases) > 1:
        raise UserError(
            f"--adapters: the adapters were trained on different bases ({', '.join(sorted(bases))})"
        )
    ranks = {}
    for adapter in adapters:
        config = adapter.adapter_config
        where = f"--adapters: {adapter.adapter_dir}"
        if str(config.get("peft_type")).upper() != "LORA":
            raise UserError(
                f"{where}: a {config.get('peft_type')} adapter; only LoRA adapters can be combined"
            )
        if config.get("use_dora"):
            raise UserError(f"{where}: DoRA adapters cannot be combined (peft drops their magnitudes)")
        if config.get("use_rslora"):
            raise UserError(
                f"{where}: rsLoRA adapters cannot be combined (peft would rescale them as plain LoRA)"
            )
        if config.get("modules_to_save"):
            raise UserError(
                f"{where}: has modules_to_save ({', '.join(config['modules_to_save'])}), which a combined "
                "adapter cannot carry"
            )
        if combination in SAME_RANK and config.get("rank_pattern"):
            raise UserError(
                f"{where}: per-module ranks (rank_pattern) cannot be combined with '{combination}'"
            )
        ranks[str(adapter.adapter_dir)] = config["r"]
    if combination in SAME_RANK and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{path} r={r}" for path, r in ranks.items())
        raise UserError(
            f"--combination {combination} adds the adapters' A and B matrices, which needs one rank; got {listed} "
            "(use svd or cat for mixed ranks)"
        )


def combine_adapters(
    adapters: list[MergeInputs],
    weights: list[float],
    combination: str,
    density: float | None,
    svd_rank: int | None,
    seed: int,
    out_dir: Path,
) -> MergeInputs:
    """Write the combined adapter to out_dir; returns the inputs to merge it with the (shared) base."""
    from peft import PeftModel

    check_combination(adapters, weights, combination, density)
    first = adapters[0]
    model = PeftModel.from_pretrained(shape_only_base(first), first.adapter_dir, adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], start=1):
        model.load_adapter(str(adapter.adapter_dir), adapter_name=f"a{i}")
    torch.manual_seed(seed)  # DARE prunes at random
    model.add_weighted_adapter(
        [f"a{i}" for i in range(len(adapters))],
        weights,
        COMBINED,
        combination_type=combination,
        density=density,
        svd_rank=svd_rank,
    )
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        model.save_pretrained(tmp, selected_adapters=[COMBINED])
        saved = Path(tmp) / COMBINED
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.move(str(saved / name), out_dir / name)
    config: dict[str, Any] = json.loads((out_dir / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = first.base
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return replace(first, adapter_dir=out_dir)


def shape_only_base(inputs: MergeInputs) -> Any:
    """The base's architecture with every weight one shared fp32 zero broadcast to its shape: peft builds
    its adapter layers from the base's modules (types, shapes, dtype, device) and add_weighted_adapter
    reads only the adapters' matrices. Holds no memory; a write into a base weight would raise."""
    from peftrun.merge.walk import weightless_model

    model = weightless_model(inputs)
    zero = torch.zeros((), dtype=torch.float32)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(zero.expand(param.shape), requires_grad=False))
    return model
