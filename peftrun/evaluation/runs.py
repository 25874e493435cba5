"""`peftrun eval RUN_DIR --data FILE` and `peftrun predict RUN_DIR --data FILE --out preds.jsonl`.

Both load a finished run the way a user would (RUN_DIR/final: the saved model or adapter, its tokenizer
or image processor, and the resolved recipe that says the task, the data format and the class names)
and read FILE with the same readers and checks as training. Evaluation is the training loop's own
`evaluate`, so the numbers are the ones training logged for the same data. What `predict` writes per
row is the task's (`TaskTraits.predicts` in the recipe schema): a class, or masked tokens filled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from peftrun.data import pad_id_for
from peftrun.data.tokenize import pad
from peftrun.errors import UserError
from peftrun.evaluation.evaluate import evaluate
from peftrun.model.load import load_processor
from peftrun.model.tasks import TASKS, Task, forward_logits, model_inputs
from peftrun.recipe.load import load_run_recipe
from peftrun.recipe.schema import DataConfig, Recipe
from peftrun.run.io_checks import reading
from peftrun.run.outputs import RESOLVED_RECIPE
from peftrun.run.run_dir import FINAL_DIR, final_dir, reload_artefact, tokenized_cache_dir
from peftrun.run.safe_paths import check_output, check_replaceable_dir, check_replaceable_file, staged_output
from peftrun.staging import staged_file

METRICS_JSON = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"


class LoadedRun:
    """A run's final artefact, ready to run on new data."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.final = final_dir(self.run_dir)
        if not (self.final / RESOLVED_RECIPE).is_file():
            raise UserError(f"{self.run_dir}: not a finished peftrun run (no {FINAL_DIR}/{RESOLVED_RECIPE})")
        self.recipe: Recipe = load_run_recipe(self.final / RESOLVED_RECIPE)
        self.task: Task = TASKS[self.recipe.task]
        # The tokenizer/image processor saved beside the weights: the one the model was trained with.
        model_cfg = self.recipe.model.model_copy(update={"tokenizer": str(self.final)})
        self.processor = load_processor(model_cfg, self.recipe.task)
        with reading(self.final):  # a damaged artefact: one line naming it
            self.model = reload_artefact(self.final, self.recipe).eval()

    def data_config(self, path: str) -> DataConfig:
        """The run's data settings (format, columns, class names, lengths) pointed at `path`."""
        return self.recipe.data.model_copy(
            update={
                "path": path,
                "datasets": None,
                "subset": None,
                "data_files": None,
                "val_path": None,
                "val_fraction": 0.0,
                "max_samples": None,
                "streaming": False,  # evaluation reads every row, and reports their count
            }
        )

    @property
    def batch_size(self) -> int:
        """Rows per forward when evaluating or predicting: eval.batch_size, else the training micro-batch."""
        return self.recipe.eval.batch_size or self.recipe.train.micro_batch_size

    def loader(self, dataset: Any, collate: Any) -> Any:
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, collate_fn=collate)


def _check_file(path: str) -> None:
    if not Path(path).exists():
        raise UserError(f"--data: file not found: {Path(path).resolve()}")


