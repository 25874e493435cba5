"""A process that prepares (or waits for) causal-LM data, for tests that need several processes.

    python -m tests.data.prepare_child TOKENIZER_DIR CACHE_DIR DATA_CONFIG_JSON [--wait]

Prints one JSON line on stdout: the Arrow files its training set maps, its sizes and the peak RSS of
the process (ru_maxrss); a UserError is printed as its one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

from torch.utils.data import IterableDataset

from peftrun.data import DataSharing
from peftrun.data.packing import PackedDataset
from peftrun.errors import UserError
from peftrun.model.tasks import causal_lm_data
from peftrun.recipe.schema import DataConfig


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer")
    parser.add_argument("cache")
    parser.add_argument("data", help="the `data` section as JSON")
    parser.add_argument("--wait", action="store_true", help="wait for the main process's entry")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = DataConfig.model_validate(json.loads(args.data))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    sharing = DataSharing(main=not args.wait, log=log, interval_s=0.0, poll_s=0.05)
    try:
        data = causal_lm_data(cfg, tokenizer, 0, args.cache, sharing=sharing)
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 2
    assert not isinstance(data.train, IterableDataset)  # prepared, not streamed
    samples = data.train.samples if isinstance(data.train, PackedDataset) else data.train
    found = {
        "files": [f["filename"] for f in samples.cache_files],
        "train": len(data.train),
        "tokens": data.report.total_tokens,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
