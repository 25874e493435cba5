"""Command line: parse and dispatch only. User mistakes print one line each and exit with 2."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from peftrun.errors import UserError, did_you_mean
from peftrun.recipe.docs import keys_text

if TYPE_CHECKING:
    from peftrun.recipe.schema import Recipe

SUBCOMMANDS = (
    "train",
    "validate",
    "data",
    "plan",
    "slurm",
    "demo",
    "keys",
    "eval",
    "predict",
    "merge",
    "export",
    "generate",
    "chat",
)
# `peftrun slurm` flags: shorthands for slurm.* recipe keys (same validation, same messages).
SLURM_FLAGS = {
    "--nodes": ("nodes", int),
    "--gpus-per-node": ("gpus_per_node", int),
    "--cpus-per-task": ("cpus_per_task", int),
    "--partition": ("partition", str),
    "--account": ("account", str),
    "--time": ("time", str),
    "--job-name": ("job_name", str),
    "--accelerate-config": ("accelerate_config", str),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftrun",
        description="Fine-tune Hugging Face models from a YAML recipe (LoRA/QLoRA/DoRA/other peft adapters, "
        "full or frozen fine-tuning), on one CPU or many GPUs through accelerate.",
        epilog="Multi-process: accelerate launch [--config_file accelerate_configs/X.yaml] -m peftrun RECIPE\n"
        "Slurm: peftrun slurm RECIPE --nodes N --gpus-per-node G [--dry-run]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = argparse.RawDescriptionHelpFormatter
    for name, summary in (
        ("train", "train what the recipe says and save a verified artefact to output_dir/final"),
        (
            "validate",
            "check the recipe and its files against the model's architecture; print the resolved recipe",
        ),
    ):
        cmd = sub.add_parser(
            name, help=summary, description=summary, epilog=keys_text(), formatter_class=formatter
        )
        cmd.add_argument("recipe", help="path to a recipe YAML")
        cmd.add_argument(
            "overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. train.lr=1e-4"
        )
        cmd.add_argument(
            "--fresh",
            action="store_true",
            help="train.overwrite=true: move a previous run in output_dir aside",
        )
    _add_plan_command(sub)
    summary = (
        "write an sbatch script for a multi-node, preemption-safe run into output_dir/slurm and submit it"
    )
    slurm = sub.add_parser(
        "slurm", help=summary, description=summary, epilog=keys_text("slurm."), formatter_class=formatter
    )
    slurm.add_argument("recipe", help="path to a recipe YAML")
    slurm.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. slurm.nodes=2"
    )
    for flag, (key, kind) in SLURM_FLAGS.items():
        slurm.add_argument(flag, dest=key, type=kind, help=f"slurm.{key}")
    slurm.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    demo = sub.add_parser(
        "demo", help="train the built-in tiny demo (no downloads) and show before/after generations"
    )
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="override demo recipe keys")
    evaluate = sub.add_parser(
        "eval", help="metrics of a finished run's model on a data file (confusion matrix PNG for classifiers)"
    )
    evaluate.add_argument("run_dir", help="the run's output_dir")
    evaluate.add_argument("--data", required=True, help="data file in the run's format (labels needed)")
    evaluate.add_argument("--out", help="directory for metrics.json (default: RUN_DIR/eval/<file name>)")
    predict = sub.add_parser("predict", help="predictions of a finished run's model, one JSON line per row")
    predict.add_argument("run_dir", help="the run's output_dir")
    predict.add_argument("--data", required=True, help="data file in the run's format (labels not needed)")
    predict.add_argument("--out", required=True, help="where to write the predictions (.jsonl)")
    predict.add_argument("--overwrite", action="store_true", help="replace --out (earlier predictions)")
    _add_data_command(sub)
    keys = sub.add_parser("keys", help="list every recipe key with its default and description")
    keys.add_argument("section", nargs="?", help="only keys starting with this (e.g. train)")
    keys.add_argument("--kind", help="with section 'method': list the options of this adapter (e.g. lora)")
    keys.add_argument("--markdown", action="store_true", help="print the whole reference as Markdown")
    _add_merge_commands(sub)
    from peftrun.cli.use import add_use_commands

    add_use_commands(sub)
    return parser


def _add_plan_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    summary = (
        "memory per GPU under DDP/ZeRO-1/2/3/offload, whether it fits, and the cheapest change that does"
    )
    plan = sub.add_parser("plan", help=summary, description=summary + " (docs/plan.md)")
    plan.add_argument("recipe", help="path to a recipe YAML")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    plan.add_argument("--gpu-memory", type=float, required=True, metavar="GB", help="memory of one GPU (GiB)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    plan.add_argument(
        "--supervised-fraction",
        type=float,
        default=1.0,
        help="share of tokens with a loss (the LM head runs on those only); default 1: every token",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_data_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    summary = (
        "show the training samples as the model sees them: trained tokens marked, lengths, a length "
        "histogram, and warnings (end-of-turn not trained, turns the template drops, truncation)"
    )
    data = sub.add_parser("data", help=summary, description=summary)
    data.add_argument("recipe", help="path to a recipe YAML")
    data.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys")
    data.add_argument("--rows", type=int, default=3, help="rows to show token by token (default 3)")
    data.add_argument("--png", type=Path, help="length histogram (default: output_dir/data_lengths.png)")
    data.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="mark with colour")


def _data(recipe: Recipe, args: argparse.Namespace) -> int:
    from peftrun.data.doctor import run_doctor
    from peftrun.model.load import load_tokenizer

    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    png = args.png or Path(recipe.output_dir) / "data_lengths.png"
    for line in run_doctor(recipe, load_tokenizer(recipe.model), args.rows, png, color):
        print(line)
    return 0


def _add_merge_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from peftrun.merge.combine import COMBINATIONS
    from peftrun.merge.export import FORMATS, add_merge_options

    merge = sub.add_parser(
        "merge",
        help="fold an adapter into its base: a verified transformers checkpoint, written shard by shard",
        description="peftrun merge RUN_DIR | ADAPTER_DIR --base BASE --out OUT | --adapters A B --weights ... | "
        "MERGE.yaml (the same settings in a file, see docs/merge.md)",
    )
    merge.add_argument(
        "source", nargs="?", help="run directory (knows its base), adapter directory, or a merge .yaml file"
    )
    merge.add_argument("--out", help="output directory (default for a run directory: RUN/merged)")
    add_merge_options(merge)
    merge.add_argument(
        "--adapters", nargs="+", metavar="DIR", help="combine several adapters (run or adapter dirs)"
    )
    merge.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default: equal)")
    merge.add_argument("--combination", help=f"how to combine: {', '.join(COMBINATIONS)} (default: linear)")
    merge.add_argument("--density", type=float, help="fraction kept by ties/dare/magnitude_prune")
    merge.add_argument("--svd-rank", type=int, help="rank of svd combinations (default: largest input rank)")
    merge.add_argument("--seed", type=int, default=0, help="seed of DARE's random pruning")
    export = sub.add_parser("export", help="export a run: the clean adapter, or the merged model")
    export.add_argument("run", help="run directory (or adapter directory with --base)")
    export.add_argument("--format", choices=FORMATS, default="adapter", help=" | ".join(FORMATS))
    export.add_argument("--out", required=True, help="output directory")
    add_merge_options(export)
    from peftrun.cli.use import add_publish_options

    add_publish_options(export)


def without_launcher_rank(args: list[str]) -> list[str]:
    """The arguments without the `--local_rank N` that the deepspeed launcher (and torch's old
    torch.distributed.launch) adds in front of the script's own; the rank is read from LOCAL_RANK."""
    kept: list[str] = []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            kept.append(arg)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    args_list = without_launcher_rank(list(sys.argv[1:] if argv is None else argv))
    # `python -m peftrun recipe.yaml` (and so `accelerate launch -m peftrun recipe.yaml`) means train.
    if args_list and args_list[0] not in SUBCOMMANDS and not args_list[0].startswith("-"):
        args_list.insert(0, "train")
    parser = build_parser()
    # Overrides may also follow options (`peftrun slurm r.yaml --nodes 2 train.lr=1e-4`), which
    # argparse alone leaves unparsed.
    args, extra = parser.parse_known_args(args_list)
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        return _dispatch(args)
    except (UserError, OSError) as exc:
        from peftrun.run.io_checks import io_error_line

        line = str(exc) if isinstance(exc, UserError) else io_error_line(exc)
        if line is None:
            raise
        rank = os.environ.get("RANK", "0")
        if rank == "0":  # one copy of the message, not one per process
            print(f"peftrun: error: {line}".replace("\n", "\npeftrun: error: "), file=sys.stderr)
        return UserError.exit_code


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":  # before the heavy imports; see signals.catch_scheduler_signals
        from peftrun.dist.signals import catch_scheduler_signals

        catch_scheduler_signals()
        # Each log line reaches a pipe (a Slurm job log) when printed: a step killed after a requeue
        # would otherwise take its unflushed lines ("stopped by SIGUSR1 at step N") with it.
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=True)
    if args.command == "keys":
        from peftrun.recipe.docs import adapter_options_text, reference_markdown

        if args.markdown:
            print(reference_markdown(), end="")
        elif args.kind:
            from peftrun.model.methods import adapter_kinds

            if args.kind not in adapter_kinds():
                raise UserError(
                    f"--kind: '{args.kind}' is not a peft adapter{did_you_mean(args.kind, adapter_kinds())}"
                )
            print(adapter_options_text(args.kind))
        else:
            print(keys_text(args.section))
        return 0
    if args.command in ("merge", "export"):
        _quiet_libraries()
        from peftrun.merge.export import export_command, merge_command

        return merge_command(args) if args.command == "merge" else export_command(args)
    if args.command == "demo":
        _quiet_libraries()
        from peftrun.demo.run import run_demo

        run_demo(args.overrides)
        return 0

    if args.command in ("generate", "chat"):
        _quiet_libraries()
        from peftrun.cli.use import run_use_command

        return run_use_command(args)
    if args.command in ("eval", "predict"):
        _quiet_libraries()
        return _run_inference(args)

    from peftrun.recipe.load import load_recipe, recipe_to_yaml

    _quiet_libraries()

    if args.command == "slurm":
        # Strings as JSON (which is YAML): an unquoted 24:00:00 would be read as a number.
        flags = {key: getattr(args, key) for key, _ in SLURM_FLAGS.values() if getattr(args, key) is not None}
        args.overrides += [f"slurm.{key}={json.dumps(value)}" for key, value in flags.items()]
    if args.command == "plan":
        _check_plan_flags(args)
    if getattr(args, "fresh", False):
        args.overrides.append("train.overwrite=true")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "slurm":
        return _slurm(recipe, args.dry_run)
    if args.command == "plan":
        return _plan(recipe, args)
    if args.command == "data":
        return _data(recipe, args)
    if args.command == "validate":
        from peftrun.data.doctor import validate_lines
        from peftrun.train.preflight import preflight

        checks = preflight(recipe)
        rendered = validate_lines(recipe)
        print(recipe_to_yaml(recipe), end="")
        for line in [*checks.lines(), *rendered]:
            print(f"# {line}")
        print(f"# {args.recipe}: OK")
        return 0
    from peftrun.train.loop import train

    result = train(recipe)
    return 0 if result.stopped_by is None else 128 + 2  # like a shell's Ctrl-C status: the job did not finish


