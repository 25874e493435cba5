"""The end of a run: the verified final artefact, the manifest, and the checkpoint of a stopped run."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from peftrun.dist.accelerator import agree_on_failure, gathered_model, zero_stage
from peftrun.dist.stream_weights import renames_weights_on_save
from peftrun.errors import UserError
from peftrun.model.load import DTYPES
from peftrun.model.methods import MAY_ZERO_TENSORS, NON_ADAPTER_KINDS
from peftrun.recipe.schema import Recipe
from peftrun.run.artefact import write_artefact
from peftrun.run.io_checks import cleaning_up_on_failure
from peftrun.run.outputs import (
    MANIFEST_FILE,
    METRICS_FILE,
    PLOT_FILE,
    RESOLVED_RECIPE,
    plot_losses,
    write_manifest,
)
from peftrun.run.run_dir import FINAL_DIR, final_dir, reload_artefact
from peftrun.run.verify import (
    VerificationError,
    check_adapter_config,
    check_adapter_in_memory,
    check_model_config,
    check_reload,
    check_tensors,
    logit_tolerance,
)
from peftrun.staging import staged_dir
from peftrun.train.checkpoint import STATE_FILE, best_checkpoint, checkpoint_root, save_checkpoint
from peftrun.train.save_zero3 import save_sharded_adapter, save_sharded_full
from peftrun.train.setup import Run


def write_outputs(run: Run) -> Path:
    """The final artefact, then (main process) the loss plot and the manifest."""
    try:
        with cleaning_up_on_failure(run.out, "saving the final artefact"):
            final = save_final(
                run.accelerator, run.model, run.processor, run.recipe, run.probe_batch, run.initial_adapter
            )
    except SaveCheckFailed as exc:
        # What was trained is kept: a checkpoint of this step (written now unless it already is), so
        # that the user can resume or save again after a fix. The check leaves the weights as trained.
        path = checkpoint_root(run.out) / f"step-{run.state.step:08d}"
        if run.losses and not (path / STATE_FILE).is_file():
            path = save_checkpoint(run.accelerator, run.out, run.state, run.recipe.checkpoint.keep_last)
        kept = f"; the trained weights are kept in {path}" if (path / STATE_FILE).is_file() else ""
        raise SaveCheckFailed(f"{exc}{kept}") from None
    if run.accelerator.is_main_process:
        if run.recipe.logging.plot:
            plot_losses(run.out / METRICS_FILE, run.out / PLOT_FILE)
        trainable, total = run.parameters
        write_manifest(
            run.out / MANIFEST_FILE,
            recipe=RESOLVED_RECIPE,
            final=FINAL_DIR,
            run_id=run.run_id,
            steps=run.state.step,
            world_size=run.accelerator.num_processes,
            matmul=run.cpu.matmul,  # cpu.matmul as resolved on this machine
            cpu=asdict(run.cpu),  # what tune_for_cpu applied
            trainable_parameters=trainable,
            total_parameters=total,
            final_train_loss=run.state.last_loss,
            final_eval_loss=run.eval_loss,
            best_checkpoint=_relative(best_checkpoint(run.out), run.out)
            if run.recipe.checkpoint.keep_best
            else None,
            data=asdict(run.data.report),
        )
    return final


class SaveCheckFailed(UserError):
    """The final artefact failed its check on some process; nothing was published."""


def save_final(
    accelerator: Any,
    model: Any,
    processor: Any,
    recipe: Recipe,
    probe_batch: dict[str, torch.Tensor],
    initial_adapter: Path | None = None,
) -> Path:
    """Write the deployable artefact to output_dir/final, verified before it replaces the previous one.

    Every process calls this; a failed check raises SaveCheckFailed on every process.
    """
    final = final_dir(recipe.output_dir)
    adapter = recipe.method.kind not in NON_ADAPTER_KINDS
    unwrapped = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3 and adapter and initial_adapter is None:
        failure = save_sharded_adapter(accelerator, model, processor, recipe, probe_batch, final)
    elif zero_stage(accelerator) == 3 and not adapter and not renames_weights_on_save(unwrapped):
        failure = save_sharded_full(accelerator, model, processor, recipe, final)
    else:
        if zero_stage(accelerator) == 3 and not adapter:
            accelerator.print(
                f"[peftrun] {type(unwrapped).__name__} renames its weights on save: saved through a copy "
                "gathered on the main process (it holds the whole model)"
            )
        failure = _save_whole(accelerator, model, processor, recipe, probe_batch, initial_adapter, final)
    if agree_on_failure(accelerator, failure):
        raise SaveCheckFailed(
            f"the saved artefact failed verification and was not published: {failure or 'see the main process'}"
        )
    return final


def _save_whole(
    accelerator: Any,
    model: Any,
    processor: Any,
    recipe: Recipe,
    probe_batch: dict[str, torch.Tensor],
    initial_adapter: Path | None,
    final: Path,
) -> str | None:
    """The save where the main process holds every weight it writes (one process, DDP, ZeRO-1/2, and
    under ZeRO-3 an adapter that moved base weights at init (PiSSA/OLoRA/CorDA), through a gathered
    copy); returns the check's failure, if any."""
    # Under ZeRO-3 no process holds whole weights: the save and its checks use a plain copy gathered
    # from all processes (a collective, see dist.py); elsewhere every process holds them.
    gathered = gathered_model(accelerator, model, recipe, probe_batch)
    failure = None
    if accelerator.is_main_process:
        # keep_fp32_wrapper=False: compare weights, not the mixed-precision autocast around forward.
        unwrapped = (
            gathered if gathered is not None else accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        )
        try:
            with staged_dir(final) as tmp:
                write_artefact(unwrapped, processor, recipe, tmp, initial_adapter=initial_adapter)
                # A converted adapter has rank 2r: its values are checked through the logits below.
                tensors = check_tensors(
                    tmp,
                    unwrapped,
                    compare_values=initial_adapter is None,
                    each_nonzero=recipe.method.kind not in MAY_ZERO_TENSORS,
                )
                logits = _check_artefact_logits(tmp, unwrapped, recipe, probe_batch, initial_adapter)
        except VerificationError as exc:
            failure = str(exc)
        else:
            accelerator.print(f"[peftrun] saved {final}: {tensors} tensors verified, {logits}")
    accelerator.wait_for_everyone()
    return failure


