"""`peftrun plan`'s formulas against measurement on CPU: model states per rank, activations of a step.

    .venv/bin/python benchmarks/plan_check.py [--states] [--activations] [--seq 256] [--micro 2]

Two Llama shapes (GQA 256-wide x 4 layers with untied embeddings; MHA 512-wide x 2 layers, tied),
fp32, methods full, LoRA (r 8, all-linear) and QLoRA (NF4, fp32 compute), loaded and made trainable
by peftrun's own code (load_base, make_trainable, build_optimizer, make_accelerator).

- states: `accelerate launch` with 2 CPU ranks (gloo) under DDP, ZeRO-1, ZeRO-2 and ZeRO-3; after one
  optimizer step and a second backward each rank counts the bytes of the tensors it holds
  (benchmarks/zero_memory.count_tensors: weights, gradients incl. DeepSpeed's buckets, optimizer
  moments + fp32 masters) against the plan's weights + gradients + optimizer + master + buffers.
  DDP's reducer buckets live in C++ where that count cannot see them; the plan's DDP gradients
  (2x: the gradients and the reducer's copy) are compared with 2x the counted gradients.
- activations: one process, one micro-batch of `--micro` rows x `--seq` tokens, every token
  supervised: the bytes autograd saves for backward (saved_tensors_hooks, each storage once,
  parameters excluded) against the plan's `saved`, and the step's peak of everything that is not a
  weight or gradient (torch.distributed._tools.mem_tracker.MemTracker) against the plan's `peak`.
  LoRA runs peft's layers (cpu.fused_lora off), the path a GPU takes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SHAPES = {
    "gqa256x4": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 688,
        "vocab_size": 8000,
        "tie_word_embeddings": False,
    },
    "mha512x2": {
        "hidden_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 1376,
        "vocab_size": 16000,
        "tie_word_embeddings": True,
    },
}
METHODS = {
    "full": ({"kind": "full"}, None),
    "lora": ({"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}, None),
    "qlora": (
        {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        {"bits": 4, "compute_dtype": "fp32"},
    ),
}
BACKENDS = {"DDP": "ddp.yaml", "ZeRO-1": "zero1.yaml", "ZeRO-2": "zero2.yaml", "ZeRO-3": "zero3.yaml"}
MB = 1024 * 1024


def recipe_for(model_dir: str, method: str, micro: int, seq: int, world: int) -> Any:
    from peftrun.recipe.schema import Recipe

    spec, quant = METHODS[method]
    return Recipe.model_validate(
        {
            "output_dir": tempfile.mkdtemp(),
            "model": {"name_or_path": model_dir, **({"quantization": quant} if quant else {})},
            "data": {"path": "check.jsonl", "max_seq_len": seq},
            "method": spec,
            "train": {
                "micro_batch_size": micro,
                "global_batch_size": micro * world,
                "max_grad_norm": None,
            },
            "cpu": {"fused_lora": False},
            "logging": {"report_to": []},
        }
    )


def build_models(root: Path) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = {}
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=2048)).save_pretrained(root / name)
        out[name] = root / name
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--states", action="store_true")
    parser.add_argument("--activations", action="store_true")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="shape/method/backend names to keep")
    parser.add_argument("--save", help="keep each states measurement here (a rerun reuses them)")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        states_worker(args.worker[0], args.worker[1], Path(args.worker[2]), args.micro, args.seq)
        return 0
    both = not args.states and not args.activations
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp))
        if args.states or both:
            print_states(run_states(models, args))
        if args.activations or both:
            print_activations(
                measure_activations(str(m), s, meth, args)
                for s, m in models.items()
                for meth in METHODS
                if keep(args, s, meth)
            )
    return 0


def keep(args: argparse.Namespace, *names: str) -> bool:
    return not args.only or all(any(o == n for o in args.only) or not _is_kind(n, args.only) for n in names)


def _is_kind(name: str, only: list[str]) -> bool:
    """A name is filtered only if --only names something of its kind (a shape, a method, a backend)."""
    for kind in (SHAPES, METHODS, BACKENDS):
        if name in kind:
            return any(o in kind for o in only)
    return False


# ---- model states: 2 CPU ranks --------------------------------------------------------------------------


def run_states(models: dict[str, Path], args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    for shape, model_dir in models.items():
        for method in METHODS:
            for backend, config in BACKENDS.items():
                if not keep(args, shape, method, backend):
                    continue
                out = Path(args.save or tempfile.mkdtemp()) / f"{shape}-{method}-{backend}.jsonl"
                if not out.exists():
                    failure = launch_states(model_dir, method, config, out, args)
                    if failure:
                        yield {"shape": shape, "method": method, "backend": backend, "failed": failure}
                        continue
                ranks = [json.loads(line) for line in out.read_text().splitlines()]
                rank0 = min(ranks, key=lambda r: r["rank"])
                recipe = recipe_for(str(model_dir), method, args.micro, args.seq, 2)
                yield (
                    {
                        "shape": shape,
                        "method": method,
                        "backend": backend,
                        **rank0,
                        "plan": planned_states(recipe, backend),
                    }
                )


def launch_states(
    model_dir: Path, method: str, config: str, out: Path, args: argparse.Namespace
) -> str | None:
    """Run the states worker on 2 CPU ranks under `config`; None, or the failure's last error line."""
    from zero_memory import launch

    worker = [
        "--micro",
        str(args.micro),
        "--seq",
        str(args.seq),
        "--worker",
        str(model_dir),
        method,
        str(out),
    ]
    print(f"states: {out.stem} ...", file=sys.stderr, flush=True)
    done = launch(config, 2, worker, script=__file__)
    if done.returncode != 0:
        out.unlink(missing_ok=True)
        lines = [ln for ln in done.stderr.splitlines() if "Error" in ln or "error" in ln]
        return (lines or ["?"])[-1][:160]
    return None


