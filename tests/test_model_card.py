"""`--model-card` and `--push-to-hub`: the card's Hub metadata and run facts; the upload's arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from peftrun.cli.main import main
from peftrun.merge.model_card import push_to_hub, render_card
from peftrun.recipe.load import load_recipe
from peftrun.run.outputs import RESOLVED_RECIPE
from peftrun.train.loop import train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, alpaca_file: Path) -> Path:
    out = tmp_path_factory.mktemp("card") / "run"
    recipe = {
        "output_dir": str(out),
        "model": {"name_or_path": str(tiny_llama)},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"path": str(alpaca_file), "max_seq_len": 256, "val_fraction": 0.25},
        "train": {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3},
        "logging": {"report_to": [], "progress_bar": False, "plot": False},
    }
    path = out.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train(load_recipe(path))
    return out


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    loaded: dict[str, Any] = yaml.safe_load(card.split("---\n")[1])
    return loaded


def test_adapter_export_writes_a_card_with_hub_metadata_and_run_facts(
    finished_run: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    assert main(["export", str(finished_run), "--out", str(out), "--model-card"]) == 0
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == str(tiny_llama) and meta["library_name"] == "peft"
    assert "peftrun" in meta["tags"] and "lora" in meta["tags"] and meta["license"] == "other"
    assert "license: other  # set the license" in card  # the placeholder says what to do
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert f"| optimizer steps | {manifest['steps']} |" in card
    assert f"| training samples | {manifest['data']['train_samples']} |" in card
    assert f"| final eval loss | {manifest['final_eval_loss']:.4f} |" in card
    assert "max_steps: 2" in card  # the resolved recipe


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls instead of making them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, **kwargs: Any) -> None:
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs: Any) -> str:
        self.calls.append(("upload_folder", kwargs))
        return "https://huggingface.co/me/model/commit/abc"


def test_push_to_hub_uploads_the_export_directory(tmp_path: Path) -> None:
    api = RecordingApi()
    (tmp_path / "README.md").write_text("card")
    assert push_to_hub(tmp_path, "me/model", api=api).endswith("/commit/abc")
    assert api.calls[0] == ("create_repo", {"repo_id": "me/model", "repo_type": "model", "exist_ok": True})
    name, upload = api.calls[1]
    assert (
        name == "upload_folder" and upload["repo_id"] == "me/model" and upload["folder_path"] == str(tmp_path)
    )


def test_push_without_network_is_one_line(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "adapter"
    assert main(["export", str(finished_run), "--out", str(out), "--push-to-hub", "me/model"]) == 2
    assert "the Hub is not reachable (HF_HUB_OFFLINE is set)" in capsys.readouterr().err
    assert (out / "README.md").is_file()  # the export and its card are kept


def test_the_card_names_the_hub_datasets_of_a_mixture(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    data = {
        "path": "",
        "datasets": [{"path": "org/chats"}, {"path": str(tmp_path / "shards")}, {"path": "x/*.jsonl"}],
    }
    (tmp_path / RESOLVED_RECIPE).write_text(yaml.safe_dump({"method": {"kind": "lora"}, "data": data}))
    card = render_card(tmp_path, "adapter", "base/model")
    front = yaml.safe_load(card.split("---")[1])
    assert front["datasets"] == ["org/chats"]  # local folders and globs are not Hub datasets
