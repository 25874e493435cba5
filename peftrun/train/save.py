"""The end of a run: the verified final artefact, the manifest, and the checkpoint of a stopped run."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from peftrun.dist.accelerator import gathered_model
from peftrun.errors import UserError
from peftrun.model.load import DTYPES
from peftrun.model.methods import MAY_ZERO_TENSORS
from peftrun.recipe.schema import Recipe
from peftrun.run.outputs import (
    MANIFEST_FILE,
    METRICS_FILE,
    PLOT_FILE,
    RESOLVED_RECIPE,
    plot_losses,
    write_manifest,
)
from peftrun.run.run_dir import FINAL_DIR, final_dir, reload_artefact
from peftrun.run.verify import VerificationError, check_reload, check_tensors, logit_tolerance
from peftrun.staging import staged_dir
from peftrun.train.setup import Run


def write_outputs(run: Run) -> Path:
    """The final artefact, then (main process) the loss plot and the manifest."""
    final = save_final(
        run.accelerator, run.model, run.processor, run.recipe, run.probe_batch, run.initial_adapter
    )
    if run.accelerator.is_main_process:
        if run.recipe.logging.plot:
            plot_losses(run.out / METRICS_FILE, run.out / PLOT_FILE)
        trainable, total = run.parameters
        write_manifest(
            run.out / MANIFEST_FILE,
            recipe=RESOLVED_RECIPE,
            final=FINAL_DIR,
            steps=run.state.step,
            world_size=run.accelerator.num_processes,
            matmul=run.cpu.matmul,  # cpu.matmul as resolved on this machine
            cpu=asdict(run.cpu),  # what tune_for_cpu applied
            trainable_parameters=trainable,
            total_parameters=total,
            final_train_loss=run.state.last_loss,
            final_eval_loss=run.eval_loss,
            data=asdict(run.data.report),
        )
    return final


def save_final(
    accelerator: Any,
    model: Any,
    processor: Any,
    recipe: Recipe,
    probe_batch: dict[str, torch.Tensor],
    initial_adapter: Path | None = None,
) -> Path:
    """Write the deployable artefact to output_dir/final, verified before it replaces the previous one."""
    out = recipe.output_dir
    # Under ZeRO-3 no process holds whole weights: the save and its checks use a plain copy gathered
    # from all processes (a collective, see dist/accelerator.py); elsewhere every process holds them.
    gathered = gathered_model(accelerator, model, recipe, probe_batch)
    final = final_dir(out)
    if accelerator.is_main_process:
        # keep_fp32_wrapper=False: compare weights, not the mixed-precision autocast around forward.
        unwrapped = (
            gathered if gathered is not None else accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        )
        with staged_dir(final) as tmp:
            _base_config(unwrapped).use_cache = True  # off for training only; generation wants it
            convert = (
                {"path_initial_model_for_weight_conversion": str(initial_adapter)} if initial_adapter else {}
            )
            unwrapped.save_pretrained(tmp, safe_serialization=True, **convert)
            _base_config(unwrapped).use_cache = False
            processor.save_pretrained(tmp)  # the tokenizer, or the image processor
            shutil.copy(out / RESOLVED_RECIPE, tmp / RESOLVED_RECIPE)
            try:
                # A converted adapter has rank 2r: its values are checked through the logits below.
                tensors = check_tensors(
                    tmp,
                    unwrapped,
                    compare_values=initial_adapter is None,
                    each_nonzero=recipe.method.kind not in MAY_ZERO_TENSORS,
                )
                reloaded = reload_artefact(tmp, recipe)
                tolerance = logit_tolerance(DTYPES[recipe.model.dtype], recipe.model.quantization is not None)
                diff = check_reload(reloaded, unwrapped, probe_batch, tolerance)
            except VerificationError as exc:
                raise UserError(
                    f"the saved artefact failed verification and was not published: {exc}"
                ) from None
            del reloaded
        accelerator.print(
            f"[peftrun] saved {final}: {tensors} tensors verified, reload logits max rel diff {diff:.1e} (tol {tolerance:.0e})"
        )
    accelerator.wait_for_everyone()
    return final


def _base_config(model: Any) -> Any:
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config
