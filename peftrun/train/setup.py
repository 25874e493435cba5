"""Training setup, in dependency order: process group, data, model, loaders, optimizer, resume point.

`setup_run` returns a `Run`: everything the loop and the final save share. The data comes before the
model (a bad data row should not cost a model load) and everything that can fail on user input fails
in preflight, before either.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from peftrun.cpu.memory import map_gathered_weights
from peftrun.cpu.tune import CpuTuning, tune_for_cpu
from peftrun.data import DataSharing
from peftrun.data.packing import sample_lengths
from peftrun.data.rows import TaskData
from peftrun.data.sampling import EpochShuffle, LengthGroupedShuffle
from peftrun.dist.accelerator import make_accelerator, prepare_scheduler, zero_stage
from peftrun.dist.signals import slurm_restarts
from peftrun.errors import UserError
from peftrun.evaluation.samples import EvalSamples, eval_samples_for
from peftrun.model.load import load_base, load_processor, make_trainable
from peftrun.model.methods import count_parameters, mutates_base, set_total_steps
from peftrun.model.tasks import TASKS, Task
from peftrun.recipe.load import recipe_to_yaml
from peftrun.recipe.schema import Recipe
from peftrun.run.io_checks import reading
from peftrun.run.memory import note_memory
from peftrun.run.outputs import METRICS_FILE, RESOLVED_RECIPE, MetricsLog
from peftrun.run.owner import claim
from peftrun.run.run_dir import tokenized_cache_dir
from peftrun.train.checkpoint import (
    TrainerState,
    load_checkpoint,
    register_trainable_only_hooks,
    resolve_resume,
)
from peftrun.train.optim import build_optimizer, build_scheduler
from peftrun.train.preflight import Preflight
from peftrun.train.resume_check import pick_resume, recipe_shape

Batch = dict[str, torch.Tensor]


@dataclass
class Run:
    """One training run's moving parts, as setup leaves them and the loop advances them."""

    recipe: Recipe  # with the class names the data resolved to
    accelerator: Any
    task: Task
    processor: Any
    data: TaskData
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any | None
    probe_batch: Batch  # a fixed batch to compare the saved artefact's logits with the trained model's
    initial_adapter: Path | None  # PiSSA/OLoRA/CorDA: the adapter at init, for the final conversion
    total_steps: int
    state: TrainerState
    metrics: MetricsLog | None  # metrics.jsonl, on the main process
    parameters: tuple[int, int]  # (trainable, total)
    cpu: CpuTuning
    run_id: str | None  # run.json's id (main process), recorded in the manifest
    samples: EvalSamples | None = None  # eval.generate: answers written at every evaluation
    losses: list[float] = field(default_factory=list)  # per optimizer step, this invocation only
    eval_loss: float | None = None

    @property
    def out(self) -> Path:
        return self.recipe.output_dir

    def say(self, line: str) -> None:
        self.accelerator.print(f"[peftrun] {line}")


def setup_run(recipe: Recipe, checks: Preflight) -> Run:
    accelerator = make_accelerator(recipe, log_with=list(recipe.logging.report_to))
    from accelerate.utils import set_seed

    set_seed(recipe.train.seed)
    resume_from, run_id = _claim_output_dir(accelerator, recipe)
    _write_resolved_recipe(accelerator, recipe)
    for line in checks.lines():
        accelerator.print(f"[peftrun] {line}")
    task = TASKS[recipe.task]
    processor, data, recipe = load_data(accelerator, recipe, task)
    note_memory("data loaded")
    model, initial_adapter, cpu = build_model(accelerator, recipe)
    note_memory("model built")
    parameters = count_parameters(model)  # printed by preflight already; recorded in the manifest
    train_loader, eval_loader, probe_batch = build_loaders(accelerator, recipe, task, processor, data)
    optimizer = build_optimizer(model, recipe.train)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    note_memory("prepared")
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    total_steps = _total_steps(accelerator, recipe, data, train_loader)
    scheduler = prepare_scheduler(accelerator, build_scheduler(optimizer, recipe.train, total_steps))
    set_total_steps(accelerator.unwrap_model(model), recipe.method.kind, total_steps)
    state, metrics = _resume(accelerator, recipe, resume_from, total_steps)
    accelerator.init_trackers(recipe.logging.project, config=_flat_config(recipe))
    run = Run(
        recipe=recipe,
        accelerator=accelerator,
        task=task,
        processor=processor,
        data=data,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        eval_loader=eval_loader,
        probe_batch=probe_batch,
        initial_adapter=initial_adapter,
        total_steps=total_steps,
        state=state,
        metrics=metrics,
        parameters=parameters,
        cpu=cpu,
        run_id=run_id,
        samples=eval_samples_for(recipe, processor, accelerator),
    )
    micro, accumulation = recipe.train.micro_batch_size, accelerator.gradient_accumulation_steps
    per_epoch = "streamed" if recipe.data.streaming else f"{len(train_loader) // accumulation}/epoch"
    run.say(
        f"{total_steps} optimizer steps ({per_epoch}), global batch "
        f"{micro * accumulation * accelerator.num_processes} samples = {accelerator.num_processes} process(es) "
        f"x micro {micro} x accumulation {accumulation}"
    )
    return run


