"""What differs per task, as data: the model class, peft's task type, how rows become batches, the loss.

The training loop asks a Task for per-sample loss sums and target counts and never branches on the task:
a target is a supervised token for the language-model tasks and a sample for the classifiers, so the
loop's weighting (every target weighs the same whatever micro-batch, accumulation step or rank it is
on) holds for all of them.

The recipe schema owns each task's name, data formats and classifier flag (`TASK_TRAITS`); this module
adds how the task trains and evaluates. It imports no torch at import time (the command line's
startup stays quick).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from peftrun.data import DataSharing, collate, pad_id_for, prepare_data
from peftrun.data.encoder_text import (
    MaskingCollator,
    collate_classification,
    prepare_masked_lm,
    prepare_text_classification,
)
from peftrun.data.images import ImageCollator, prepare_images
from peftrun.data.packing import collate_packed, pack_dataset
from peftrun.data.rows import TaskData
from peftrun.data.streaming import prepare_stream
from peftrun.data.tokenize import IGNORE_INDEX
from peftrun.recipe.schema import TASK_TRAITS, DataConfig, TaskTraits

if TYPE_CHECKING:
    import torch

Batch = dict[str, "torch.Tensor"]


# Batch entries that are not model inputs: the targets, and the real tokens per packed row.
NOT_MODEL_INPUTS = ("labels", "num_tokens")


def model_inputs(batch: Batch) -> Batch:
    """What the model is called with: everything in the batch but the targets and bookkeeping."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def forward_logits(model: Any, batch: Batch) -> torch.Tensor:
    return model(**model_inputs(batch)).logits


# ---- losses: summed per sample, so the loop can weigh every target the same ------------------------------


