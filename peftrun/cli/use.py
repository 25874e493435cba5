"""Command-line options of the commands that use a trained model: `peftrun generate` and `peftrun chat`.

Kept apart from cli.py (and free of heavy imports) so that building the parser stays instant.
"""

from __future__ import annotations

import argparse

TARGET_HELP = "run directory, checkpoint (RUN/checkpoints/step-N), merged directory, or adapter directory"


def _add_sampling_options(cmd: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    cmd.add_argument("target", help=TARGET_HELP)
    cmd.add_argument("--base", help="base model of an adapter directory (default: the one it records)")
    cmd.add_argument(
        "--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})"
    )
    cmd.add_argument("--top-p", type=float, default=1.0 if temperature == 0 else 0.9, help="nucleus sampling")
    cmd.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="longest answer in tokens")
    cmd.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same output)")


def add_use_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    generate = sub.add_parser(
        "generate",
        help="generate for every row of a JSONL prompts file ('prompt', 'messages' or 'instruction')",
        description="peftrun generate TARGET --prompts prompts.jsonl --out generations.jsonl: batched, "
        "left-padded generation; greedy by default, deterministic for a given --seed",
    )
    _add_sampling_options(generate, temperature=0.0, max_new_tokens=128)
    generate.add_argument("--prompts", required=True, help="JSONL file, one prompt per line")
    generate.add_argument("--out", required=True, help="where to write the generations (.jsonl)")
    generate.add_argument("--batch-size", type=int, default=8, help="prompts per forward")
    chat = sub.add_parser(
        "chat",
        help="chat with a trained model in the terminal (streamed, with the run's chat template)",
        description="peftrun chat TARGET [--prompt TEXT]: interactive, multi-turn; /reset, /exit",
    )
    _add_sampling_options(chat, temperature=0.7, max_new_tokens=256)
    chat.add_argument("--system", help="system message opening the conversation")
    chat.add_argument("--prompt", help="answer this one message and exit (scriptable)")


def run_use_command(args: argparse.Namespace) -> int:
    from peftrun.errors import UserError
    from peftrun.use.generate import GenerationSettings, generate_file, load_for_generation

    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --max-new-tokens >= 1")
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=getattr(args, "batch_size", 1),
    )
    if args.command == "generate":
        count = generate_file(args.target, args.prompts, args.out, settings, args.base)
        print(f"[peftrun] wrote {count} generations to {args.out}")
        return 0
    from peftrun.use.chat import run_chat

    return run_chat(load_for_generation(args.target, args.base), settings, args.system, args.prompt)


def add_publish_options(export: argparse.ArgumentParser) -> None:
    """`peftrun export` options for GGUF files and the Hub."""
    export.add_argument(
        "--quant",
        default="f16",
        choices=("f16", "q8_0", "f32"),
        help="--format gguf: weight type of matrices",
    )
    export.add_argument(
        "--model-card", action="store_true", help="write a Hub README.md (model card) into --out"
    )
    export.add_argument(
        "--push-to-hub", metavar="REPO", help="upload --out to this Hub model repo (with a card)"
    )
