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

    .venv/bin/python benchmarks/zero_memory.py --lora [--hidden 2048] [--layers 16]

The LoRA case: a Llama-shaped model in bf16 (random weights, saved in 500 MB shards; ~0.85B
parameters at the defaults of this mode), LoRA r=16 on all linear layers, 2 steps of one 128-token
sample per process, run by `peftrun train` itself under each backend, final save and its check
included. Each process reports its own peak RSS (training and save), and its resident and peak RSS at
the end of each phase (PEFTRUN_MEMORY_LOG, peftrun/run/memory.py): the phase whose peak jumps is the
one that sets the run's peak. `--set KEY=VALUE ...` passes recipe overrides to these runs (e.g.
`cpu.malloc_cache=false`); `--full-fine-tune` runs the same model fully fine-tuned (under ZeRO-3: the
streamed save of dist/stream_weights.py).
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
    parser.add_argument("--lora", action="store_true", help="the ~1B bf16 LoRA case (see above)")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=list(BACKENDS),
        default=list(BACKENDS),
        help="the LoRA case's backends",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides for the LoRA case's runs (e.g. cpu.malloc_cache=false)",
    )
    parser.add_argument(
        "--full-fine-tune",
        action="store_true",
        help="the LoRA case's model and runs, full fine-tuning instead (under ZeRO-3: the streamed save)",
    )
    parser.add_argument("--worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    parser.add_argument(
        "--lora-worker", nargs="+", metavar="RECIPE OUT_JSON [KEY=VALUE ...]", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker(args, Path(args.worker))
        return 0
    if args.lora_worker:
        recipe, out, *overrides = args.lora_worker
        return lora_worker(Path(recipe), Path(out), overrides)
    if args.lora:
        return lora_case(args)

    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends:
            config = BACKENDS[name]
            out = Path(tmp) / f"{config}.json"
            print(f"running {name} ...", file=sys.stderr, flush=True)
            shape = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
            done = launch(config, args.processes, [*shape, "--worker", str(out)])
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                return 1
            rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
    print_table(rows, args.processes)
    return 0


def launch(
    config: str,
    processes: int,
    script_args: list[str],
    script: str = __file__,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`script script_args` on `processes` CPU ranks under accelerate_configs/`config`, on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        *("--config_file", str(REPO / "accelerate_configs" / config)),
        *("--num_processes", str(processes), "--main_process_port", str(port)),
        script,
        *script_args,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra_env or {})
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)


def lora_case(args: argparse.Namespace) -> int:
    from peftrun.run.memory import MEMORY_LOG_ENV

    hidden = args.hidden if args.hidden != 768 else 2048  # this mode's defaults: the ~1B model
    layers = args.layers if args.layers != 8 else 16
    rows: dict[str, list[dict[str, Any]]] = {}
    phases: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        method = FULL if args.full_fine_tune else LORA
        recipe = build_lora_case(Path(tmp), hidden, layers, args.vocab, method)
        for name in args.backends:
            config = BACKENDS[name]
            out = Path(tmp) / f"{config}.json"
            phase_log = Path(tmp) / f"{config}.phases.json"
            print(f"running {name} ...", file=sys.stderr, flush=True)
            done = launch(
                config,
                args.processes,
                ["--lora-worker", str(recipe), str(out), *args.set],
                extra_env={MEMORY_LOG_ENV: str(phase_log)},
            )
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                return 1
            rows[name] = sorted(
                (json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["rank"]
            )
            phases[name] = [json.loads(line) for line in phase_log.read_text().splitlines()]
            saved = [line for line in done.stdout.splitlines() if "[peftrun] saved" in line]
            print(f"{name}: {saved[-1] if saved else 'no save line'}", file=sys.stderr)
    what = "full fine-tune" if args.full_fine_tune else "LoRA r=16"
    print(f"\n{what}, bf16, {hidden=} {layers=}, {args.processes} CPU processes: peak RSS MB per process")
    print("| backend | " + " | ".join(f"rank {r}" for r in range(args.processes)) + " |")
    print("|---|" + "---:|" * args.processes)
    for name, ranks in rows.items():
        print(f"| {name} | " + " | ".join(f"{r['peak_rss_bytes'] / MB:,.0f}" for r in ranks) + " |")
    print_phases(phases)
    return 0


def print_phases(phases: dict[str, list[dict[str, Any]]]) -> None:
    """Resident and peak-so-far MB at each phase's end, rank 0 / rank 1 ...: the phase whose peak
    jumps is the one that sets the run's peak."""
    for name, records in phases.items():
        print(
            f"\n{name}: MB at the end of each phase, resident (peak so far; of it mapped files), rank 0 / rank 1 ..."
        )
        print("| phase | MB |\n|---|---:|")
        order = list(dict.fromkeys(record["phase"] for record in records))
        for phase in order:
            ranks = sorted((r for r in records if r["phase"] == phase), key=lambda r: r["rank"])
            cells = " / ".join(
                f"{r['rss_bytes'] / MB:,.0f} ({r['peak_rss_bytes'] / MB:,.0f}; files {r['file_rss_bytes'] / MB:,.0f})"
                for r in ranks
            )
            print(f"| {phase} | {cells} |")


LORA = {"kind": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
FULL = {"kind": "full"}


def build_lora_case(root: Path, hidden: int, layers: int, vocab: int, method: dict[str, Any]) -> Path:
    """The bf16 model, one 128-token sample per process, and the recipe; returns the recipe's path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftrun.demo.tiny import build_tokenizer

    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "ranks",
        "shard",
        "optimizer",
        "state",
    ]
    tokenizer = build_tokenizer(root / "model", [" ".join(words)] * 20, vocab_size=300)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of ~1B weights on the way
    try:
        LlamaForCausalLM(config).save_pretrained(root / "model", max_shard_size="500MB")
    finally:
        torch.set_default_dtype(default)
    text = tokenizer.decode(tokenizer(" ".join(words * 20))["input_ids"][:127])
    (root / "data.jsonl").write_text((json.dumps({"text": text}) + "\n") * 2)
    recipe = root / "lora.yaml"
    recipe.write_text(
        json.dumps(
            {
                "output_dir": str(root / "run"),
                "model": {"name_or_path": str(root / "model"), "dtype": "bf16"},
                "method": method,
                "data": {
                    "path": str(root / "data.jsonl"),
                    "format": "text",
                    "max_seq_len": 128,
                    "val_fraction": 0,
                },
                "train": {"max_steps": 2, "micro_batch_size": 1, "global_batch_size": 2, "lr": 1e-3},
                "logging": {"progress_bar": False, "plot": False},
                "checkpoint": {"at_end": False},
            }
        )
    )
    return recipe


def lora_worker(recipe: Path, out: Path, overrides: list[str]) -> int:
    from peftrun.cli.main import main as peftrun_main

    # One run directory per backend: a run directory belongs to one run (run/owner.py).
    code = peftrun_main(["train", str(recipe), f"output_dir={out.with_suffix('')}-run", *overrides])
    record = {"rank": int(os.environ.get("RANK", "0")), "peak_rss_bytes": _peak_rss_bytes()}
    with out.open("a") as handle:  # one short line per process: appends do not interleave
        handle.write(json.dumps(record) + "\n")
    return code


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
