"""Peak memory and time of `peftrun merge` against a plain peft merge: measured, not estimated.

    .venv/bin/python benchmarks/merge_memory.py [--preset small|1b] [--repeats 2] [--modes ...]

Builds a randomly initialised Llama saved in several safetensors shards, and a LoRA adapter (r=16 on
every linear layer, weights moved off their init), each in its own process:

- `small` (default): ~166M parameters in fp32 (~660 MB), 100 MB shards;
- `1b`: ~943M parameters in bf16 (1.9 GB), 500 MB shards (hidden 2048, 18 layers, vocab 32000).

Each merge then runs in its own fresh process, the modes in turn, `--repeats` rounds (medians reported):

- `peftrun`: `merge()` as the command runs it by default (the full verdict, layer by layer);
- `peftrun-light`: `merge(check="light")`;
- `peft`: `from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload` + `save_pretrained`, in the
  base's dtype, with the same output shard size.

Each worker reports its peak RSS (VmHWM), the RSS after its imports (the libraries' share, the same
for all) and its wall time. The goal for the default merge: peak RSS above the imports at most
1.5 x (largest shard + adapter) + one decoder layer in fp32, and below peft's. To measure another
checkout's peftrun (e.g. main's, for a before/after), run with PYTHONPATH pointing at it.
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
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    dtype: str
    shard: str


PRESETS = {
    "small": Preset(hidden=1024, intermediate=2816, layers=8, heads=16, dtype="fp32", shard="100MB"),
    "1b": Preset(hidden=2048, intermediate=5632, layers=18, heads=32, dtype="bf16", shard="500MB"),
}
MODES = {
    "before": "peftrun merge (default), before",
    "peftrun": "peftrun merge (default)",
    "peftrun-light": "peftrun merge --check light",
    "peft": "peft merge_and_unload",
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=list(MODES)[1:], default=list(MODES)[1:])
    parser.add_argument(
        "--before", metavar="CHECKOUT", help="also run another checkout's default merge (e.g. /work/main)"
    )
    parser.add_argument("--build", nargs=2, metavar=("PRESET", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--worker", nargs=5, metavar=("MODE", "BASE", "ADAPTER", "OUT", "SHARD"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    if args.build:
        build(Path(args.build[1]), PRESETS[args.build[0]])
        return 0
    preset = PRESETS[args.preset]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        # Built in its own process: the parent stays small while the merges are measured.
        subprocess.run([sys.executable, __file__, "--build", args.preset, tmp], check=True, env=env)
        base, adapter = Path(tmp) / "base", Path(tmp) / "adapter"
        shards = sorted(base.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards) / MB
        adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / MB
        total = sum(p.stat().st_size for p in shards) / MB
        layer_mb = fp32_layer_bytes(base) / MB
        print(
            f"base: {total:.0f} MB ({preset.dtype}) in {len(shards)} shards (largest {largest:.0f} MB); "
            f"adapter {adapter_mb:.1f} MB; one layer in fp32 {layer_mb:.0f} MB"
        )
        modes = (["before"] if args.before else []) + args.modes
        rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:
                out = Path(tmp) / f"out-{mode}"
                worker_mode = "peftrun" if mode == "before" else mode
                cmd = [sys.executable, __file__, "--worker", worker_mode, str(base), str(adapter), str(out)]
                cmd.append(preset.shard)
                # `before`: the same call into another checkout's peftrun
                worker_env = {**env, "PYTHONPATH": args.before} if mode == "before" else env
                done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env)
                if done.returncode != 0:
                    print(done.stdout, done.stderr, file=sys.stderr)
                    return 1
                rows[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
                subprocess.run(["rm", "-rf", str(out)], check=True)
        report(rows, args.repeats)
        bound = 1.5 * (largest + adapter_mb) + layer_mb
        print(
            f"goal for the default merge: peak above imports <= 1.5 x (largest shard + adapter) + one layer "
            f"in fp32 = {bound:.0f} MB, and a peak below peft's"
        )
    return 0


def report(rows: dict[str, list[dict[str, float]]], repeats: int) -> None:
    print(f"{'':30s} {'peak RSS':>10s} {'imports':>9s} {'merge':>9s} {'time':>8s}   (medians of {repeats})")
    for mode, results in rows.items():
        peak = statistics.median(r["peak_mb"] for r in results)
        base_rss = statistics.median(r["import_mb"] for r in results)
        seconds = statistics.median(r["seconds"] for r in results)
        print(f"{MODES[mode]:30s} {peak:8.0f}MB {base_rss:7.0f}MB {peak - base_rss:7.0f}MB {seconds:7.1f}s")


def build(root: Path, preset: Preset) -> None:
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if preset.dtype == "bf16" else torch.float32
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # built in its dtype: a bf16 1B model never exists in fp32 here
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(root / "base", max_shard_size=preset.shard)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for param in lora.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    lora.save_pretrained(str(root / "adapter"))


def fp32_layer_bytes(base: Path) -> int:
    """The first decoder layer's weights, as fp32 bytes (from the shards' headers)."""
    from safetensors import safe_open

    total = 0
    for shard in base.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                if name.startswith("model.layers.0."):
                    numel = 1
                    for dim in handle.get_slice(name).get_shape():
                        numel *= dim
                    total += 4 * numel
    return total


def worker(mode: str, base: str, adapter: str, out: str, shard: str) -> None:
    import torch  # noqa: F401  (the libraries' memory is measured before the merge starts)
    import transformers  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftrun.merge import MergeOptions, merge
    from peftrun.merge.export import inputs_for

    import_mb = _status_mb("VmRSS")
    start = time.perf_counter()
    if mode.startswith("peftrun"):
        check = "light" if mode == "peftrun-light" else "full"
        merge(
            inputs_for(adapter, base),
            Path(out),
            MergeOptions(max_shard_size=shard, check=check),
            say=lambda line: print(line, file=sys.stderr),
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
