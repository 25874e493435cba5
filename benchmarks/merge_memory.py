"""Peak memory and time of `peftrun merge` against a plain peft merge: measured, not estimated.

    .venv/bin/python benchmarks/merge_memory.py [--hidden 1024] [--layers 8] [--shard 100MB] [--repeats 2]

Builds a randomly initialised Llama (default ~166M parameters, ~660 MB in fp32) saved in several
safetensors shards, and a LoRA adapter (r=16 on every linear layer, weights moved off their init).
Each merge then runs in its own fresh process, alternating A B A B (medians reported):

- A, peftrun: `merge()` shard by shard, light per-layer verdict (the full verdict loads the model by
  design, so it is not what the memory bound is about);
- B, peft: `from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload` + `save_pretrained`,
  with the same output shard size.

Each worker reports its peak RSS (VmHWM), the RSS after its imports (the libraries' share, the same
for both) and its wall time. The goal for A: peak RSS above the imports < 1.5 x (largest shard + adapter).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard", default="100MB", help="shard size of the base and of both outputs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--worker", nargs=4, metavar=("MODE", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, shard=args.shard)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = build(Path(tmp), args)
        shards = sorted(base.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards) / MB
        adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / MB
        total = sum(p.stat().st_size for p in shards) / MB
        print(
            f"base: {total:.0f} MB in {len(shards)} shards (largest {largest:.0f} MB); adapter {adapter_mb:.1f} MB"
        )
        rows: dict[str, list[dict[str, float]]] = {"peftrun merge": [], "peft merge_and_unload": []}
        for _ in range(args.repeats):
            for label, mode in (("peftrun merge", "peftrun"), ("peft merge_and_unload", "peft")):
                out = Path(tmp) / f"out-{mode}"
                cmd = [
                    sys.executable,
                    __file__,
                    "--shard",
                    args.shard,
                    "--worker",
                    mode,
                    str(base),
                    str(adapter),
                    str(out),
                ]
                env = {
                    **os.environ,
                    "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_VERBOSITY": "error",
                    "PYTHONWARNINGS": "ignore",
                }
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    print(done.stdout, done.stderr, file=sys.stderr)
                    return 1
                rows[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
                subprocess.run(["rm", "-rf", str(out)], check=True)
        bound = 1.5 * (largest + adapter_mb)
        print(
            f"{'':24s} {'peak RSS':>10s} {'imports':>9s} {'merge':>9s} {'time':>8s}   (medians of {args.repeats})"
        )
        for label, results in rows.items():
            peak = statistics.median(r["peak_mb"] for r in results)
            base_rss = statistics.median(r["import_mb"] for r in results)
            seconds = statistics.median(r["seconds"] for r in results)
            print(f"{label:24s} {peak:8.0f}MB {base_rss:7.0f}MB {peak - base_rss:7.0f}MB {seconds:7.1f}s")
        print(
            f"goal for peftrun merge: peak above imports < 1.5 x (largest shard + adapter) = {bound:.0f} MB"
        )
    return 0


def build(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(2.75 * args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    base = root / "base"
    model.save_pretrained(base, max_shard_size=args.shard)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for param in lora.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    lora.save_pretrained(root / "adapter")
    return base, root / "adapter"


def worker(mode: str, base: str, adapter: str, out: str, shard: str) -> None:
    import torch  # noqa: F401  (the libraries' memory is measured before the merge starts)
    import transformers  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftrun.merge import MergeOptions, merge
    from peftrun.merge.export import inputs_for

    import_mb = _status_mb("VmRSS")
    start = time.perf_counter()
    if mode == "peftrun":
        merge(
            inputs_for(adapter, base),
            Path(out),
            MergeOptions(max_shard_size=shard, check="light"),
            say=lambda line: None,
        )
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        model.merge_and_unload().save_pretrained(out, max_shard_size=shard)
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would report the parent's peak.
    peak_mb = _status_mb("VmHWM")
    print(json.dumps({"peak_mb": peak_mb, "import_mb": import_mb, "seconds": seconds}))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