def _check_plan_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--gpus", args.gpus), ("--nodes", args.nodes), ("--gpu-memory", args.gpu_memory)):
        if value <= 0:
            raise UserError(f"{flag}: must be positive, got {value:g}")
    if not 0 < args.supervised_fraction <= 1:
        raise UserError(f"--supervised-fraction: must be in (0, 1], got {args.supervised_fraction:g}")


def _plan(recipe: Recipe, args: argparse.Namespace) -> int:
    from peftrun.plan import plan_recipe
    from peftrun.plan.render import plan_json, plan_text

    plan = plan_recipe(recipe, args.gpus, args.gpu_memory, args.nodes, args.supervised_fraction)
    print(plan_json(plan) if args.json else f"{args.recipe}: {plan_text(plan)}")
    return 0


def _run_inference(args: argparse.Namespace) -> int:
    from peftrun.evaluation.runs import evaluate_run, predict_run

    if args.command == "eval":
        out, result = evaluate_run(args.run_dir, args.data, args.out)
        from peftrun.evaluation.evaluate import eval_summary

        print(f"[peftrun] {args.data}: {result['samples']} samples, {eval_summary(result)}")
        print(f"[peftrun] wrote {out}")
    else:
        count = predict_run(args.run_dir, args.data, args.out, args.overwrite)
        print(f"[peftrun] wrote {count} predictions to {args.out}")
    return 0


def _slurm(recipe: Recipe, dry_run: bool) -> int:
    from peftrun.dist.slurm import plan_job, render_script, submit, write_job

    job = plan_job(recipe, Path.cwd())
    if dry_run:
        print(render_script(job), end="")
        return 0
    from peftrun.train.preflight import preflight

    preflight(recipe)  # a typo in the recipe must not cost a wait in the queue
    script = write_job(job, recipe)
    job_id = submit(script)
    print(f"submitted job {job_id}: {script}")
    print(f"log: {job.job_dir / f'{job.name}-{job_id}.out'}")
    return 0


def _quiet_libraries() -> None:
    """Library output that says nothing to a peftrun user.

    transformers draws a bar for every weight load and shard write; peftrun's own bar is the one to read.

    bitsandbytes, imported by transformers and peft, warns at import on CPUs with AVX512-BF16 that an
    optional package for its bf16 inference kernel is missing, on every command. peftrun keeps 4-bit
    layers off that kernel unless the compute dtype is bf16 (model.keep_4bit_compute_dtype), where
    bitsandbytes falls back to its own; the warning says nothing a user can act on.
    """
    import logging

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
