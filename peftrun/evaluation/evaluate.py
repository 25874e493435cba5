"""The evaluation pass: what training logs every eval.every_steps and `peftrun eval` reports."""

from __future__ import annotations

from typing import Any

import torch

from peftrun.model.tasks import Task, forward_logits


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
    the task's metrics beside it: perplexity for language models, scikit-learn's classification
    metrics for classifiers."""
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
            if task.predicts_labels
            else (per_sample, task.targets_per_sample(batch))
        )
        loss_sum += gathered[0].double().sum().cpu()
        targets += int(gathered[1].sum())
        if task.predicts_labels:
            predicted += gathered[2].tolist()
            true += gathered[3].tolist()
    model.train()
    loss = float(loss_sum) / max(targets, 1)
    return {"loss": loss, **task.metrics(loss, true, predicted, label_names or [])}


def eval_summary(result: dict[str, Any]) -> str:
    if "accuracy" in result:
        return (
            f"loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}"
        )
    return f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}"
