"""`peftrun chat TARGET`: talk to a trained model in the terminal, tokens streamed as they come.

The conversation is rendered with the chat template the run trained with (see generate.py), so what the
model sees is what it learned from. `--prompt` answers once and exits; interactively `/reset` clears the
history and `/exit` (or Ctrl-D) leaves. Runs trained on alpaca/plain prompts chat one turn at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

import torch

from peftrun.use.generate import (
    GenerationSettings,
    Loaded,
    encode_prompt,
    prompt_text,
    sampling_kwargs,
    stop_token_ids,
)

HELP = "/reset clears the conversation, /exit leaves (or Ctrl-D)"


class Conversation:
    """The messages so far and how to render them for the next answer."""

    def __init__(self, loaded: Loaded, system: str | None) -> None:
        self.loaded = loaded
        self.system = system
        self.multi_turn = getattr(loaded.tokenizer, "chat_template", None) is not None
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, user_text: str) -> list[int]:
        self.messages.append({"role": "user", "content": user_text})
        if self.multi_turn:
            row: dict[str, Any] = {"messages": self.messages}
        else:  # no chat template: the run's instruction prompt, one turn
            row = {"instruction": user_text}
        return encode_prompt(
            self.loaded.tokenizer, prompt_text(row, self.loaded.tokenizer, self.loaded.recipe, "chat")
        )

    def answered(self, text: str) -> None:
        if self.multi_turn:
            self.messages.append({"role": "assistant", "content": text})
        else:
            self.reset()


@torch.no_grad()
def stream_answer(loaded: Loaded, ids: list[int], settings: GenerationSettings, out: TextIO) -> str:
    """Generate after `ids`, writing text to `out` as it is decoded; returns the whole answer."""
    from transformers import TextStreamer, set_seed

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    set_seed(settings.seed)
    stops = stop_token_ids(loaded.tokenizer, loaded.model)
    tokenizer = loaded.tokenizer
    device = next(loaded.model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    generated = loaded.model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        streamer=Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        **sampling_kwargs(settings),
    )
    new = [t for t in generated[0, len(ids) :].tolist() if t not in stops]
    return str(tokenizer.decode(new, skip_special_tokens=True)).strip()


def run_chat(
    loaded: Loaded,
    settings: GenerationSettings,
    system: str | None = None,
    prompt: str | None = None,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    out = out if out is not None else sys.stdout  # looked up now: tests and callers may replace it
    conversation = Conversation(loaded, system)
    if prompt is not None:
        stream_answer(loaded, conversation.prompt_ids(prompt), settings, out)
        return 0
    out.write(f"[peftrun] chatting with {loaded.directory} ({HELP})\n")
    out.flush()
    while True:
        try:
            line = read(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            conversation.reset()
            out.write("[peftrun] conversation cleared\n")
            continue
        if not line:
            continue
        if line.startswith("/"):
            out.write(f"[peftrun] unknown command {line}; {HELP}\n")
            continue
        conversation.answered(stream_answer(loaded, conversation.prompt_ids(line), settings, out))