def load_data(accelerator: Any, recipe: Recipe, task: Task) -> tuple[Any, TaskData, Recipe]:
    """The processor, the task's data, and the recipe with the class names the data resolved to.

    The data pipeline tokenizes with the tokenizer (or reads images for the image processor), so it
    comes first. The local main process tokenizes (and caches) before the others read the cache. For
    causal-LM data, which can take long, the others wait by watching the cache entry, not in a
    collective that could time out (peftrun.data.shared); the small data of other tasks is read in a barrier.
    """
    processor = load_processor(recipe.model, recipe.task)
    if task.shares_prepared_data:
        sharing = DataSharing(main=accelerator.is_local_main_process, log=_data_log(accelerator))
        data = task.prepare(recipe.data, processor, recipe.train.seed, tokenized_cache_dir(), sharing=sharing)
    else:
        with accelerator.local_main_process_first():
            data = task.prepare(recipe.data, processor, recipe.train.seed, tokenized_cache_dir())
    for line in data.report.lines():
        accelerator.print(f"[peftrun] {line}")
    if data.label_names is not None and data.label_names != recipe.data.labels:
        # The class names the data resolved to are part of the run: the resolved recipe records them,
        # so a reload, `peftrun eval` or a merge builds the same head with the same names.
        recipe = recipe.model_copy(
            update={"data": recipe.data.model_copy(update={"labels": data.label_names})}
        )
        _write_resolved_recipe(accelerator, recipe)
    return processor, data, recipe


def _data_log(accelerator: Any) -> Callable[[str], None]:
    """The main process logs its progress as every run line; a waiting rank says it waits, with its rank."""
    if accelerator.is_local_main_process:
        return lambda line: accelerator.print(f"[peftrun] {line}")
    rank = accelerator.process_index
    return lambda line: print(f"[peftrun] rank {rank}: {line}", file=sys.stderr, flush=True)


def build_model(accelerator: Any, recipe: Recipe) -> tuple[Any, Path | None, CpuTuning]:
    """The trainable model (CPU speed-ups applied on a CPU) and, where the method moves base weights,
    the saved initial adapter."""
    # Before the load: ZeRO-3 gathers and frees whole weights from zero.Init on (cpu/memory.py).
    mapped = zero_stage(accelerator) == 3 and accelerator.device.type == "cpu" and map_gathered_weights()
    base = load_base(recipe)
    note_memory("base loaded")
    model = make_trainable(base, recipe)
    cpu = tune_for_cpu(
        model, recipe.cpu, accelerator.device, compiled=recipe.train.compile, gathered_mapped=mapped
    )
    if cpu.matmul == "onednn":
        accelerator.print("[peftrun] fp32 linear layers run through oneDNN on this CPU (cpu.matmul)")
    register_trainable_only_hooks(accelerator)
    # PiSSA/OLoRA/CorDA move base weights at init; keeping the initial adapter lets the final save
    # convert the trained one into a plain LoRA that loads on the original base.
    out = recipe.output_dir
    initial_adapter = out / "initial_adapter" if mutates_base(recipe.method) else None
    if initial_adapter is not None and accelerator.is_main_process and not initial_adapter.is_dir():
        model.save_pretrained(initial_adapter)
    return model, initial_adapter, cpu


