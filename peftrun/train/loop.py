"""The training flow, top to bottom: setup -> loop -> save.

It knows nothing of the backend: single process, DDP or DeepSpeed all arrive as an Accelerator
(see dist/accelerator.py). Each step's loss is token-weighted over all its micro-batches and processes,
so micro 2 x accumulation 2, micro 4 x accumulation 1 and 2 ranks x micro 2 give the same numbers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftrun.dist.signals import SCHEDULER_SIGNALS, StopRequest, requeue_slurm_job
from peftrun.errors import UserError
from peftrun.evaluation.evaluate import eval_summary, evaluate
from peftrun.evaluation.samples import log_samples
from peftrun.model.methods import after_optimizer_step
from peftrun.model.tasks import Task
from peftrun.recipe.schema import Recipe, TrainConfig
from peftrun.run.artefact import checkpoint_writer
from peftrun.run.io_checks import cleaning_up_on_failure
from peftrun.run.memory import note_memory
from peftrun.train.checkpoint import CHECKPOINTS, save_checkpoint
from peftrun.train.preflight import preflight
from peftrun.train.save import write_outputs
from peftrun.train.setup import Batch, Run, setup_run


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path | None  # None when the run stopped early on a signal
    steps: int
    losses: list[float]  # per optimizer step, this invocation only
    eval_loss: float | None
    stopped_by: str | None = None


def train(recipe: Recipe) -> RunResult:
    # Every user mistake surfaces here, before any weights or data are loaded.
    checks = preflight(recipe)
    # A scheduler's signals are caught from here on: a time-limit warning that arrives while the model
    # loads is honoured at the first step boundary (under `peftrun slurm` the launcher ignores USR1, so
    # uncaught it would be lost). Ctrl-C still aborts setup at once; it is caught from the loop on.
    stop = StopRequest().install(SCHEDULER_SIGNALS)
    run = setup_run(recipe, checks)
    stop.install()
    stopping, requeue = run_loop(run, stop)
    # `stopping`, not `stop.requested`: a signal that lands after the last agreement reached only some
    # processes. A stop at the last step just finishes.
    if stopping and run.state.step < run.total_steps:
        return _stop_early(run, stop, requeue)
    step = run.state.step
    evaluated_last_step = bool(run.recipe.eval.every_steps) and step % (run.recipe.eval.every_steps or 1) == 0
    if run.eval_loader is not None and run.recipe.eval.at_end and not (evaluated_last_step and run.losses):
        run.eval_loss = _eval_and_log(run)
    if run.recipe.checkpoint.at_end and run.losses:
        _checkpoint(run)
    note_memory("trained")
    final_dir = write_outputs(run)
    note_memory("saved")
    run.accelerator.end_training()
    return RunResult(run.out, final_dir, step, run.losses, run.eval_loss)


def run_loop(run: Run, stop: StopRequest) -> tuple[bool, bool]:
    """Optimizer steps until the run's length or a stop; returns (stopping, requeue), agreed by all
    processes at a step boundary."""
    accelerator, state, recipe = run.accelerator, run.state, run.recipe
    accumulation = accelerator.gradient_accumulation_steps
    stopping = requeue = False
    progress = _progress_bar(
        accelerator.is_main_process and recipe.logging.progress_bar, run.total_steps, state.step
    )
    window_start = time.perf_counter()
    tokens_in_window = 0
    run.model.train()
    while state.step < run.total_steps and not stopping:
        # A whole pass (not the rest of one a resumed run skips into) that gives no step never will.
        whole_pass, steps_at_epoch_start = state.batches_in_epoch == 0, state.step
        # Through the loader: accelerate's loader re-sets the sampler's epoch from its own counter on
        # every iter (a resumed run's counter starts at 0), and skip_first_batches copies that counter.
        run.train_loader.set_epoch(state.epoch)
        batches: Iterable[Batch] = (
            accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
            if state.batches_in_epoch
            else run.train_loader
        )
        for window in optimizer_steps(batches, accumulation):
            loss, supervised, tokens, grad_norm = train_step(
                accelerator, run.model, run.optimizer, run.task, window, recipe.train
            )
            run.scheduler.step()
            state.step += 1
            note_memory(f"step {state.step}")
            after_optimizer_step(accelerator.unwrap_model(run.model), recipe.method.kind, state.step)
            state.batches_in_epoch += accumulation
            state.tokens_seen += supervised
            state.last_loss = loss
            run.losses.append(loss)
            tokens_in_window += tokens
            if state.step % recipe.logging.every_steps == 0 or state.step == run.total_steps:
                seconds = max(time.perf_counter() - window_start, 1e-9)
                _log_step(run, progress, loss, grad_norm, tokens_in_window / seconds)
                window_start, tokens_in_window = time.perf_counter(), 0
            progress.update(1)
            _evaluate_and_checkpoint(run)
            # Every process must stop at the same step, or the next collective hangs.
            stopping, requeue = _agree_to_stop(accelerator, stop)
            if state.step >= run.total_steps or stopping:
                break
        else:  # the epoch ran out
            if (
                whole_pass and state.step == steps_at_epoch_start
            ):  # a stream can; a dataset is checked up front
                raise UserError(
                    f"data: a whole pass over the training data gave no optimizer step ({accumulation} "
                    "micro-batches per process needed); add data or lower the batch size"
                )
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()
    return stopping, requeue


# ---- one optimizer step ---------------------------------------------------------------------------------


def train_step(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    task: Task,
    window: list[dict[str, torch.Tensor]],
    cfg: TrainConfig,
) -> tuple[float, int, int, float | None]:
    """Forward/backward over the step's micro-batches, then one optimizer update.

    Returns (target-weighted loss over all processes, targets, input tokens or images, grad norm).
    """
    device = accelerator.device
    local_targets = sum(int(task.targets_per_sample(b).sum()) for b in window)
    local_tokens = sum(task.input_units(b) for b in window)
    counts = accelerator.reduce(torch.tensor([local_targets, local_tokens], device=device), reduction="sum")
    step_targets, step_tokens = int(counts[0]), int(counts[1])
    # accelerate divides each micro-batch loss by the accumulation steps and DDP averages over
    # processes; multiplying both back makes the gradient sum(token losses) / step_targets exactly.
    scale = len(window) * accelerator.num_processes / max(step_targets, 1)
    loss_sum = torch.zeros((), device=device)
    grad_norm = None
    # Zeroed here, not after the update: per-step adapter hooks (AdaLoRA) read the step's gradients.
    optimizer.zero_grad(set_to_none=True)
    for batch in window:
        with accelerator.accumulate(model):
            per_sample = task.loss_per_sample(model, batch)
            accelerator.backward(per_sample.sum() * scale)
            loss_sum += per_sample.detach().sum()
            if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                grad_norm = float(norm) if norm is not None else None
            optimizer.step()
    if not accelerator.sync_gradients:
        raise RuntimeError("internal: the optimizer step and accelerate's accumulation boundary disagree")
    total_loss = float(accelerator.reduce(loss_sum, reduction="sum")) / max(step_targets, 1)
    return total_loss, step_targets, step_tokens, grad_norm


def optimizer_steps(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Group micro-batches into optimizer steps; an epoch's leftover (< size) micro-batches are skipped.

    The step's token count must be known before its first backward, so a step's batches are read
    up front; a partial window would change the accumulation count mid-run.
    """
    window: list[Batch] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []


# ---- what happens between steps ------------------------------------------------------------------------------


def _log_step(run: Run, progress: Any, loss: float, grad_norm: float | None, tokens_per_s: float) -> None:
    state = run.state
    record = {
        "step": state.step,
        "epoch": _epoch_progress(run),
        "loss": loss,
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": grad_norm,
        "tokens_per_s": tokens_per_s,
        "supervised_tokens": state.tokens_seen,
    }
    _log(run, record)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}")


def _epoch_progress(run: Run) -> float:
    """Epochs done, with the fraction of the current one (a stream has no length: its passes done)."""
    state = run.state
    if run.recipe.data.streaming:
        return float(state.epoch)
    return round(state.epoch + state.batches_in_epoch / len(run.train_loader), 4)


def _evaluate_and_checkpoint(run: Run) -> None:
    """What eval.every_steps and checkpoint.every_steps ask for at this step."""
    step, recipe = run.state.step, run.recipe
    if run.eval_loader is not None and recipe.eval.every_steps and step % recipe.eval.every_steps == 0:
        run.eval_loss = _eval_and_log(run)
    if recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0:
        _checkpoint(run)


def _eval_and_log(run: Run) -> float:
    recipe, step = run.recipe, run.state.step
    result = evaluate(
        run.accelerator, run.model, run.eval_loader, run.task, recipe.eval.max_batches, recipe.data.labels
    )
    record = {"step": step, **{f"eval_{k}": v for k, v in result.items()}}
    if run.samples is not None:  # the main process only; the others do not wait on it in a collective
        record["eval_samples"] = run.samples.answers(run.accelerator.unwrap_model(run.model))
        log_samples(run.accelerator, record["eval_samples"], step)
    _log(run, record)
    run.say(f"step {step}: eval {eval_summary(result)}")
    # keep_best ranks checkpoints by the eval loss measured at their own step
    run.state.eval_loss, run.state.eval_step = float(result["loss"]), step
    return float(result["loss"])