def _check_artefact_logits(
    directory: Path,
    unwrapped: Any,
    recipe: Recipe,
    probe_batch: dict[str, torch.Tensor],
    initial_adapter: Path | None,
) -> str:
    """That what a user loads from `directory` gives the trained logits, without a second base where it
    can (see verify.py); returns the line that says how it was shown."""
    if recipe.method.kind in NON_ADAPTER_KINDS:
        check_model_config(directory, unwrapped)
        return "config builds the trained architecture"
    if initial_adapter is None:
        check_adapter_config(directory, unwrapped)
        diff, tolerance = check_adapter_in_memory(directory, unwrapped, probe_batch)
        return f"saved adapter's logits in a second slot max rel diff {diff:.1e} (tol {tolerance:.0e})"
    # PiSSA/OLoRA/CorDA: the saved (converted) adapter belongs on the original base, which is no
    # longer in memory (training moved its weights): a fresh reload is the only check.
    reloaded = reload_artefact(directory, recipe)
    tolerance = logit_tolerance(DTYPES[recipe.model.dtype], recipe.model.quantization is not None)
    diff = check_reload(reloaded, unwrapped, probe_batch, tolerance)
    return f"reload logits max rel diff {diff:.1e} (tol {tolerance:.0e})"


def _relative(path: Path | None, root: Path) -> str | None:
    return None if path is None else str(path.relative_to(root))
