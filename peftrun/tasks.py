"""What differs per task, as data: the model class, peft's task type and the loss.

The training loop asks a Task for per-sample loss sums and target counts and never branches on the task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Supervised tokens per sample: every label after the first position that is not ignored."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over each sample's supervised tokens (shape [batch]).

    Sums, not means: the loop divides by the token count of the whole optimizer step over all
    processes, so every token weighs the same whatever micro-batch, accumulation step or rank it is on.
    """
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
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


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # the transformers Auto class that loads the model
    peft_task_type: str  # peft's TaskType, which picks the PeftModel wrapper
    loss_per_sample: Callable[
        [Any, dict[str, torch.Tensor]], torch.Tensor
    ]  # summed over each sample's targets
    targets_per_sample: Callable[[dict[str, torch.Tensor]], torch.Tensor]

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)


TASKS: dict[str, Task] = {
    "causal_lm": Task("causal_lm", "AutoModelForCausalLM", "CAUSAL_LM", causal_lm_loss, causal_lm_targets),
}