def evaluate_run(
    run_dir: str | Path, data_path: str, out_dir: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Metrics of the run's model on `data_path`, written to out_dir/metrics.json (and, for classifiers,
    confusion_matrix.png); out_dir defaults to RUN_DIR/eval/<file name>. Written atomically."""
    from accelerate import Accelerator

    _check_file(data_path)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval" / Path(data_path).name
    check_output(out, "--out", inputs=[data_path], run_dirs=[run_dir])
    check_replaceable_dir(out, "--out", overwrite=True)  # a previous evaluation (peftrun's) is replaced
    run = LoadedRun(run_dir)
    cfg = run.data_config(data_path)
    data = run.task.prepare(cfg, run.processor, run.recipe.train.seed, tokenized_cache_dir())
    collate = run.task.collator(run.processor, cfg, False, run.recipe.train.seed)
    accelerator = Accelerator()
    model = run.model.to(accelerator.device)
    result = evaluate(
        accelerator, model, accelerator.prepare(run.loader(data.train, collate)), run.task, None, cfg.labels
    )
    result = {"data": str(Path(data_path).resolve()), "samples": len(data.train), **result}  # type: ignore[arg-type]  # never streamed

    with staged_output(out) as tmp:
        (tmp / METRICS_JSON).write_text(json.dumps(result, indent=1))
        if run.task.predicts_labels:
            from peftrun.evaluation.metrics import plot_confusion_matrix

            plot_confusion_matrix(
                result["confusion_matrix"], cfg.labels or [], tmp / CONFUSION_PNG, f"{Path(data_path).name}"
            )
    return out, result


@torch.no_grad()
def predict_run(run_dir: str | Path, data_path: str, out_path: str | Path, overwrite: bool = False) -> int:
    """Write one JSON line per row of `data_path` (labels not needed): the predicted class with its
    probability and every class's (classifiers), or the text with its [MASK] tokens filled (masked_lm).
    Returns the number of rows written; an existing `out_path` is replaced only with `overwrite`.
    Causal-LM runs generate (see use/generate.py): the row's prompt, conversation (a last assistant
    turn is dropped) or instruction is answered greedily."""
    _check_file(data_path)
    check_output(out_path, "--out", inputs=[data_path], run_dirs=[run_dir])
    check_replaceable_file(Path(out_path), "--out", overwrite)
    if _run_task(run_dir) == "causal_lm":
        from peftrun.use.generate import GenerationSettings, generate_file

        return generate_file(str(run_dir), data_path, str(out_path), GenerationSettings())
    run = LoadedRun(run_dir)
    if run.task.traits.predicts is None:
        raise UserError(
            f"predict: runs of task {run.recipe.task} are not supported (classifiers and masked_lm are); "
            "use `peftrun eval` for loss and perplexity"
        )
    cfg = run.data_config(data_path)
    data = run.task.prepare(cfg, run.processor, run.recipe.train.seed, None, labelled=False)
    predict = _classify if run.task.traits.predicts == "label" else _fill_masks
    records = predict(run, cfg, data.train)
    with staged_file(Path(out_path)) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def _run_task(run_dir: str | Path) -> str | None:
    from peftrun.recipe.load import load_run_recipe

    path = final_dir(Path(run_dir)) / RESOLVED_RECIPE
    return load_run_recipe(path).task if path.is_file() else None


def _classify(run: LoadedRun, cfg: DataConfig, dataset: Any) -> list[dict[str, Any]]:
    """The predicted class of each row, its probability and every class's."""
    collate = run.task.collator(run.processor, cfg, False, run.recipe.train.seed)
    names = cfg.labels or []
    records: list[dict[str, Any]] = []
    for start in range(0, len(dataset), run.batch_size):
        samples = [dataset[i] for i in range(start, min(start + run.batch_size, len(dataset)))]
        probs = forward_logits(run.model, collate(samples)).float().softmax(-1)
        for sample, p in zip(samples, probs.tolist(), strict=True):
            best = max(range(len(p)), key=p.__getitem__)
            records.append(
                {
                    "row": sample["row"],
                    "label": names[best],
                    "score": p[best],
                    "probs": dict(zip(names, p, strict=True)),
                }
            )
    return records


def _fill_masks(run: LoadedRun, cfg: DataConfig, dataset: Any) -> list[dict[str, Any]]:
    """Each row's text with its [MASK] tokens filled by the model's best guess."""
    tokenizer = run.processor
    records = []
    for i in range(len(dataset)):
        ids = list(dataset[i]["input_ids"])
        batch = {
            "input_ids": pad([ids], pad_id_for(tokenizer)),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        }
        best = forward_logits(run.model, model_inputs(batch))[0].argmax(-1).tolist()
        masked = [j for j, token in enumerate(ids) if token == tokenizer.mask_token_id]
        filled = [best[j] if j in masked else token for j, token in enumerate(ids)]
        records.append(
            {
                "row": dataset[i]["row"],
                "text": tokenizer.decode(filled, skip_special_tokens=True),
                "masked_tokens": tokenizer.convert_ids_to_tokens([best[j] for j in masked]),
            }
        )
    return records
