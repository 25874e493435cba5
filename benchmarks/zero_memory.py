"""Per-process memory of a full fine-tune under DDP, ZeRO-2 and ZeRO-3: measured, not estimated.

    .venv/bin/python benchmarks/zero_memory.py [--processes 2] [--hidden 768] [--layers 8]

For each backend this launches `accelerate launch --config_file accelerate_configs/<cfg>.yaml` with N
CPU processes (gloo; the same configs and the same `make_accelerator` as `peftrun train`). Every
process builds the same randomly initialised Llama (default ~106M parameters, 424 MB in fp32), does
one AdamW step (so the optimizer state exists) and a second forward/backward (so the gradients
exist), then adds up the bytes of the tensors it really holds, each storage counted once:

- parameters: the model's weights (under ZeRO-3: the slice of each weight this process owns);
- gradients: the gradients of the model's weights, plus whatever DeepSpeed keeps them in (reduced
  gradient partitions, reduce buckets): every live tensor not counted in another column;
- optimizer: AdamW's moments, plus the fp32 master partition that ZeRO's wrapped optimizer updates;
- peak RSS: the process's peak resident memory (libraries and activations included), as a check.

The DDP reducer's own gradient buckets live in C++ and are invisible to this count (they add one more
gradient-sized copy per process); its peak RSS shows them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {"DDP": "ddp.yaml", "ZeRO-2": "zero2.yaml", "ZeRO-3": "zero3.yaml"}
MB = 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args, Path(args.worker))
        return 0

    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in BACKENDS.items():
            out = Path(tmp) / f"{config}.json"
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cmd = [
                str(Path(sys.executable).parent / "accelerate"),
                "launch",
                "--config_file",
                str(REPO / "accelerate_configs" / config),
                "--num_processes",
                str(args.processes),
                "--main_process_port",
                str(port),
                __file__,
                *("--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)),
                "--worker",
                str(out),
            ]
            env = {
                **os.environ,
                "ACCELERATE_USE_CPU": "true",
                "OMP_NUM_THREADS": "1",
                "PYTHONWARNINGS": "ignore",
            }
            print(f"running {name} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                return 1
            rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
    print_table(rows, args.processes)
    return 0


def print_table(rows: dict[str, list[dict[str, Any]]], processes: int) -> None:
    first = next(iter(rows.values()))[0]
    print(
        f"\nFull fine-tune, fp32, AdamW, {first['parameters']:,} parameters "
        f"({first['parameters'] * 4 / MB:.0f} MB), {processes} CPU processes; MB per process (rank 0 / rank 1 ...)\n"
    )
    header = ["backend", "parameters", "gradients", "optimizer", "sum", "peak RSS"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for name, ranks in rows.items():
        ranks = sorted(ranks, key=lambda r: r["rank"])

        def cell(key: str, ranks: list[dict[str, Any]] = ranks) -> str:
            return " / ".join(f"{r[key] / MB:.0f}" for r in ranks)

        print(
            f"| {name} | {cell('param_bytes')} | {cell('grad_bytes')} | {cell('optim_bytes')} | "
            f"{cell('sum_bytes')} | {cell('peak_rss_bytes')} |"
        )


# ---- one process ---------------------------------------------------------------------------------


def worker(args: argparse.Namespace, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftrun.dist.accelerator import is_deepspeed, make_accelerator, zero_stage
    from peftrun.recipe.schema import Recipe

    recipe = Recipe.model_validate(
        {
            "output_dir": tempfile.mkdtemp(),
            "model": {"name_or_path": "benchmark"},
            "data": {"path": "benchmark.jsonl"},
            "method": {"kind": "full"},
            "train": {"micro_batch_size": 1, "global_batch_size": args.processes, "max_grad_norm": None},
            "logging": {"report_to": []},
        }
    )
    accelerator = make_accelerator(recipe, log_with=[])
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # the same weights on every process; DeepSpeed splits them in prepare
    parameters = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    data = torch.utils.data.DataLoader(
        [{"input_ids": torch.randint(0, args.vocab, (64,))} for _ in range(4 * args.processes)], batch_size=1
    )
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    deepspeed = is_deepspeed(accelerator)
    batches = iter(data)

    def forward_backward() -> None:
        batch = next(batches)
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        if deepspeed:
            model.backward(loss)  # the engine: reduce the gradients, no optimizer step yet
        else:
            accelerator.backward(loss)

    forward_backward()  # step 1: creates the optimizer state
    if deepspeed:
        model.step()
    else:
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    forward_backward()  # step 2: gradients live again, measured before they are applied
    gc.collect()
    counts = count_tensors(accelerator.unwrap_model(model), optimizer, deepspeed)
    counts.update(
        rank=accelerator.process_index,
        backend=accelerator.distributed_type.value,
        zero_stage=zero_stage(accelerator),
        parameters=parameters,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    for rank in range(accelerator.num_processes):  # one writer at a time
        if rank == accelerator.process_index:
            with out.open("a") as handle:
                handle.write(json.dumps(counts) + "\n")
        accelerator.wait_for_everyone()


def count_tensors(model: Any, optimizer: Any, deepspeed: bool) -> dict[str, int]:
    """Bytes of the storages this process holds, each counted once, by role (see the module doc)."""
    import torch

    seen: set[int] = set()

    def add(tensors: Any) -> int:
        total = 0
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    params = list(model.parameters())
    param_bytes = add(p.data for p in params) + add(getattr(p, "ds_tensor", None) for p in params)
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> AdamW
        inner = inner.optimizer
    optim_tensors = [v for state in inner.state.values() for v in state.values()]
    # What the inner AdamW updates: ZeRO's fp32 master partitions (ZeRO-3 puts them in param_groups
    # only during its step; they stay as the keys of the state).
    masters = [p for group in inner.param_groups for p in group["params"]] + list(inner.state)
    optim_bytes = add(optim_tensors) + add(masters)
    grad_bytes = add(p.grad for p in params) + add(p.grad for p in masters)
    # Everything else alive is gradient bookkeeping (DeepSpeed's reduced-gradient partitions and
    # reduce buckets) apart from the model's small buffers (rotary frequencies).
    add(model.buffers())
    grad_bytes += add(obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor))
    return {
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optim_bytes": optim_bytes,
        "sum_bytes": param_bytes + grad_bytes + optim_bytes,
    }


if __name__ == "__main__":
    sys.exit(main())
