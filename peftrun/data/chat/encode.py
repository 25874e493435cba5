"""One conversation -> (input_ids, labels): render it once, find the trained spans, tokenize once.

Spans come from the template's own `{% generation %}` blocks when it has them, else from the turn markers
of its family (`turns.py`). The end-of-turn token the model emits is trained; nothing the template does
not render is added (the one exception is GLM's closing `<|user|>` after a last turn, see turns.py).
A template of no known family falls back to comparing renderings of prefixes (`prefix.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from peftrun.data.chat.messages import Conversation, RowProblem
from peftrun.data.chat.turns import Span, TurnMarkers, find_spans, identify_family

if TYPE_CHECKING:
    from peftrun.recipe.schema import DataConfig

__all__ = ["ChatEncoder", "Rendered", "template_family"]

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = [
    {"role": "user", "content": "Say one."},
    {"role": "assistant", "content": "One."},
    {"role": "user", "content": "Say two."},
    {"role": "assistant", "content": "Two."},
]
_THINK_END = "</think>"


@dataclass
class Rendered:
    """A conversation rendered by the template, its trained spans, and what the doctor should know."""

    text: str
    spans: list[Span]
    notes: list[str] = field(default_factory=list)


def render_template(
    template: str, tokenizer: Any, conversation: Conversation, tagged: bool = False
) -> tuple[str, list[Span]]:
    """The template's text for the conversation, and its `{% generation %}` spans when `tagged`."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        # Annotated `-> str` upstream, but returns (renderings, generation indices).
        result: Any = render_jinja_template(
            [conversation.messages],
            tools=list(conversation.tools) if conversation.tools else None,
            chat_template=template,
            return_assistant_tokens_mask=tagged,
            **dict(tokenizer.special_tokens_map),
        )
    except Exception as exc:  # jinja's TemplateError, raise_exception() in the template, a missing key
        raise RowProblem(f"the chat template cannot render this conversation: {exc}") from None
    return str(result[0][0]), [tuple(s) for s in result[1][0]] if tagged else []


def template_family(template: str, tokenizer: Any) -> TurnMarkers | None:
    """The family of `template` by its markers in a rendering of a short conversation; None if unknown."""
    try:
        probe, _ = render_template(template, tokenizer, Conversation([dict(m) for m in _PROBE]))
    except RowProblem:
        return None
    markers = identify_family(probe)
    return markers.resolved(getattr(tokenizer, "eos_token", None)) if markers else None


def _answer_text(message: dict[str, Any]) -> str:
    """What of an assistant message any template renders verbatim: its answer, after inline reasoning."""
    content = message.get("content") or ""
    return content.split(_THINK_END)[-1].strip()