def build_loaders(
    accelerator: Any, recipe: Recipe, task: Task, processor: Any, data: TaskData
) -> tuple[DataLoader[Any], DataLoader[Any] | None, Batch]:
    """The training and eval loaders (not yet prepared), and the probe batch for the final checks."""
    micro = recipe.train.micro_batch_size
    eval_collate_fn = task.collator(processor, recipe.data, False, recipe.train.seed)
    # Each epoch is cut to whole optimizer steps over all processes, the same cut for any process count.
    step_samples = micro * accelerator.gradient_accumulation_steps * accelerator.num_processes
    sampler = (
        None  # a stream shuffles itself (data.streaming)
        if isinstance(data.train, IterableDataset)
        else LengthGroupedShuffle(sample_lengths(data.train).tolist(), micro, recipe.train.seed, step_samples)
        if recipe.data.group_by_length and not recipe.data.packing
        else EpochShuffle(len(data.train), recipe.train.seed, step_samples)
    )
    # Loaders get their own generator: starting an iterator (as a resumed run does mid-epoch) would
    # otherwise draw from the global RNG and shift every dropout mask after it.
    train_loader = DataLoader(
        data.train,
        batch_size=micro,
        sampler=sampler,
        collate_fn=task.collator(processor, recipe.data, True, recipe.train.seed),
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
    probe_batch = eval_collate_fn(_probe_samples(data.eval if eval_loader is not None else None, data.train))
    return train_loader, eval_loader, probe_batch


def _probe_samples(eval_set: Any, train_set: Any) -> list[Any]:
    """Two samples for the final checks: from the eval set, else from the training set (or stream)."""
    source = eval_set if eval_set is not None else train_set
    if isinstance(source, IterableDataset):
        return list(islice(iter(source), 2))
    return [source[i] for i in range(min(2, len(source)))]


def _total_steps(accelerator: Any, recipe: Recipe, data: TaskData, train_loader: Any) -> int:
    if recipe.train.max_steps is not None and isinstance(data.train, IterableDataset):
        return recipe.train.max_steps  # a stream has no length (the recipe requires max_steps with it)
    samples, micro_batches = len(data.train), len(train_loader)  # type: ignore[arg-type]
    accumulation = accelerator.gradient_accumulation_steps
    steps_per_epoch = micro_batches // accumulation
    if steps_per_epoch == 0:
        raise UserError(
            f"data: {samples} training samples give {micro_batches} micro-batches per process, "
            f"fewer than one optimizer step needs ({accumulation}); lower train.micro_batch_size or the "
            "global batch, or add data"
        )
    # As in transformers' Trainer: max_steps, when set, decides the length and epochs do not.
    return recipe.train.max_steps or recipe.train.epochs * steps_per_epoch


def _resume(
    accelerator: Any, recipe: Recipe, resume_from: Path | None, total_steps: int
) -> tuple[TrainerState, MetricsLog | None]:
    """The loop's state (from the checkpoint when resuming) and the metrics log continued from it."""
    state = TrainerState()
    if resume_from is not None:
        with reading(resume_from):
            state = load_checkpoint(accelerator, resume_from)
        accelerator.print(f"[peftrun] resumed from {resume_from} at step {state.step}")
    if state.step >= total_steps:
        accelerator.print(
            f"[peftrun] nothing to train: the checkpoint is at step {state.step} and the run ends at {total_steps}"
        )
    metrics = (
        MetricsLog(recipe.output_dir / METRICS_FILE, resume_step=state.step if resume_from else None)
        if accelerator.is_main_process
        else None
    )
    return state, metrics


def _claim_output_dir(accelerator: Any, recipe: Recipe) -> tuple[Path | None, str | None]:
    """The checkpoint to resume from (a damaged newest one falls back to the previous one) and the run
    id: output_dir becomes this run's (run/owner.py) before anything is written into it."""
    say = accelerator.print
    requeued = slurm_restarts() > 0
    resume_from = resolve_resume(recipe.output_dir, recipe.train.resume, requeued=requeued)
    if resume_from is not None:
        resume_from = pick_resume(resume_from, recipe.train.resume == "auto" or requeued, say)
    run_id = None
    if accelerator.is_main_process:
        run_id = claim(recipe.output_dir, resume_from, recipe_shape(recipe), say)
    return resume_from, run_id


def _write_resolved_recipe(accelerator: Any, recipe: Recipe) -> None:
    if accelerator.is_main_process:
        (recipe.output_dir / RESOLVED_RECIPE).write_text(recipe_to_yaml(recipe))


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