def _checkpoint(run: Run) -> Path:
    """Resume state plus a loadable adapter/model directory (run/artefact.py), rotated to keep_last
    (sparing the best eval loss with keep_best)."""
    recipe = run.recipe
    with cleaning_up_on_failure(run.out / CHECKPOINTS, "saving the checkpoint"):
        return save_checkpoint(
            run.accelerator,
            run.out,
            run.state,
            recipe.checkpoint.keep_last,
            keep_best=recipe.checkpoint.keep_best,
            write_artefact=checkpoint_writer(
                run.accelerator, run.model, run.processor, recipe, run.initial_adapter
            ),
        )


def _log(run: Run, record: dict[str, Any]) -> None:
    # Trackers get the numbers; metrics.jsonl gets everything (per-class metrics, confusion matrix).
    numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    run.accelerator.log(numbers, step=record["step"])
    if run.metrics is not None:
        run.metrics.write(record)


def _agree_to_stop(accelerator: Any, stop: StopRequest) -> tuple[bool, bool]:
    """(stop, requeue) on every process: whether any process was signalled, and with USR1 under Slurm."""
    flags = torch.tensor([int(stop.requested), int(stop.wants_requeue)], device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    stopping, requeue = bool(flags[0] > 0), bool(flags[1] > 0)
    if stopping and not stop.requested:
        stop.signal_name = "a signal on another process"
    return stopping, requeue


def _stop_early(run: Run, stop: StopRequest, requeue: bool) -> RunResult:
    """A signalled run: a checkpoint at this step, and how it continues (a Slurm job requeues itself)."""
    path = _checkpoint(run)
    run.say(f"stopped by {stop.signal_name} at step {run.state.step}; checkpoint {path}")
    if not requeue:
        run.say(f"continue with: peftrun train <recipe> train.resume=auto (output_dir {run.out})")
    elif run.accelerator.is_main_process:  # once per job, after every process has written its part
        run.say(requeue_slurm_job())
    # Nobody leaves before the requeue is done and logged: srun --kill-on-bad-exit kills the whole
    # step as soon as one node's launcher exits.
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return RunResult(run.out, None, run.state.step, run.losses, run.eval_loss, stopped_by=stop.signal_name)


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    # In a log file (Slurm, CI) a bar redrawn 5 times a second is noise: redraw every 30 s there.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc="train",
        dynamic_ncols=True,
        mininterval=interval,
    )
