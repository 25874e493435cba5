"""The training flow, top to bottom: setup -> loop -> save.

It knows nothing of the backend: single process, DDP or DeepSpeed all arrive as an Accelerator
(see dist.py). Each step's loss is token-weighted over all its micro-batches and processes, so
micro 2 x accumulation 2, micro 4 x accumulation 1 and 2 ranks x micro 2 give the same numbers.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from peftrun.checkpoint import (
    CHECKPOINTS,
    TrainerState,
    load_checkpoint,
    register_trainable_only_hooks,
    resolve_resume,
    save_checkpoint,
)
from peftrun.cpu_matmul import use_cpu_matmul
from peftrun.cpu_memory import keep_freed_memory
from peftrun.data.sampling import EpochShuffle, LengthGroupedShuffle
from peftrun.dist import gathered_model, make_accelerator, prepare_scheduler
from peftrun.errors import UserError
from peftrun.io_checks import cleaning_up_on_failure, reading
from peftrun.methods import (
    MAY_ZERO_TENSORS,
    after_optimizer_step,
    count_parameters,
    mutates_base,
    set_total_steps,
)
from peftrun.model import DTYPES, load_base, load_processor, make_trainable
from peftrun.outputs import (
    MANIFEST_FILE,
    METRICS_FILE,
    PLOT_FILE,
    RESOLVED_RECIPE,
    MetricsLog,
    plot_losses,
    write_manifest,
)
from peftrun.preflight import preflight
from peftrun.recipe.load import recipe_to_yaml
from peftrun.recipe.schema import Recipe, TrainConfig
from peftrun.resume_check import pick_resume, recipe_shape
from peftrun.run_owner import claim
from peftrun.signals import SCHEDULER_SIGNALS, StopRequest, requeue_slurm_job, slurm_restarts
from peftrun.staging import staged_dir
from peftrun.tasks import TASKS, Task, forward_logits
from peftrun.verify import VerificationError, check_reload, check_tensors, logit_tolerance

FINAL_DIR = "final"


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path | None  # None when the run stopped early on a signal
    steps: int
    losses: list[float]  # per optimizer step, this invocation only
    eval_loss: float | None
    stopped_by: str | None = None


def train(recipe: Recipe) -> RunResult:
    # ---- setup, in dependency order -------------------------------------------------------------
    # Every user mistake surfaces here, before any weights or data are loaded.
    checks = preflight(recipe)
    # A scheduler's signals are caught from here on: a time-limit warning that arrives while the model
    # loads is honoured at the first step boundary (under `peftrun slurm` the launcher ignores USR1, so
    # uncaught it would be lost). Ctrl-C still aborts setup at once; it is caught from the loop on.
    stop = StopRequest().install(SCHEDULER_SIGNALS)
    accelerator = make_accelerator(recipe, log_with=list(recipe.logging.report_to))
    say = accelerator.print
    if recipe.train.cpu_malloc_cache and accelerator.device.type == "cpu":
        keep_freed_memory()  # each step's activations reuse the process's pages (see cpu_memory.py)
    from accelerate.utils import set_seed

    set_seed(recipe.train.seed)
    out = recipe.output_dir
    task = TASKS[recipe.task]
    resume_from = resolve_resume(out, recipe.train.resume, requeued=slurm_restarts() > 0)
    if resume_from is not None:  # a damaged newest checkpoint falls back to the previous one
        resume_from = pick_resume(resume_from, recipe.train.resume == "auto" or slurm_restarts() > 0, say)
    run_id = claim(out, resume_from, recipe_shape(recipe), say) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        (out / RESOLVED_RECIPE).write_text(recipe_to_yaml(recipe))
    for line in checks.lines():
        say(f"[peftrun] {line}")

    # The data pipeline tokenizes with the tokenizer (or reads images for the image processor), so it
    # comes first. The local main process tokenizes (and caches) before the others read the cache: no
    # rank tokenizes while others wait in a collective that could time out.
    processor = load_processor(recipe.model, recipe.task)
    with accelerator.local_main_process_first():
        data = task.prepare(recipe.data, processor, recipe.train.seed, _cache_dir())
    for line in data.report.lines():
        say(f"[peftrun] {line}")
    if data.label_names is not None and data.label_names != recipe.data.labels:
        # The class names the data resolved to are part of the run: the resolved recipe records them,
        # so a reload, `peftrun eval` or a merge builds the same head with the same names.
        recipe = recipe.model_copy(
            update={"data": recipe.data.model_copy(update={"labels": data.label_names})}
        )
        if accelerator.is_main_process:
            (out / RESOLVED_RECIPE).write_text(recipe_to_yaml(recipe))

    # The model after the data: a bad data row should not cost a model load.
    model = make_trainable(load_base(recipe), recipe)
    onednn = accelerator.device.type == "cpu" and use_cpu_matmul(model, recipe.train.cpu_matmul)
    if onednn:
        say("[peftrun] fp32 linear layers run through oneDNN on this CPU (train.cpu_matmul)")
    trainable, total = count_parameters(model)  # printed by preflight already; recorded in the manifest
    register_trainable_only_hooks(accelerator)
    # PiSSA/OLoRA/CorDA move base weights at init; keeping the initial adapter lets the final save
    # convert the trained one into a plain LoRA that loads on the original base.
    initial_adapter = out / "initial_adapter" if mutates_base(recipe.method) else None
    if initial_adapter is not None and accelerator.is_main_process and not initial_adapter.is_dir():
        model.save_pretrained(initial_adapter)

    micro = recipe.train.micro_batch_size
    collate_fn = task.collator(processor, recipe.data, True, recipe.train.seed)
    eval_collate_fn = task.collator(processor, recipe.data, False, recipe.train.seed)
    # Each epoch is cut to whole optimizer steps over all processes, the same cut for any process count.
    step_samples = micro * accelerator.gradient_accumulation_steps * accelerator.num_processes
    sampler = (
        LengthGroupedShuffle(
            [len(ids) for ids in data.train["input_ids"]], micro, recipe.train.seed, step_samples
        )
        if recipe.data.group_by_length and not recipe.data.packing
        else EpochShuffle(len(data.train), recipe.train.seed, step_samples)
    )
    # Loaders get their own generator: starting an iterator (as a resumed run does mid-epoch) would
    # otherwise draw from the global RNG and shift every dropout mask after it.
    train_loader = DataLoader(
        data.train,
        batch_size=micro,
        sampler=sampler,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0),
    )
    eval_loader = (
        DataLoader(
            data.eval,
            batch_size=recipe.eval.batch_size or micro,
            collate_fn=eval_collate_fn,
            generator=torch.Generator().manual_seed(0),
        )
        if data.eval is not None and len(data.eval) > 0
        else None
    )
    # A fixed batch to compare the saved artefact's logits with the trained model's.
    probe_source = data.eval if eval_loader is not None and data.eval is not None else data.train
    probe_batch = eval_collate_fn([probe_source[i] for i in range(min(2, len(probe_source)))])
    optimizer = build_optimizer(model, recipe.train)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    accumulation = accelerator.gradient_accumulation_steps
    steps_per_epoch = len(train_loader) // accumulation
    if steps_per_epoch == 0:
        raise UserError(
            f"data: {len(data.train)} training samples give {len(train_loader)} micro-batches per process, "
            f"fewer than one optimizer step needs ({accumulation}); lower train.micro_batch_size or the "
            "global batch, or add data"
        )
    # As in transformers' Trainer: max_steps, when set, decides the length and epochs do not.
    total_steps = recipe.train.max_steps or recipe.train.epochs * steps_per_epoch
    scheduler = prepare_scheduler(accelerator, build_scheduler(optimizer, recipe.train, total_steps))
    set_total_steps(accelerator.unwrap_model(model), recipe.method.kind, total_steps)

    state = TrainerState()
    if resume_from is not None:
        with reading(resume_from):
            state = load_checkpoint(accelerator, resume_from)
        say(f"[peftrun] resumed from {resume_from} at step {state.step}")
    if state.step >= total_steps:
        say(
            f"[peftrun] nothing to train: the checkpoint is at step {state.step} and the run ends at {total_steps}"
        )
    metrics = (
        MetricsLog(out / METRICS_FILE, resume_step=state.step if resume_from else None)
        if accelerator.is_main_process
        else None
    )
    accelerator.init_trackers(recipe.logging.project, config=_flat_config(recipe))
    say(
        f"[peftrun] {total_steps} optimizer steps ({steps_per_epoch}/epoch), global batch "
        f"{micro * accumulation * accelerator.num_processes} samples = {accelerator.num_processes} process(es) "
        f"x micro {micro} x accumulation {accumulation}"
    )

    # ---- the loop ------------------------------------------------------------------------------------
    stop.install()
    stopping = requeue = False  # decided by all processes together, at a step boundary
    losses: list[float] = []
    eval_loss: float | None = None
    progress = _progress_bar(
        accelerator.is_main_process and recipe.logging.progress_bar, total_steps, state.step
    )
    window_start = time.perf_counter()
    tokens_in_window = 0
    model.train()
    while state.step < total_steps and not stopping:
        # Through the loader: accelerate's loader re-sets the sampler's epoch from its own counter on
        # every iter (a resumed run's counter starts at 0), and skip_first_batches copies that counter.
        train_loader.set_epoch(state.epoch)
        batches: Iterable[dict[str, torch.Tensor]] = (
            accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            if state.batches_in_epoch
            else train_loader
        )
        for window in optimizer_steps(batches, accumulation):
            loss, supervised, tokens, grad_norm = train_step(
                accelerator, model, optimizer, task, window, recipe.train
            )
            scheduler.step()
            state.step += 1
            after_optimizer_step(accelerator.unwrap_model(model), recipe.method.kind, state.step)
            state.batches_in_epoch += accumulation
            state.tokens_seen += supervised
            state.last_loss = loss
            losses.append(loss)
            tokens_in_window += tokens

            if state.step % recipe.logging.every_steps == 0 or state.step == total_steps:
                seconds = time.perf_counter() - window_start
                record = {
                    "step": state.step,
                    "epoch": round(state.epoch + state.batches_in_epoch / len(train_loader), 4),
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_s": tokens_in_window / max(seconds, 1e-9),
                    "supervised_tokens": state.tokens_seen,
                }
                _log(accelerator, metrics, record)
                progress.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
                )
                window_start, tokens_in_window = time.perf_counter(), 0
            progress.update(1)

            if (
                eval_loader is not None
                and recipe.eval.every_steps
                and state.step % recipe.eval.every_steps == 0
            ):
                eval_loss = _eval_and_log(accelerator, model, eval_loader, task, recipe, state.step, metrics)
            if recipe.checkpoint.every_steps and state.step % recipe.checkpoint.every_steps == 0:
                with cleaning_up_on_failure(out / CHECKPOINTS, "saving the checkpoint"):
                    save_checkpoint(accelerator, out, state, recipe.checkpoint.keep_last)
            # Every process must stop at the same step, or the next collective hangs.
            stopping, requeue = _agree_to_stop(accelerator, stop)
            if state.step >= total_steps or stopping:
                break
        else:  # the epoch ran out
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()

    # ---- save --------------------------------------------------------------------------------------------
    # `stopping`, not `stop.requested`: a signal that lands after the last agreement reached only some
    # processes. A stop at the last step just finishes.
    if stopping and state.step < total_steps:
        with cleaning_up_on_failure(out / CHECKPOINTS, "saving the checkpoint"):
            path = save_checkpoint(accelerator, out, state, recipe.checkpoint.keep_last)
        say(f"[peftrun] stopped by {stop.signal_name} at step {state.step}; checkpoint {path}")
        if not requeue:
            say(f"[peftrun] continue with: peftrun train <recipe> train.resume=auto (output_dir {out})")
        elif accelerator.is_main_process:  # once per job, after every process has written its part
            say(f"[peftrun] {requeue_slurm_job()}")
        # Nobody leaves before the requeue is done and logged: srun --kill-on-bad-exit kills the whole
        # step as soon as one node's launcher exits.
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return RunResult(out, None, state.step, losses, eval_loss, stopped_by=stop.signal_name)
    evaluated_last_step = bool(recipe.eval.every_steps) and state.step % (recipe.eval.every_steps or 1) == 0
    if eval_loader is not None and recipe.eval.at_end and not (evaluated_last_step and losses):
        eval_loss = _eval_and_log(accelerator, model, eval_loader, task, recipe, state.step, metrics)
    if recipe.checkpoint.at_end and losses:
        with cleaning_up_on_failure(out / CHECKPOINTS, "saving the checkpoint"):
            save_checkpoint(accelerator, out, state, recipe.checkpoint.keep_last)
    with cleaning_up_on_failure(out, "saving the final artefact"):
        final_dir = save_final(accelerator, model, processor, recipe, probe_batch, initial_adapter)
    if accelerator.is_main_process:
        if recipe.logging.plot:
            plot_losses(out / METRICS_FILE, out / PLOT_FILE)
        write_manifest(
            out / MANIFEST_FILE,
            recipe=RESOLVED_RECIPE,
            final=FINAL_DIR,
            run_id=run_id,
            steps=state.step,
            world_size=accelerator.num_processes,
            matmul="onednn" if onednn else "torch",  # train.cpu_matmul as resolved on this machine
            trainable_parameters=trainable,
            total_parameters=total,
            final_train_loss=state.last_loss,
            final_eval_loss=eval_loss,
            data=asdict(data.report),
        )
    accelerator.end_training()
    return RunResult(out, final_dir, state.step, losses, eval_loss)


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


def optimizer_steps(
    batches: Iterable[dict[str, torch.Tensor]], size: int
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Group micro-batches into optimizer steps; an epoch's leftover (< size) micro-batches are skipped.

    The step's token count must be known before its first backward, so a step's batches are read
    up front; a partial window would change the accumulation count mid-run.
    """
    window: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []


def build_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on biases and norm gains (1-d tensors), as in every reference recipe.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(
        "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler,
        optimizer,
        num_warmup_steps=min(cfg.warmup_steps, total_steps),
        num_training_steps=total_steps,
    )


# ---- evaluation ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    accelerator: Any,
    model: Any,
    loader: Any,
    task: Task,
    max_batches: int | None,
    label_names: list[str] | None = None,
) -> dict[str, Any]:
    """Target-weighted eval loss over all processes (duplicates padding the last batch dropped), with
    perplexity for language models and scikit-learn's classification metrics for classifiers."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    targets = 0
    predicted: list[int] = []
    true: list[int] = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits = forward_logits(model, batch)
        per_sample = task.loss(logits, batch)
        gathered = accelerator.gather_for_metrics(
            (per_sample, task.targets_per_sample(batch), logits.argmax(-1), batch["labels"])
            if task.classifier
            else (per_sample, task.targets_per_sample(batch))
        )
        loss_sum += gathered[0].double().sum().cpu()
        targets += int(gathered[1].sum())
        if task.classifier:
            predicted += gathered[2].tolist()
            true += gathered[3].tolist()
    model.train()
    loss = float(loss_sum) / max(targets, 1)
    if not task.classifier:
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    from peftrun.metrics import classification_metrics

    return {"loss": loss, **classification_metrics(true, predicted, label_names or [])}


def eval_summary(result: dict[str, Any]) -> str:
    if "accuracy" in result:
        return (
            f"loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}"
        )
    return f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}"


def _eval_and_log(
    accelerator: Any,
    model: Any,
    loader: Any,
    task: Task,
    recipe: Recipe,
    step: int,
    metrics: MetricsLog | None,
) -> float:
    result = evaluate(accelerator, model, loader, task, recipe.eval.max_batches, recipe.data.labels)
    _log(accelerator, metrics, {"step": step, **{f"eval_{k}": v for k, v in result.items()}})
    accelerator.print(f"[peftrun] step {step}: eval {eval_summary(result)}")
    return float(result["loss"])


# ---- the final artefact ---------------------------------------------------------------------------------------


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
    # from all processes (a collective, see dist.py); elsewhere every process holds them.
    gathered = gathered_model(accelerator, model, recipe, probe_batch)
    final = out / FINAL_DIR
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


def reload_artefact(directory: Path, recipe: Recipe) -> Any:
    """Load a saved artefact the way a user would: base + PeftModel.from_pretrained, or from_pretrained."""
    if recipe.method.kind in ("full", "frozen"):
        return TASKS[recipe.task].model_class().from_pretrained(directory, dtype=DTYPES[recipe.model.dtype])
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(recipe), directory)


# ---- small helpers ------------------------------------------------------------------------------------------------


def _base_config(model: Any) -> Any:
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def _agree_to_stop(accelerator: Any, stop: StopRequest) -> tuple[bool, bool]:
    """(stop, requeue) on every process: whether any process was signalled, and with USR1 under Slurm."""
    flags = torch.tensor([int(stop.requested), int(stop.wants_requeue)], device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    stopping, requeue = bool(flags[0] > 0), bool(flags[1] > 0)
    if stopping and not stop.requested:
        stop.signal_name = "a signal on another process"
    return stopping, requeue


def _log(accelerator: Any, metrics: MetricsLog | None, record: dict[str, Any]) -> None:
    # Trackers get the numbers; metrics.jsonl gets everything (per-class metrics, confusion matrix).
    numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    accelerator.log(numbers, step=record["step"])
    if metrics is not None:
        metrics.write(record)


def _flat_config(recipe: Recipe) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in recipe.model_dump(mode="json").items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
        else:
            flat[section] = values
    flat.update({f"method.{k}": str(v) for k, v in recipe.method.options.items()})
    return flat


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    import sys

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


def _cache_dir() -> Path:
    import os

    return Path(os.environ.get("PEFTRUN_CACHE", Path.home() / ".cache" / "peftrun")) / "tokenized"
