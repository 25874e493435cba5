"""The GPU figures in one command: tokens/s, peak GPU memory, MFU and the plan's prediction.

    .venv/bin/python benchmarks/gpu.py [--steps 30] [--sides lora_packed full_packed ...]
    .venv/bin/python benchmarks/gpu.py --dry-run     # CPU, tiny shape, 2 steps: checks the script works

Workload: benchmarks/throughput.py's `llama-1b` preset (a Llama-3.2-1B-shaped model, random init, bf16
weights with bf16 autocast, seq 2048, alpaca-style samples of ~50 to ~1,600 tokens, micro-batch 4).
Sides, each in a fresh process: the hand-written Trainer + peft LoRA baseline (throughput.py's), and
peftrun with LoRA (r 16, all-linear), QLoRA (NF4, bf16 compute) and full fine-tuning, packing on and
off, Liger kernels on and off (train.liger; CUDA only, skipped without it).

Per side: median non-padding tokens/s (steps after the warm-up), peak GPU memory
(torch.cuda.max_memory_allocated), MFU and `peftrun plan`'s prediction for one GPU (model states +
activation peak, without the 1 GB context allowance: the allocator does not see the context).
MFU = tokens/s x FLOPs per token / peak bf16 FLOP/s (--peak-tflops, default 989: H100/H200 dense),
FLOPs per token = k x matmul parameters (LM head included) + 12 x layers x hidden x mean attended
context, with k = 4 for adapters (forward + input gradients) and 6 for full fine-tuning (+ weight
gradients). The formula is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import throughput  # noqa: E402  (the workload and the baseline are throughput.py's)

# side -> (method, packing, train switches)
SIDES: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "lora": ("lora", False, {}),
    "lora_packed": ("lora", True, {}),
    "lora_packed_liger": ("lora", True, {"liger": True}),
    "qlora": ("qlora", False, {}),
    "qlora_packed": ("qlora", True, {}),
    "qlora_packed_liger": ("qlora", True, {"liger": True}),
    "full": ("full", False, {}),
    "full_packed": ("full", True, {}),
    "full_packed_liger": ("full", True, {"liger": True}),
}
ALL_SIDES = ("baseline", *SIDES)
DRY = throughput.Preset(
    seq_len=128,
    micro_batch=2,
    dtype="fp32",
    model={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "tie_word_embeddings": True},
    words=(3.5, 0.5, 90),
)  # fmt: skip


def side_recipe(
    side: str, preset: throughput.Preset, model_dir: Path, data: Path, steps: int, out: Path
) -> Any:
    from peftrun.recipe.schema import Recipe

    method, packing, switches = SIDES[side]
    model: dict[str, Any] = {"name_or_path": str(model_dir), "dtype": preset.dtype}
    if method == "qlora":
        model["quantization"] = {"bits": 4, "compute_dtype": "bf16" if preset.dtype == "bf16" else "fp32"}
    spec = (
        {"kind": "full"}
        if method == "full"
        else {"kind": "lora", **throughput.LORA, "target_modules": "all-linear"}
    )
    return Recipe.model_validate(
        {
            "output_dir": str(out / "run"),
            "model": model,
            "method": spec,
            "data": {
                "path": str(data),
                "format": "alpaca",
                "max_seq_len": preset.seq_len,
                "packing": packing,
            },
            "train": {
                "max_steps": steps,
                "micro_batch_size": preset.micro_batch,
                "global_batch_size": preset.micro_batch,
                "mixed_precision": "bf16" if preset.dtype == "bf16" else "no",
                "lr": throughput.LR,
                **switches,
            },
            "logging": {"every_steps": 1, "report_to": [], "progress_bar": False, "plot": False},
            "checkpoint": {"at_end": False},
        }
    )


def planned_bytes(recipe: Any) -> int:
    """The plan's one-GPU figure: model states + activation peak (no context allowance)."""
    from peftrun.model.load import load_model_config
    from peftrun.plan import precision_for
    from peftrun.plan.census import count_model
    from peftrun.plan.memory import LAUNCHES, activations, model_states

    census = count_model(recipe, load_model_config(recipe.model))
    precision = precision_for(recipe, deepspeed=False)
    tokens = recipe.train.micro_batch_size * recipe.data.max_seq_len
    mask = 0 if recipe.data.packing else recipe.train.micro_batch_size * recipe.data.max_seq_len**2
    states = model_states(census, LAUNCHES[0], 1, recipe.train.optimizer, precision)
    acts = activations(census, tokens, tokens, recipe.model.gradient_checkpointing, precision, mask)
    return states.total + acts.peak


