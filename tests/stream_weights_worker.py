"""Launched by tests/test_stream_weights.py under `accelerate launch` with zero3.yaml on 2 CPU processes:
a tiny fp32 model trained one step under ZeRO-3, its weights streamed to small shards and checked, then
one tensor of a copy corrupted and checked again. Writes result.json and the trained weights (gathered
whole on the main process, which only a tiny model allows) for the test to compare with."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import deepspeed
import torch

from peftrun.dist.accelerator import make_accelerator
from peftrun.dist.stream_weights import check_streamed_weights, write_streamed_weights
from peftrun.model.load import load_base, make_trainable
from peftrun.recipe.schema import Recipe

SHARD_BYTES = 64 * 1024  # a tiny model in several files


def main(model_dir: Path, out: Path) -> None:
    recipe = Recipe.model_validate(
        {
            "output_dir": str(out / "run"),
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": "unused.jsonl"},
            "method": {"kind": "full"},
            "train": {"micro_batch_size": 1, "global_batch_size": 2, "max_grad_norm": None},
            "logging": {"report_to": []},
        }
    )
    accelerator = make_accelerator(recipe, log_with=[])
    model = make_trainable(load_base(recipe), recipe)
    loaded_as_saved = loaded_equals_checkpoint(model, model_dir)  # read one tensor at a time (zero3_load)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = [{"input_ids": torch.arange(1, 17)} for _ in range(2)]
    loader: torch.utils.data.DataLoader[dict[str, torch.Tensor]] = torch.utils.data.DataLoader(
        batches,  # type: ignore[arg-type]  # a list is a map-style dataset
        batch_size=1,
    )
    engine, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batch = next(iter(loader))
    engine.backward(engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)
    engine.step()

    main_process = accelerator.is_main_process
    unwrapped = accelerator.unwrap_model(engine)
    trained = {}
    for name, param in unwrapped.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            trained[name] = param.detach().clone()
    good, corrupted = out / "saved", out / "corrupted"
    if main_process:
        good.mkdir()
    accelerator.wait_for_everyone()
    files, write_failure = write_streamed_weights(main_process, unwrapped, good, max_bytes=SHARD_BYTES)
    assert write_failure is None, write_failure
    checked, failure = check_streamed_weights(main_process, unwrapped, good, each_nonzero=True)
    if main_process:
        shutil.copytree(good, corrupted)
        victim = corrupt_one_tensor(corrupted)
    accelerator.wait_for_everyone()
    _, corrupted_failure = check_streamed_weights(main_process, unwrapped, corrupted, each_nonzero=True)
    if main_process:
        unwrapped.config.save_pretrained(good)
        torch.save(trained, out / "trained.pt")
        result = {
            "files": files,
            "checked": checked,
            "failure": failure,
            "corrupted": corrupted_failure,
            "loaded_as_saved": loaded_as_saved,
            "victim": victim,
        }
        (out / "result.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


def loaded_equals_checkpoint(model: torch.nn.Module, model_dir: Path) -> bool:
    from safetensors.torch import load_file

    saved = load_file(model_dir / "model.safetensors")
    equal = True
    for name, param in model.named_parameters():
        assert hasattr(param, "ds_id"), f"{name} is not partitioned"
        with deepspeed.zero.GatheredParameters([param]):
            equal = equal and torch.equal(param.detach(), saved[name])
    return equal


def corrupt_one_tensor(directory: Path) -> str:
    """Add 1 to one element of the last saved matrix; returns its name."""
    from safetensors.torch import load_file, save_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    for file in sorted({directory / name for name in index["weight_map"].values()}, reverse=True):
        tensors = load_file(file)
        matrices = [key for key, tensor in tensors.items() if tensor.dim() == 2]
        if matrices:
            tensors[matrices[-1]].view(-1)[0] += 1.0
            save_file(tensors, file, metadata={"format": "pt"})
            return matrices[-1]
    raise AssertionError(f"{directory}: no matrix saved")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
