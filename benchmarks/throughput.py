"""Non-padding tokens/s of LoRA SFT: peftrun (packing on and off) against a hand-written Trainer script.

    .venv/bin/python benchmarks/throughput.py [--steps 40] [--rounds 3] [--samples 3000] [--preset cpu]
    .venv/bin/python benchmarks/throughput.py --preset llama-1b   # on a GPU: bf16, seq 2048, MFU

One run builds the workload once (a Llama-config model of ~21M parameters with a BPE tokenizer, and
alpaca-style samples of ~45 to 450 tokens, median ~150, like real SFT data), then trains it
in fresh subprocesses, alternating the sides (A B C A B C ...) so that the machine's noise hits all:

- baseline: `transformers.Trainer` + `peft` + `datasets` as a user writes it: alpaca prompt masked
  with -100, `DataCollatorForSeq2Seq` padding to the longest sample of each batch, LoRA r=16 on all
  linear layers, micro-batch 4, seq 512;
- peftrun, packing off: `peftrun train` on the same data, model and LoRA settings, same batches shape;
- peftrun, packing on: the same with `data.packing=true` (rows of up to 512 tokens);
- peftrun, packing on, `cpu.fused_lora=false`: peft's own LoRA layers, to measure that switch;
- peftrun, packing on, `cpu.matmul=torch`: torch's default BLAS instead of oneDNN, the same;
- peftrun, packing on, `train.compile=true`: each decoder layer through torch.compile (its compile
  time falls in the warm-up steps left out below; new row lengths may recompile once or twice).

Figures per side: median over rounds of the non-padding tokens/s of the training loop (per-step
figures from step 4 on, so start-up is left out), peak RSS of the process, and the final loss; then
the ratios to the baseline. Every side uses one process and the same thread count. The baseline's
padding share (computed tokens that are padding) is printed too: it bounds what packing can gain
where the step is compute-bound.

`--preset llama-1b` is the GPU workload: a Llama-3.2-1B-shaped model (random init), weights in bf16
with bf16 autocast on both sides, seq 2048, samples of ~50 to ~1,600 tokens. On CUDA it adds each
side's peak GPU memory and MFU: model FLOPs per non-padding token (4 x the matmul parameters, LM
head included: forward plus the input gradients of frozen weights, and 12 x layers x hidden x the
mean attended context for attention) times tokens/s, over the GPU's dense bf16 peak
(`--peak-tflops`, default 989 for H100/H200).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# peftrun's sides: packing on or off, and the `cpu` switches each one sets (the rest are defaults).
PEFTRUN_SIDES: dict[str, tuple[bool, dict[str, Any]]] = {
    "peftrun": (False, {}),
    "peftrun_packed": (True, {}),
    "peftrun_packed_peft_lora": (True, {"cpu": {"fused_lora": False}}),
    "peftrun_packed_torch_matmul": (True, {"cpu": {"matmul": "torch"}}),
    "peftrun_packed_compile": (True, {"train": {"compile": True}}),
}
SIDES = ("baseline", *PEFTRUN_SIDES)
WARMUP_STEPS = 3  # per-step figures of these first steps are left out (allocations, lazy imports)
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR = 2e-4


@dataclass(frozen=True)
class Preset:
    seq_len: int
    micro_batch: int
    dtype: str  # the base weights' dtype; bf16 also autocasts
    model: dict[str, Any]  # LlamaConfig fields
    words: tuple[float, float, int]  # log-normal (mu, sigma) of a sample's words, and the cap


PRESETS = {
    "cpu": Preset(
        seq_len=512,
        micro_batch=4,
        dtype="fp32",
        model={
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "tie_word_embeddings": False,
        },
        words=(4.7, 0.75, 380),  # ~110 words (~145 tokens), 50..450 tokens with the template
    ),
    "llama-1b": Preset(
        seq_len=2048,
        micro_batch=4,
        dtype="bf16",
        model={  # Llama-3.2-1B's shape
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
        },
        words=(5.6, 0.8, 1400),  # ~270 words (~330 tokens), up to ~1,600 tokens
    ),
}


# ---- the workload ----------------------------------------------------------------------------------------


def make_workload(root: Path, samples: int, preset: Preset, seed: int = 0) -> tuple[Path, Path]:
    """A tokenizer + Llama model (random init) and an alpaca-style jsonl with a realistic length spread."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftrun.demo.tiny import build_tokenizer

    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(3000)
    ]
    rows = []
    for _ in range(samples):
        mu, sigma, cap = preset.words
        total = int(min(cap, max(12, rng.lognormvariate(mu, sigma))))
        prompt_words = max(4, int(total * rng.uniform(0.15, 0.5)))
        rows.append(
            {
                "instruction": " ".join(rng.choice(words) for _ in range(prompt_words)),
                "input": "",
                "output": " ".join(rng.choice(words) for _ in range(total - prompt_words)),
            }
        )
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    model_dir = root / "model"
    model_dir.mkdir()
    # The prompt template in the corpus too, as in any real tokenizer's training text: otherwise its
    # English words split into ~86 pieces instead of the ~30 a Llama tokenizer makes of them.
    from peftrun.data.templates import render_alpaca_prompt

    corpus = [render_alpaca_prompt(r["instruction"], "") + r["output"] for r in rows[:2000]]
    tokenizer = build_tokenizer(model_dir, corpus, vocab_size=8000)
    config = LlamaConfig(
        **{"vocab_size": len(tokenizer), **preset.model},
        max_position_embeddings=preset.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if preset.dtype == "bf16":
        model = model.to(torch.bfloat16)  # half the bytes to write and load for the 1B shape
    model.save_pretrained(model_dir)
    return model_dir, data


# ---- the sides (each runs in its own subprocess) ------------------------------------------------------


def run_baseline(model_dir: Path, data: Path, steps: int, out: Path, preset: Preset) -> dict[str, Any]:
    """The hand-written script: what a user writes with the libraries' documented defaults."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from peftrun.data.templates import render_alpaca_prompt

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def tokenize(row: dict[str, str]) -> dict[str, list[int]]:
        prompt = render_alpaca_prompt(row["instruction"], row["input"])
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(
            prompt + row["output"] + tokenizer.eos_token, truncation=True, max_length=preset.seq_len
        )["input_ids"]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[: len(ids)]}

    dataset = load_dataset("json", data_files=str(data))["train"]
    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtypes[preset.dtype])
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    tokens_per_batch: list[int] = []
    computed_per_batch: list[int] = []
    padded = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = padded(features)
        tokens_per_batch.append(int(batch["attention_mask"].sum()))
        computed_per_batch.append(batch["attention_mask"].numel())
        return batch

    step_ends: list[float] = []

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            step_ends.append(time.perf_counter())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            step_ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=preset.micro_batch,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=preset.dtype == "bf16",
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[StepTimer()]
    )
    trainer.train()
    per_step = [
        tokens / (end - start)
        for tokens, start, end in zip(tokens_per_batch, step_ends, step_ends[1:], strict=False)
    ]
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "tokens_per_s": per_step[WARMUP_STEPS:],
        "final_loss": losses[-1],
        "padding_share": 1 - sum(tokens_per_batch) / sum(computed_per_batch),
    }


def run_peftrun(
    model_dir: Path,
    data: Path,
    steps: int,
    out: Path,
    preset: Preset,
    packing: bool,
    switches: dict[str, Any],
) -> dict[str, Any]:
    import yaml

    from peftrun.recipe.load import load_recipe
    from peftrun.train.loop import train

    recipe = {
        "output_dir": str(out / "run"),
        "model": {"name_or_path": str(model_dir), "dtype": preset.dtype},
        "method": {"kind": "lora", **LORA, "target_modules": "all-linear"},
        "data": {
            "path": str(data),
            "format": "alpaca",
            "max_seq_len": preset.seq_len,
            **({"packing": True} if packing else {}),
        },
        "train": {
            "max_steps": steps,
            "micro_batch_size": preset.micro_batch,
            "global_batch_size": preset.micro_batch,
            "mixed_precision": "bf16" if preset.dtype == "bf16" else "no",
            "lr": LR,
            "scheduler": "cosine",
            "warmup_steps": 0,
            **switches.get("train", {}),
        },
        "cpu": switches.get("cpu", {}),
        "logging": {"every_steps": 1, "report_to": [], "progress_bar": False, "plot": False},
        "checkpoint": {"at_end": False},
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = train(load_recipe(path, []))
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]
    return {
        "tokens_per_s": [r["tokens_per_s"] for r in records][WARMUP_STEPS:],
        "final_loss": result.losses[-1],
    }


def worker(side: str, preset: Preset, model_dir: Path, data: Path, steps: int, out: Path) -> None:
    import torch

    if side == "baseline":
        figures = run_baseline(model_dir, data, steps, out, preset)
    else:
        packing, switches = PEFTRUN_SIDES[side]
        figures = run_peftrun(model_dir, data, steps, out, preset, packing, switches)
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        figures["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        figures["gpu"] = torch.cuda.get_device_name()
    (out / "figures.json").write_text(json.dumps(figures))


def flops_per_token(model_dir: Path, data: Path) -> float:
    """Model FLOPs per non-padding token of LoRA training (see the module docstring)."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    attention = config.hidden_size * (2 * config.hidden_size)  # q and o
    attention += config.hidden_size * 2 * config.num_key_value_heads * head_dim  # k and v
    mlp = 3 * config.hidden_size * config.intermediate_size
    matmul_params = config.num_hidden_layers * (attention + mlp) + config.vocab_size * config.hidden_size
    lengths = [len(tokenizer(line)["input_ids"]) for line in data.read_text().splitlines()[:500]]
    mean_context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    return 4 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * mean_context


# ---- driver ------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, interleaved (default 3)")
    parser.add_argument("--samples", type=int, default=3000, help="samples in the dataset (default 3000)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="workload (default cpu)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak, for MFU")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--worker", nargs=4, metavar=("SIDE", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.worker:
        side, model_dir, data, out = args.worker
        worker(side, preset, Path(model_dir), Path(data), args.steps, Path(out))
        return 0

    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = make_workload(root, args.samples, preset)
        model_flops = flops_per_token(model_dir, data)
        for round_number in range(args.rounds):
            for side in args.sides:
                out = root / f"{side}-{round_number}"
                out.mkdir()
                print(f"round {round_number + 1}/{args.rounds}: {side} ...", flush=True)
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--preset", args.preset]
                cmd += ["--worker", side, str(model_dir), str(data), str(out)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stdout[-2000:], done.stderr[-4000:], sep="\n")
                    return 1
                results[side].append(json.loads((out / "figures.json").read_text()))

    def run_tps(run: dict[str, Any]) -> float:
        return float(statistics.median(run["tokens_per_s"]))

    def median_tps(side: str) -> float:
        return statistics.median(run_tps(r) for r in results[side])

    on_gpu = all("peak_gpu_mb" in r for runs in results.values() for r in runs)
    where = results[args.sides[0]][0].get("gpu", "GPU") if on_gpu else f"{os.cpu_count()} CPU cores"
    print(
        f"\nLoRA r=16 all-linear, preset {args.preset} ({preset.dtype}), seq {preset.seq_len}, "
        f"micro-batch {preset.micro_batch}, {args.steps} steps, {args.rounds} interleaved runs per side, "
        f"{where}\n"
    )
    gpu_columns = " peak GPU MB | MFU |" if on_gpu else ""
    print(
        f"| side | non-padding tokens/s (median) | per run | vs baseline | peak RSS MB |{gpu_columns} final loss |"
    )
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if on_gpu else "") + "---:|")
    base = median_tps("baseline") if "baseline" in results else None
    for side in args.sides:
        tps = median_tps(side)
        runs = " / ".join(f"{run_tps(r):,.0f}" for r in results[side])
        ratio = f"{tps / base:.2f}x" if base else "-"
        rss = statistics.median(r["peak_rss_mb"] for r in results[side])
        loss = statistics.median(r["final_loss"] for r in results[side])
        gpu = ""
        if on_gpu:
            gpu_mb = statistics.median(r["peak_gpu_mb"] for r in results[side])
            gpu = f" {gpu_mb:,.0f} | {tps * model_flops / (args.peak_tflops * 1e12):.1%} |"
        print(f"| {side} | {tps:,.0f} | {runs} | {ratio} | {rss:,.0f} |{gpu} {loss:.3f} |")
    if "baseline" in results:
        share = statistics.median(r["padding_share"] for r in results["baseline"])
        print(f"\nbaseline: {share:.0%} of the computed tokens were padding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