def worker(side: str, preset: throughput.Preset, model_dir: Path, data: Path, steps: int, out: Path) -> None:
    import resource

    import torch

    if side == "baseline":
        figures = throughput.run_baseline(model_dir, data, steps, out, preset)
    else:
        from peftrun.train.loop import train

        recipe = side_recipe(side, preset, model_dir, data, steps, out)
        result = train(recipe)
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        figures = {
            "tokens_per_s": rates[throughput.WARMUP_STEPS :] or rates,
            "final_loss": result.losses[-1],
            "planned_bytes": planned_bytes(recipe),
        }
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        figures["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        figures["gpu"] = torch.cuda.get_device_name()
    (out / "figures.json").write_text(json.dumps(figures))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak, for MFU")
    parser.add_argument("--sides", nargs="+", choices=ALL_SIDES, default=list(ALL_SIDES))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, 2 steps, no Liger sides")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--worker", nargs=4, metavar=("SIDE", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = DRY if args.dry_run else throughput.PRESETS["llama-1b"]
    if args.worker:
        side, model_dir, data, out = args.worker
        worker(side, preset, Path(model_dir), Path(data), args.steps, Path(out))
        return 0
    import torch

    steps = 2 if args.dry_run else args.steps
    cuda = torch.cuda.is_available()
    sides = [s for s in args.sides if cuda or "liger" not in s]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = throughput.make_workload(root, 200 if args.dry_run else args.samples, preset)
        lora_flops = throughput.flops_per_token(model_dir, data)
        for side in sides:
            out = root / side
            out.mkdir()
            print(f"{side} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--steps", str(steps), *(["--dry-run"] if args.dry_run else [])]
            done = subprocess.run([*cmd, "--worker", side, str(model_dir), str(data), str(out)],
                                  env=env, capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                results[side] = {"failed": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
                continue
            results[side] = json.loads((out / "figures.json").read_text())
        matmul_flops = _matmul_flops(model_dir)
    print_table(results, preset, steps, lora_flops, matmul_flops, args.peak_tflops)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0 if all("failed" not in r for r in results.values()) else 1


def _matmul_flops(model_dir: Path) -> float:
    """2 x the matmul parameters: the weight-gradient FLOPs per token that full fine-tuning adds."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = (
        2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    )
    return 2.0 * (c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size)


def print_table(
    results: dict[str, dict[str, Any]],
    preset: Any,
    steps: int,
    lora_flops: float,
    matmul_flops: float,
    peak: float,
) -> None:
    print(f"\nseq {preset.seq_len}, micro-batch {preset.micro_batch}, {preset.dtype}, {steps} steps")
    print(
        "MFU = tokens/s x FLOPs/token / (peak TFLOPS x 1e12); FLOPs/token = 4 x matmul params (6 x for full "
        f"fine-tuning) + 12 x layers x hidden x mean context = {lora_flops / 1e9:.2f} GFLOP (adapters), "
        f"{(lora_flops + matmul_flops) / 1e9:.2f} GFLOP (full); peak {peak:g} TFLOPS\n"
    )
    print("| side | tokens/s (median) | peak GPU GB | plan GB | plan error | MFU | final loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for side, r in results.items():
        if "failed" in r:
            print(f"| {side} | failed: {r['failed']} ||||||")
            continue
        tps = (
            statistics.median(r["tokens_per_s"]) if r["tokens_per_s"] else float("nan")
        )  # dry run: too few steps
        flops = lora_flops + (matmul_flops if side.startswith("full") else 0.0)
        measured = r.get("peak_gpu_bytes")
        planned = r.get("planned_bytes")
        gpu = f"{measured / 2**30:.2f}" if measured else "-"
        plan = f"{planned / 2**30:.2f}" if planned else "-"
        error = f"{100 * (planned - measured) / measured:+.0f}%" if measured and planned else "-"
        mfu = f"{100 * tps * flops / (peak * 1e12):.1f}%" if measured else "-"
        print(f"| {side} | {tps:,.0f} | {gpu} | {plan} | {error} | {mfu} | {r['final_loss']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
