"""The final save under ZeRO-3, where no process holds whole weights. An adapter: only the trainable
tensors are gathered, and the check runs on the sharded model itself with every process taking part.
A full fine-tune: the weights are streamed to sharded files and checked one weight at a time. Neither
puts a full copy of the model on any process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftrun.dist.accelerator import agree_on_failure, gather_trainable, release_gathered, scatter_trainable
from peftrun.dist.stream_weights import check_streamed_weights, write_streamed_weights
from peftrun.model.methods import MAY_ZERO_TENSORS
from peftrun.recipe.schema import Recipe
from peftrun.run.artefact import write_artefact, write_companions, write_model_config
from peftrun.run.memory import note_memory
from peftrun.run.verify import (
    LogitDiff,
    VerificationError,
    check_adapter_config,
    check_model_config,
    check_tensors,
    logit_diff,
    logits_dtype,
    logits_on,
    probe_rows,
    read_saved_tensors,
    same_kernels_tolerance,
)
from peftrun.staging import staged_dir


class _Unpublished(Exception):
    """Leaves a staged directory without publishing it."""


@dataclass
class _Save:
    """What one ZeRO-3 save found: set by its body inside `_staged_save`."""

    tmp: Path
    failure: str | None = None
    report: str = ""


@contextlib.contextmanager
def _staged_save(accelerator: Any, final: Path) -> Iterator[_Save]:
    """`final`'s staged directory on the main process (the bare path on the others, which write
    nothing), published only when the body leaves `save.failure` None; then the report on success, and
    every process waits for the others."""
    main = accelerator.is_main_process
    save: _Save | None = None
    try:
        with staged_dir(final) if main else contextlib.nullcontext(final) as tmp:
            save = _Save(tmp)
            yield save
            if main and save.failure is not None:
                raise _Unpublished  # leaves staged_dir with an error: what was written is removed
    except _Unpublished:
        pass
    assert save is not None
    if save.failure is None:
        accelerator.print(f"[peftrun] saved {final}: {save.report}")
    accelerator.wait_for_everyone()


def _write_sharded_adapter(
    unwrapped: Any,
    processor: Any,
    recipe: Recipe,
    tmp: Path,
    trained: dict[str, torch.Tensor],
    swapped: dict[str, torch.Tensor],
) -> int:
    """Main process, ZeRO-3: write the adapter from the gathered trainable tensors and check the files
    against them; fills `swapped` with the saved values under the model's parameter names."""
    from peft import get_peft_model_state_dict

    write_artefact(unwrapped, processor, recipe, tmp, state_dict=trained)
    # peft renames (drops the adapter name) but keeps the tensors: their ids map saved names back.
    renamed = get_peft_model_state_dict(unwrapped, state_dict=trained)
    tensors = check_tensors(
        tmp,
        unwrapped,
        expected=(renamed, set(renamed)),
        each_nonzero=recipe.method.kind not in MAY_ZERO_TENSORS,
    )
    check_adapter_config(tmp, unwrapped)
    saved = read_saved_tensors(tmp)
    full_name = {id(tensor): name for name, tensor in trained.items()}
    swapped.update({full_name[id(tensor)]: saved[key] for key, tensor in renamed.items()})
    return tensors


def save_sharded_adapter(
    accelerator: Any,
    model: Any,
    processor: Any,
    recipe: Recipe,
    probe_batch: dict[str, torch.Tensor],
    final: Path,
) -> str | None:
    """An adapter's save under ZeRO-3: only the trainable tensors are gathered (to the main process),
    and the logits check runs on the sharded model itself with every process taking part: the trained
    logits, then the saved tensors swapped into the model, the logits again, then the trained values
    back. The same kernels run both forwards. Returns the check's failure, if any."""
    unwrapped = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    trained = gather_trainable(accelerator, model)  # empty on other processes
    note_memory("trainable gathered")
    samples = probe_rows(probe_batch)
    expected = [logits_on(model, sample) for sample in samples]
    with _staged_save(accelerator, final) as save:
        swapped: dict[str, torch.Tensor] = {}
        if main:
            try:
                tensors = _write_sharded_adapter(unwrapped, processor, recipe, save.tmp, trained, swapped)
            except VerificationError as exc:
                save.failure = str(exc)
        if not agree_on_failure(accelerator, save.failure):
            scatter_trainable(accelerator, model, swapped)
            found = LogitDiff(0.0, 0.0)
            for sample, trained_logits in zip(samples, expected, strict=True):
                found = found.worst(logit_diff(trained_logits, logits_on(model, sample)))
            scatter_trainable(accelerator, model, trained)
            note_memory("save checked")
            tolerance = same_kernels_tolerance(logits_dtype(unwrapped))
            save.report = f"{tensors if main else 0} tensors verified, saved tensors in the sharded model: logits max rel diff {found.max_rel:.1e} (tol {tolerance:.0e})"
            if main and not found.max_rel <= tolerance:
                save.failure = (
                    f"the saved tensors swapped into the sharded model give logits {found.max_rel:.3e} "
                    f"away from the trained ones (> {tolerance:.0e})"
                )
    return save.failure


def save_sharded_full(
    accelerator: Any, model: Any, processor: Any, recipe: Recipe, final: Path
) -> str | None:
    """A full (or frozen) fine-tune's save under ZeRO-3: the weights are streamed to sharded
    safetensors files one gathered weight at a time, then gathered again one at a time and compared
    with what the files hold; the saved config must build the trained architecture (with every tensor
    equal, that makes `from_pretrained(final)` the trained model's function, see
    verify.check_model_config). No process holds the whole model. Returns the check's failure, if any."""
    unwrapped = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    release_gathered(model)
    each_nonzero = recipe.method.kind not in MAY_ZERO_TENSORS
    with _staged_save(accelerator, final) as save:
        files, save.failure = write_streamed_weights(main, unwrapped, save.tmp)
        note_memory("weights streamed")
        tensors, check_failure = check_streamed_weights(main, unwrapped, save.tmp, each_nonzero)
        save.failure = save.failure or check_failure
        note_memory("save checked")
        if main and save.failure is None:
            write_model_config(unwrapped, save.tmp)
            write_companions(processor, recipe, save.tmp)
            try:
                check_model_config(save.tmp, unwrapped)
            except VerificationError as exc:
                save.failure = str(exc)
        save.report = f"{tensors} tensors in {files} file(s) verified against the gathered weights, config builds the trained architecture"
    return save.failure