class ChatEncoder:
    """Conversations -> token ids and labels for one tokenizer, template and `data` config."""

    def __init__(self, tokenizer: Any, template: str, cfg: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.train_on_last = cfg.train_on == "last"
        self.train_on_reasoning = cfg.train_on_reasoning
        self.train_on_prompt = cfg.train_on_prompt
        self.tagged = bool(_GENERATION_TAG.search(template))
        self.markers = None if self.tagged else template_family(template, tokenizer)
        self.bos_id: int | None = tokenizer.bos_token_id
        self.bos_text: str | None = tokenizer.bos_token if self.bos_id is not None else None
        # A tokenizer that puts BOS in front of text by itself (Llama 2, Phi-3) gets it in front of a
        # rendering that lacks it, as its own encoding would; one that does not (Qwen, Phi-4) gets none.
        self.adds_bos = self.bos_id is not None and tokenizer("a")["input_ids"][:1] == [self.bos_id]

    @property
    def known(self) -> bool:
        """True when spans come from one rendering (generation tags or a known family's markers)."""
        return self.tagged or self.markers is not None

    @property
    def method(self) -> str:
        if self.tagged:
            return "the template's {% generation %} blocks"
        return (
            f"{self.markers.family} turn markers" if self.markers else "prefix renderings (unknown template)"
        )

    def prepare(self, conversation: Conversation) -> Conversation:
        """Null contents and tool-call arguments as the template wants them.

        Most templates concatenate or print a content without testing it for null (GLM would render
        "None"), so a null content becomes ""; DeepSeek's tests `content is none`. Tool-call arguments
        are objects, or JSON text for templates that concatenate them (DeepSeek).
        """
        keep_null = self.markers is not None and self.markers.null_content
        as_text = self.markers is not None and self.markers.string_arguments
        messages = []
        for message in conversation.messages:
            if message.get("content") is None and not keep_null:
                message = {**message, "content": ""}
            if "tool_calls" in message and as_text:
                calls = [
                    {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                    for c in message["tool_calls"]
                ]
                message = {**message, "tool_calls": calls}
            messages.append(message)
        return Conversation(messages, conversation.tools)

    def render(self, conversation: Conversation) -> Rendered:
        """The conversation rendered once, with its trained spans; RowProblem when they cannot be found."""
        conversation = self.prepare(conversation)
        text, spans = render_template(self.template, self.tokenizer, conversation, tagged=self.tagged)
        rendered = Rendered(text, [s for s in spans if s[1] > s[0]])
        if self.markers is not None:
            rendered.spans, unended = find_spans(text, self.markers)
            left_open = (
                bool(unended)
                and unended[-1] == len(rendered.spans) - 1
                and rendered.spans[-1][1] == len(text)
            )
            if left_open and self.markers.open_end:  # close the last turn as the model does
                rendered.text += self.markers.open_end
                rendered.spans[-1] = (rendered.spans[-1][0], len(rendered.text))
                unended.pop()
            for index in unended:
                rendered.notes.append(
                    f"assistant turn {index + 1}: no end-of-turn token (the template renders none)"
                )
        self._check(conversation.messages, rendered)
        if self.train_on_last:
            rendered.spans = rendered.spans[-1:]
        if not self.train_on_reasoning:
            cut = [_without_reasoning(rendered.text, span) for span in rendered.spans]
            rendered.spans = [span for span in cut if span is not None]
        return rendered

    def _check(self, messages: Sequence[dict[str, Any]], rendered: Rendered) -> None:
        """The spans against the assistant messages: each answer in its span, no span that is not one."""
        answers = [m for m in messages if m["role"] == "assistant"]
        text, spans = rendered.text, rendered.spans
        for message in messages:  # Mistral renders the system prompt only before a last user turn
            content = message.get("content")
            if message["role"] == "assistant" or not isinstance(content, str):
                continue
            # Llama 3.1 renders a tool's output JSON-quoted.
            if content.strip() not in text and json.dumps(content) not in text:
                rendered.notes.append(f"the template drops the {message['role']} message")
        if len(spans) > len(answers):
            raise RowProblem(
                f"the template renders {len(spans)} assistant turns where the row has {len(answers)}, so the "
                f"{self.method} do not fit it; mark the assistant output with {{% generation %}}...{{% endgeneration %}} "
                "in the template (data.chat_template may hold the Jinja)"
            )
        if len(spans) < len(answers):
            rendered.notes.append(
                f"the template drops {len(answers) - len(spans)} of {len(answers)} assistant turns"
            )
            return
        for number, (message, (start, end)) in enumerate(zip(answers, spans, strict=True), start=1):
            answer = _answer_text(message)
            if answer and answer not in text[start:end]:
                rendered.notes.append(f"assistant turn {number}: the template drops its content")
            reasoning = message.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning.strip() and reasoning.strip() not in text:
                rendered.notes.append(f"assistant turn {number}: the template drops its reasoning_content")
            for call in message.get("tool_calls", []):
                if call["function"]["name"] not in text[start:end]:
                    raise RowProblem(
                        f"the chat template does not render tool calls: assistant turn {number}'s call of "
                        f"{call['function']['name']!r} is not in its rendering"
                    )

    def tokenize(self, renderings: Sequence[Rendered]) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per rendering, tokenized as one text each (one batched call)."""
        if not renderings:
            return []
        texts = [r.text for r in renderings]
        if not getattr(self.tokenizer, "is_fast", False):
            return [self._tokenize_pieces(r) for r in renderings]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        out = []
        for rendered, ids, offsets in zip(
            renderings, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            labels = [
                token if self.train_on_prompt or _overlaps(offset, rendered.spans) else IGNORE_INDEX
                for token, offset in zip(ids, offsets, strict=True)
            ]
            out.append(self._with_bos(rendered, list(ids), labels))
        return out

    def _tokenize_pieces(self, rendered: Rendered) -> tuple[list[int], list[int]]:
        """Slow tokenizers have no offsets: each piece between span boundaries is tokenized on its own."""
        ids: list[int] = []
        labels: list[int] = []
        cuts = sorted({0, len(rendered.text), *(x for s in rendered.spans for x in s)})
        for start, end in pairwise(cuts):
            piece = self.tokenizer(rendered.text[start:end], add_special_tokens=False)["input_ids"]
            trained = self.train_on_prompt or _overlaps((start, end), rendered.spans)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return self._with_bos(rendered, ids, labels)

    def _with_bos(self, rendered: Rendered, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        if self.bos_id is None:
            return ids, labels
        if ids[:2] == [self.bos_id, self.bos_id]:
            rendered.notes.append("BOS doubled: the rendering starts with two BOS tokens")
        if self.adds_bos and ids[:1] != [self.bos_id]:
            return [self.bos_id, *ids], [IGNORE_INDEX, *labels]
        return ids, labels


def _overlaps(offset: Sequence[int], spans: Sequence[Span]) -> bool:
    start, end = offset
    if end <= start:  # tokens without characters (none in practice) follow their neighbours' rule: skip
        return any(s <= start < e for s, e in spans)
    return any(start < e and end > s for s, e in spans)


def _without_reasoning(text: str, span: Span) -> Span | None:
    """The span after its think block (`... </think>` and the whitespace after it), when it has one."""
    start, end = span
    cut = text.find(_THINK_END, start, end)
    if cut < 0:
        return span
    cut += len(_THINK_END)
    while cut < end and text[cut].isspace():
        cut += 1
    return (cut, end) if cut < end else None