def planned_states(recipe: Any, backend: str) -> dict[str, int]:
    from peftrun.model.load import load_model_config
    from peftrun.plan import precision_for
    from peftrun.plan.census import count_model
    from peftrun.plan.memory import LAUNCHES, model_states

    launch = next(launch for launch in LAUNCHES if launch.name == backend)
    census = count_model(recipe, load_model_config(recipe.model))
    precision = precision_for(recipe, deepspeed=launch.zero_stage is not None, device="cpu")
    s = model_states(census, launch, 2, recipe.train.optimizer, precision)
    # Buffers (reduce bucket, ZeRO-3's gathered layer) live only inside a step: not in a count at rest.
    return {
        "weights": s.weights,
        "gradients": s.gradients,
        "optimizer": s.optimizer + s.master,
        "total": s.total - s.buffers,
    }


def states_worker(model_dir: str, method: str, out: Path, micro: int, seq: int) -> None:
    import resource

    import torch
    from zero_memory import count_tensors

    from peftrun.dist.accelerator import is_deepspeed, make_accelerator
    from peftrun.model.load import load_base, make_trainable
    from peftrun.train.optim import build_optimizer

    recipe = recipe_for(model_dir, method, micro, seq, 2)
    accelerator = make_accelerator(recipe, log_with=[])
    torch.manual_seed(0)
    model = make_trainable(load_base(recipe), recipe)
    optimizer = build_optimizer(model, recipe.train)
    vocab = model.config.vocab_size
    data = torch.utils.data.DataLoader(
        [{"input_ids": torch.randint(0, vocab, (32,))} for _ in range(8)], batch_size=1
    )
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    deepspeed = is_deepspeed(accelerator)
    batches = iter(data)

    def forward_backward() -> None:
        batch = next(batches)
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        if deepspeed:
            model.backward(loss)
        else:
            accelerator.backward(loss)

    forward_backward()
    if deepspeed:
        model.step()
    else:
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    forward_backward()
    gc.collect()
    counts = count_tensors(accelerator.unwrap_model(model), optimizer, deepspeed)
    counts.update(
        rank=accelerator.process_index,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    for rank in range(accelerator.num_processes):
        if rank == accelerator.process_index:
            with out.open("a") as handle:
                handle.write(json.dumps(counts) + "\n")
        accelerator.wait_for_everyone()


def print_states(rows: Iterable[dict[str, Any]]) -> None:
    print("\nModel states per rank (rank 0 of 2 CPU ranks, fp32, AdamW), MB: measured / planned (error)\n")
    print("| shape | method | backend | weights | gradients | optimizer+master | total | error |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        if "failed" in row:
            print(
                f"| {row['shape']} | {row['method']} | {row['backend']} | failed: {row['failed']} ||||",
                flush=True,
            )
            continue
        plan = row["plan"]
        grads = row["grad_bytes"] * (2 if row["backend"] == "DDP" else 1)  # + DDP's invisible buckets
        measured = {"weights": row["param_bytes"], "gradients": grads, "optimizer": row["optim_bytes"]}
        measured["total"] = sum(measured.values())
        cells = [
            f"{measured[k] / MB:.2f} / {plan[k] / MB:.2f}"
            for k in ("weights", "gradients", "optimizer", "total")
        ]
        error = (plan["total"] - measured["total"]) / measured["total"]
        print(
            f"| {row['shape']} | {row['method']} | {row['backend']} | {' | '.join(cells)} | {100 * error:+.1f}% |",
            flush=True,
        )


# ---- activations: one process --------------------------------------------------------------------------


def measure_activations(model_dir: str, shape: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from peftrun.model.load import load_base, load_model_config, make_trainable
    from peftrun.model.tasks import TASKS
    from peftrun.plan import precision_for
    from peftrun.plan.census import count_model
    from peftrun.plan.memory import activations

    print(f"activations: {shape} {method} ...", file=sys.stderr, flush=True)
    results: dict[str, Any] = {"shape": shape, "method": method}
    for checkpointing in (False, True):
        recipe = recipe_for(model_dir, method, args.micro, args.seq, 1)
        recipe = recipe.model_copy(
            update={"model": recipe.model.model_copy(update={"gradient_checkpointing": checkpointing})}
        )
        torch.manual_seed(0)
        model = make_trainable(load_base(recipe), recipe)
        model.train()
        ids = torch.randint(0, model.config.vocab_size, (args.micro, args.seq))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        task = TASKS["causal_lm"]
        task.loss_per_sample(model, batch).sum().backward()  # warm-up: lazy buffers, first-call caches
        model.zero_grad(set_to_none=True)
        saved = saved_bytes(partial(task.loss_per_sample, model, batch), model)
        model.zero_grad(set_to_none=True)
        with PeakTracker() as tracker:
            task.loss_per_sample(model, batch).sum().backward()
        grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
        peak = tracker.peak_without(grads)
        census = count_model(recipe, load_model_config(recipe.model))
        tokens = args.micro * args.seq
        planned = activations(
            census, tokens, tokens, checkpointing, precision_for(recipe, False, device="cpu")
        )
        key = "ckpt" if checkpointing else "plain"
        results[key] = {"saved": saved, "peak": peak, "plan_saved": planned.saved, "plan_peak": planned.peak}
        del model
        gc.collect()
    return results


class PeakTracker:
    """The peak of the bytes that a step's ops allocate and hold (a dispatch mode sees every op output
    and a weak reference to its storage sees it freed), with what was live at that peak."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.at_peak: dict[int, int] = {}

    def __enter__(self) -> PeakTracker:
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self._refs: list[Any] = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        storage = t.untyped_storage()
                        key = storage.data_ptr()
                        if key and key not in tracker.live:
                            tracker.live[key] = storage.nbytes()
                            tracker.current += storage.nbytes()
                            tracker._refs.append(weakref.ref(storage, lambda _, k=key: tracker._free(k)))
                if tracker.current > tracker.peak:
                    tracker.peak = tracker.current
                    tracker.at_peak = dict(tracker.live)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)

    def peak_without(self, keys: set[int]) -> int:
        return sum(size for key, size in self.at_peak.items() if key not in keys)


def saved_bytes(forward: Any, model: Any) -> int:
    """Bytes of the distinct storages autograd saves during `forward` (and keeps until backward)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and tensor.device.type != "meta":
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward().sum()
    total = sum(storages.values())
    loss.backward()
    return total


def print_activations(rows: Iterable[dict[str, Any]]) -> None:
    print("\nActivations of one micro-batch, MB: measured / planned (error)\n")
    print("| shape | method | checkpointing | saved for backward | error | step peak (not states) | error |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        for key, label in (("plain", "off"), ("ckpt", "on")):
            r = row[key]
            e1 = (r["plan_saved"] - r["saved"]) / r["saved"]
            e2 = (r["plan_peak"] - r["peak"]) / r["peak"]
            print(
                f"| {row['shape']} | {row['method']} | {label} | {r['saved'] / MB:.2f} / {r['plan_saved'] / MB:.2f} | "
                f"{100 * e1:+.1f}% | {r['peak'] / MB:.2f} / {r['plan_peak'] / MB:.2f} | {100 * e2:+.1f}% |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