def causal_lm_targets(batch: Batch) -> torch.Tensor:
    """Supervised tokens per sample: every label after the first position that is not ignored."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)


def causal_lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over each sample's supervised tokens (shape [batch]).

    Sums, not means: the loop divides by the token count of the whole optimizer step over all
    processes, so every token weighs the same whatever micro-batch, accumulation step or rank it is on.
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    # Prompt tuning prepends virtual tokens: keep the positions that belong to the real inputs.
    logits = logits[:, logits.shape[1] - labels.shape[1] :]
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return per_token.view(shift_labels.shape).sum(dim=1)


def causal_lm_supervised_loss(model: Any, batch: Batch) -> torch.Tensor:
    """causal_lm_loss with the LM head (and the last layer's MLP) run only where a label is supervised.

    The head is the largest matmul of a small model (hidden x vocabulary per position) and its
    float32 logits the largest activation of any model; prompts and padding need neither. A forward
    pre-hook on the output embeddings hands them only the supervised positions' hidden states, so
    the model returns logits of shape [supervised tokens, vocabulary]. The last decoder layer's MLP
    feeds nothing but the head, position by position, so it runs on the same positions (zeros
    elsewhere). The call still goes through the model's (and DDP's or DeepSpeed's) own forward, so
    gradient sync and ZeRO hooks are untouched.
    """
    import torch
    import torch.nn.functional as F

    head = _output_embeddings(model)
    if head is None:
        return causal_lm_loss(forward_logits(model, batch), batch)
    labels = batch["labels"]
    supervised = labels[:, 1:] != IGNORE_INDEX  # position t predicts the label at t + 1
    positions = F.pad(supervised, (0, 1), value=False)

    def read_by_head(hidden: torch.Tensor) -> torch.Tensor:
        # Prompt tuning prepends virtual tokens: they come before the real positions.
        return F.pad(positions, (hidden.shape[1] - positions.shape[1], 0), value=False)

    def keep_supervised(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][read_by_head(args[0])], *args[1:])

    handles = [head.register_forward_pre_hook(keep_supervised)]
    last_mlp = _last_decoder_mlp(model)
    if last_mlp is not None:
        handles += _run_only_at(last_mlp, read_by_head)
    try:
        logits = forward_logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    per_token = F.cross_entropy(logits.float(), labels[:, 1:][supervised], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(supervised)[supervised]
    return per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)


def _unwrapped(model: Any) -> Any:
    """The model under DDP's and DeepSpeed's wrappers (they keep it in `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _output_embeddings(model: Any) -> Any:
    """The LM head under any wrappers (peft forwards get_output_embeddings to the base model)."""
    getter = getattr(_unwrapped(model), "get_output_embeddings", None)
    return getter() if getter is not None else None


def _last_decoder_mlp(model: Any) -> Any:
    """The last layer's dense MLP in the language model's decoder (`layers.N.mlp`, `h.N.mlp`, a class
    named ...MLP), or None.

    Only the decoder is searched: a vision tower's blocks may be numbered higher. None under gradient
    checkpointing: backward would recompute the layer without the hooks. Mixture-of-experts blocks are
    not ...MLP: their routing statistics depend on every position.
    """
    import re

    inner = _unwrapped(model)
    get_decoder = getattr(inner, "get_decoder", None)
    if getattr(inner, "is_gradient_checkpointing", False) or get_decoder is None:
        return None
    found, last = None, -1
    for name, module in get_decoder().named_modules():
        match = re.search(r"(?:^|\.)(\d+)\.mlp$", name)
        if match and type(module).__name__.endswith("MLP") and int(match.group(1)) > last:
            found, last = module, int(match.group(1))
    return found


def _run_only_at(module: Any, where: Callable[[torch.Tensor], torch.Tensor]) -> list[Any]:
    """Hooks that run a position-wise `module` on the positions `where(input)` selects, zeros elsewhere.

    An input that is not [batch, positions, hidden] for those positions passes through untouched.
    """
    masks: list[torch.Tensor | None] = []

    def gather(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0]
        mask = where(hidden) if hidden.dim() == 3 else None
        masks.append(mask if mask is not None and mask.shape == hidden.shape[:2] else None)
        return None if masks[-1] is None else (hidden[masks[-1]], *args[1:])

    def scatter(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        mask = masks.pop()
        if mask is None:
            return None
        return output.new_zeros((*mask.shape, output.shape[-1])).index_put((mask,), output)

    return [module.register_forward_pre_hook(gather), module.register_forward_hook(scatter)]


def masked_lm_targets(batch: Batch) -> torch.Tensor:
    """Masked tokens per sample (the only positions with a label)."""
    return (batch["labels"] != IGNORE_INDEX).sum(dim=1)


def masked_lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over each sample's masked tokens; no shift, the label is the token itself."""
    import torch.nn.functional as F

    labels = batch["labels"]
    per_token = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return per_token.view(labels.shape).sum(dim=1)


def one_per_sample(batch: Batch) -> torch.Tensor:
    return batch["labels"].new_ones(batch["labels"].shape[0])


def class_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def tokens_in(batch: Batch) -> int:
    """Real (non-padding) tokens; packed batches have no attention_mask and count them per row."""
    return int(batch["num_tokens" if "num_tokens" in batch else "attention_mask"].sum())


def images_in(batch: Batch) -> int:
    return int(batch["pixel_values"].shape[0])


# ---- evaluation metrics beside the loss ---------------------------------------------------------------------


def language_model_metrics(
    loss: float, true: list[int], predicted: list[int], names: list[str]
) -> dict[str, Any]:
    return {"perplexity": math.exp(min(loss, 50.0))}


def classifier_metrics(
    loss: float, true: list[int], predicted: list[int], names: list[str]
) -> dict[str, Any]:
    # scikit-learn is imported when a classifier is evaluated, not with every command.
    from peftrun.evaluation.metrics import classification_metrics

    return classification_metrics(true, predicted, names)


# ---- data: rows -> samples, samples -> batches ----------------------------------------------------------


def causal_lm_data(
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    cache_dir: Any,
    labelled: bool = True,
    sharing: DataSharing | None = None,
) -> TaskData:
    if cfg.streaming:
        return prepare_stream(cfg, tokenizer, seed, cache_dir, sharing=sharing)
    data = prepare_data(cfg, tokenizer, seed, cache_dir=cache_dir, sharing=sharing)
    if not cfg.packing:
        return TaskData(data.train, data.eval, data.report)
    # Only training is packed: evaluation losses are per-sample sums either way.
    packed = pack_dataset(data.train, cfg.max_seq_len)
    data.report.packed_rows, data.report.packed_capacity = len(packed), cfg.max_seq_len
    return TaskData(packed, data.eval, data.report)


def causal_lm_collator(tokenizer: Any, cfg: DataConfig, train: bool, seed: int) -> Callable[..., Batch]:
    return partial(collate_packed if cfg.packing and train else collate, pad_id=pad_id_for(tokenizer))


def masked_lm_data(
    cfg: DataConfig, tokenizer: Any, seed: int, cache_dir: Any, labelled: bool = True
) -> TaskData:
    return prepare_masked_lm(cfg, tokenizer, seed)


def masked_lm_collator(tokenizer: Any, cfg: DataConfig, train: bool, seed: int) -> Callable[..., Batch]:
    return MaskingCollator(tokenizer, cfg.mask_rate, seed, pad_id_for(tokenizer))


def text_classification_data(
    cfg: DataConfig, tokenizer: Any, seed: int, cache_dir: Any, labelled: bool = True
) -> TaskData:
    return prepare_text_classification(cfg, tokenizer, seed, labelled)


def text_classification_collator(
    tokenizer: Any, cfg: DataConfig, train: bool, seed: int
) -> Callable[..., Batch]:
    return partial(collate_classification, pad_id=pad_id_for(tokenizer))


def image_data(cfg: DataConfig, processor: Any, seed: int, cache_dir: Any, labelled: bool = True) -> TaskData:
    return prepare_images(cfg, processor, seed, labelled)


def image_collator(processor: Any, cfg: DataConfig, train: bool, seed: int) -> Callable[..., Batch]:
    return ImageCollator(processor, augment=cfg.augment and train, seed=seed)


# ---- the registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # the transformers Auto class that loads the model
    peft_task_type: str | None  # peft's TaskType, which picks the PeftModel wrapper (None: the plain one)
    processor: Literal["tokenizer", "image_processor"]  # what turns raw inputs into model inputs
    loss: Callable[
        [torch.Tensor, Batch], torch.Tensor
    ]  # (logits, batch) -> summed over each sample's targets
    targets_per_sample: Callable[[Batch], torch.Tensor]
    input_units: Callable[[Batch], int]  # tokens or images in a batch, for throughput
    prepare: Callable[..., TaskData]  # (data config, processor, seed, cache dir, labelled) -> TaskData
    collator: Callable[[Any, DataConfig, bool, int], Callable[..., Batch]]  # (processor, cfg, train, seed)
    # (eval loss, true labels, predicted labels, class names) -> metrics beside the loss
    metrics: Callable[[float, list[int], list[int], list[str]], dict[str, Any]] = language_model_metrics
    head_modules: tuple[str, ...] = ()  # the new head: trained and saved beside an adapter
    # (model, batch) -> what `loss` gives on the model's logits, computed more cheaply (training only)
    fast_loss: Callable[[Any, Batch], torch.Tensor] | None = None
    # prepare also takes `sharing` (peftrun.data.DataSharing): one process per machine prepares a cache
    # entry the others wait for without a collective, then memory-map; other tasks prepare in a barrier.
    shares_prepared_data: bool = False

    @property
    def traits(self) -> TaskTraits:
        """The recipe's facts about the task: its data formats, whether it is a classifier, what it predicts."""
        return TASK_TRAITS[self.name]

    @property
    def classifier(self) -> bool:
        return self.traits.classifier

    @property
    def predicts_labels(self) -> bool:
        """Whether evaluation compares predicted with true labels (classifiers), not only the loss."""
        return self.traits.predicts == "label"

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)

    def loss_per_sample(self, model: Any, batch: Batch) -> torch.Tensor:
        if self.fast_loss is not None:
            return self.fast_loss(model, batch)
        return self.loss(forward_logits(model, batch), batch)


CLASSIFIER_HEADS = ("classifier", "score")  # what transformers' classification models name their head

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "causal_lm",
            "AutoModelForCausalLM",
            "CAUSAL_LM",
            "tokenizer",
            causal_lm_loss,
            causal_lm_targets,
            tokens_in,
            causal_lm_data,
            causal_lm_collator,
            fast_loss=causal_lm_supervised_loss,
            shares_prepared_data=True,
        ),
        Task(
            "masked_lm",
            "AutoModelForMaskedLM",
            None,  # peft has no masked-LM wrapper; the plain PeftModel forwards everything
            "tokenizer",
            masked_lm_loss,
            masked_lm_targets,
            tokens_in,
            masked_lm_data,
            masked_lm_collator,
        ),
        Task(
            "sequence_classification",
            "AutoModelForSequenceClassification",
            "SEQ_CLS",
            "tokenizer",
            class_loss,
            one_per_sample,
            tokens_in,
            text_classification_data,
            text_classification_collator,
            metrics=classifier_metrics,
            head_modules=CLASSIFIER_HEADS,
        ),
        Task(
            "image_classification",
            "AutoModelForImageClassification",
            None,  # peft has no image task type: the head goes into modules_to_save by name
            "image_processor",
            class_loss,
            one_per_sample,
            images_in,
            image_data,
            image_collator,
            metrics=classifier_metrics,
            head_modules=CLASSIFIER_HEADS,
        ),
    )
}
if set(TASKS) != set(TASK_TRAITS):
    raise RuntimeError("internal: peftrun.model.tasks and the recipe's TASK_TRAITS name different tasks")
