"""Wall time and peak memory of causal-LM data preparation (tokenize, cache, pack) as the data grows.

    .venv/bin/python benchmarks/data_prep.py [--rows 20000 100000] [--num-proc N]

Builds chat rows of about 96 tokens (a user turn and an assistant answer of random words, the spread of
benchmarks/throughput.py's `cpu` preset scaled down) and a byte-level BPE tokenizer trained on them
(peftrun.demo.tiny, vocab 8000, its chat template), then prepares each size in a fresh process with a
fresh cache, packing on (rows of up to 512 tokens), as `peftrun train` does before the model loads.

Each worker reports its wall time for preparation and packing, rows/s, the RSS after its imports (the
libraries' share, the same for every size) and its peak RSS (ru_maxrss of the preparing process; the
tokenizing worker processes, num_proc > 1, are reported apart as the largest of them). To measure
another checkout's peftrun (e.g. main's, for a before/after), run with PYTHONPATH pointing at it: the
worker only calls prepare_data(cfg, tokenizer, seed, cache_dir) and pack_dataset(samples, capacity).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 512
MB = 1024 * 1024


def make_rows(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` chat rows of ~96 tokens: ~25 prompt words and ~55 answer words, lognormal spread."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(3000)
    ]
    with path.open("w") as out:
        for _ in range(rows):
            total = int(min(300, max(8, rng.lognormvariate(4.3, 0.5))))
            prompt = max(3, int(total * rng.uniform(0.2, 0.5)))
            messages = [
                {"role": "user", "content": " ".join(rng.choice(words) for _ in range(prompt))},
                {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(total - prompt))},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")


def make_tokenizer(out: Path, data: Path) -> None:
    sys.path.insert(0, str(REPO))
    from peftrun.demo.tiny import build_tokenizer

    with data.open() as rows:
        lines = rows.read().splitlines()[:2000]
    corpus = [" ".join(m["content"] for m in json.loads(line)["messages"]) for line in lines]
    build_tokenizer(out, corpus, vocab_size=8000)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class AnonymousPeak:
    """The largest RssAnon of this process, sampled every 50 ms: the memory it owns, without the pages
    of memory-mapped Arrow files that reading them makes resident (page cache, shared and reclaimable,
    which ru_maxrss counts too)."""

    def __init__(self) -> None:
        import threading

        self.peak_kb = 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            time.sleep(0.05)


def worker(tokenizer_dir: Path, data: Path, cache: Path, num_proc: int | None) -> None:
    """Prepare and pack in this process; print one JSON line."""
    from transformers import AutoTokenizer

    from peftrun.data import prepare_data
    from peftrun.data.packing import pack_dataset
    from peftrun.recipe.schema import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = {"path": str(data), "format": "chat", "packing": True, "max_seq_len": SEQ_LEN}
    if num_proc is not None:
        settings["num_proc"] = num_proc
    cfg = DataConfig(**settings)
    imports = _rss_bytes()
    anonymous = AnonymousPeak()
    start = time.perf_counter()
    prepared = prepare_data(cfg, tokenizer, 0, cache)
    prepare_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    packed = pack_dataset(prepared.train, SEQ_LEN)
    wall = time.perf_counter() - start
    report = prepared.report
    print(
        json.dumps(
            {
                "rows": report.rows,
                "tokens": report.total_tokens,
                "packed_rows": len(packed),
                "wall_s": wall,
                "imports_mb": imports / MB,
                "prepare_peak_mb": prepare_peak,
                "anonymous_peak_mb": anonymous.peak_kb / 1024,
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
                "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / MB,
            }
        )
    )


def run_size(root: Path, tokenizer_dir: Path, rows: int, num_proc: int | None) -> dict[str, float]:
    data = root / f"chat-{rows}.jsonl"
    if not data.is_file():
        make_rows(data, rows)
    cache = Path(tempfile.mkdtemp(prefix=f"cache-{rows}-", dir=root))
    command = [sys.executable, __file__, "--worker", str(tokenizer_dir), str(data), str(cache)]
    if num_proc is not None:
        command += ["--num-proc", str(num_proc)]
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"worker for {rows:,} rows failed:\n{child.stderr[-3000:]}")
    return dict(json.loads(child.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc (default: peftrun's)")
    parser.add_argument("--worker", nargs=3, metavar=("TOKENIZER", "DATA", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*(Path(p) for p in args.worker), args.num_proc)
        return 0
    with tempfile.TemporaryDirectory(prefix="data-prep-") as tmp:
        root = Path(tmp)
        make_rows(root / "corpus.jsonl", 2000)
        make_tokenizer(root / "tok", root / "corpus.jsonl")
        print(
            "| rows | tokens/row | wall s | rows/s | RSS after imports MB | peak RSS preparing MB | "
            "peak RSS with packing MB | peak above imports MB | peak anonymous RSS MB | workers' peak MB |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for rows in args.rows:
            r = run_size(root, root / "tok", rows, args.num_proc)
            print(
                f"| {rows:,} | {r['tokens'] / r['rows']:.0f} | {r['wall_s']:.1f} | {rows / r['wall_s']:,.0f} | "
                f"{r['imports_mb']:.0f} | {r['prepare_peak_mb']:.0f} | {r['peak_mb']:.0f} | "
                f"{r['peak_mb'] - r['imports_mb']:.0f} | {r['anonymous_peak_mb']:.0f} | "
                f"{r['workers_peak_mb']:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
