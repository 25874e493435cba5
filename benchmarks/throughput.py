"""Non-padding tokens/s of LoRA SFT: peftrun (packing on and off) against a hand-written Trainer script.

    .venv/bin/python benchmarks/throughput.py [--steps 40] [--rounds 2] [--samples 3000]

One run builds the workload once (a Llama-config model of ~21M parameters with a BPE tokenizer, and
alpaca-style samples whose lengths spread from 20 to 450 tokens like real SFT data), then trains it
in fresh subprocesses, alternating the sides (A B C A B C ...) so that the machine's noise hits all:

- baseline: `transformers.Trainer` + `peft` + `datasets` as a user writes it: alpaca prompt masked
  with -100, `DataCollatorForSeq2Seq` padding to the longest sample of each batch, LoRA r=16 on all
  linear layers, micro-batch 4, seq 512;
- peftrun, packing off: `peftrun train` on the same data, model and LoRA settings, same batches shape;
- peftrun, packing on: the same with `data.packing=true` (rows of up to 512 tokens).

Figures per side: median over rounds of the non-padding tokens/s of the training loop (per-step
figures from step 4 on, so start-up is left out), peak RSS of the process, and the final loss; then
the ratios to the baseline. Every side uses one process and the same thread count.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SIDES = ("baseline", "peftrun", "peftrun_packed")
WARMUP_STEPS = 3  # per-step figures of these first steps are left out (allocations, lazy imports)
SEQ_LEN = 512
MICRO_BATCH = 4
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR = 2e-4


# ---- the workload ----------------------------------------------------------------------------------------


def make_workload(root: Path, samples: int, seed: int = 0) -> tuple[Path, Path]:
    """A tokenizer + Llama model (random init) and an alpaca-style jsonl with a realistic length spread."""
    sys.path.insert(0, str(REPO))
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftrun.tiny import build_tokenizer

    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(3000)
    ]
    rows = []
    for _ in range(samples):
        # Total length log-normal around ~110 words, clipped to 12..330 words (~20..450 tokens).
        total = int(min(330, max(12, rng.lognormvariate(4.7, 0.6))))
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
    corpus = [f"{r['instruction']} {r['output']}" for r in rows[:2000]]
    tokenizer = build_tokenizer(model_dir, corpus, vocab_size=8000)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=SEQ_LEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir, data


# ---- the sides (each runs in its own subprocess) ------------------------------------------------------


def run_baseline(model_dir: Path, data: Path, steps: int, out: Path) -> dict[str, Any]:
    """The hand-written script: what a user writes with the libraries' documented defaults."""
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

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def tokenize(row: dict[str, str]) -> dict[str, list[int]]:
        prompt = render_alpaca_prompt(row["instruction"], row["input"])
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + row["output"] + tokenizer.eos_token, truncation=True, max_length=SEQ_LEN)[
            "input_ids"
        ]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[: len(ids)]}

    dataset = load_dataset("json", data_files=str(data))["train"]
    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    tokens_per_batch: list[int] = []
    padded = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = padded(features)
        tokens_per_batch.append(int(batch["attention_mask"].sum()))
        return batch

    step_ends: list[float] = []

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            step_ends.append(time.perf_counter())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            step_ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=MICRO_BATCH,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
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
    return {"tokens_per_s": per_step[WARMUP_STEPS:], "final_loss": losses[-1]}


def run_peftrun(model_dir: Path, data: Path, steps: int, out: Path, packing: bool) -> dict[str, Any]:
    import yaml

    from peftrun.recipe.load import load_recipe
    from peftrun.train import train

    recipe = {
        "output_dir": str(out / "run"),
        "model": {"name_or_path": str(model_dir)},
        "method": {"kind": "lora", **LORA, "target_modules": "all-linear"},
        "data": {
            "path": str(data),
            "format": "alpaca",
            "max_seq_len": SEQ_LEN,
            **({"packing": True} if packing else {}),
        },
        "train": {
            "max_steps": steps,
            "micro_batch_size": MICRO_BATCH,
            "global_batch_size": MICRO_BATCH,
            "lr": LR,
            "scheduler": "cosine",
            "warmup_steps": 0,
        },
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


def worker(side: str, model_dir: Path, data: Path, steps: int, out: Path) -> None:
    if side == "baseline":
        figures = run_baseline(model_dir, data, steps, out)
    else:
        figures = run_peftrun(model_dir, data, steps, out, packing=side == "peftrun_packed")
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "figures.json").write_text(json.dumps(figures))


# ---- driver ------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, interleaved (default 2)")
    parser.add_argument("--samples", type=int, default=3000, help="samples in the dataset (default 3000)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--worker", nargs=4, metavar=("SIDE", "MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, model_dir, data, out = args.worker
        worker(side, Path(model_dir), Path(data), args.steps, Path(out))
        return 0

    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = make_workload(root, args.samples)
        for round_number in range(args.rounds):
            for side in args.sides:
                out = root / f"{side}-{round_number}"
                out.mkdir()
                print(f"round {round_number + 1}/{args.rounds}: {side} ...", flush=True)
                cmd = [sys.executable, __file__, "--steps", str(args.steps)]
                cmd += ["--worker", side, str(model_dir), str(data), str(out)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stdout[-2000:], done.stderr[-4000:], sep="\n")
                    return 1
                results[side].append(json.loads((out / "figures.json").read_text()))

    def median_tps(side: str) -> float:
        return statistics.median(statistics.median(r["tokens_per_s"]) for r in results[side])

    print(
        f"\nLoRA r=16 all-linear, ~21M-parameter Llama, seq {SEQ_LEN}, micro-batch {MICRO_BATCH}, "
        f"{args.steps} steps, {args.rounds} interleaved runs per side, {os.cpu_count()} CPU cores\n"
    )
    print("| side | non-padding tokens/s (median) | vs baseline | peak RSS MB | final loss |")
    print("|---|---:|---:|---:|---:|")
    base = median_tps("baseline") if "baseline" in results else None
    for side in args.sides:
        tps = median_tps(side)
        ratio = f"{tps / base:.2f}x" if base else "-"
        rss = statistics.median(r["peak_rss_mb"] for r in results[side])
        loss = statistics.median(r["final_loss"] for r in results[side])
        print(f"| {side} | {tps:,.0f} | {ratio} | {rss:,.0f} | {loss:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
