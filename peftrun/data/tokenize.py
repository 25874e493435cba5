"""Rows -> (input_ids, labels) for causal-LM training.

Every format first becomes a list of segments `(text, trainable)`; each segment is tokenized on its own
with `add_special_tokens=False`, so the prompt/answer boundary is a token boundary and the mask is exact:

- alpaca: [(prompt, False), (output, True)], then EOS;
- chat:   rendered once and tokenized once (peftrun.data.chat.encode): the spans the model writes are
          trained, with the end-of-turn token the template renders; no EOS is added. Only a template of
          no known family without {% generation %} tags falls back to segments: for each assistant
          message i, the text between render(messages[:i], add_generation_prompt=True) and
          render(messages[:i+1]) is trainable, the rest (system, user turns, headers) is not;
- text:   [(text, True)], then EOS.

Then exactly one BOS goes in front (when the tokenizer has one) and EOS at the end with its label kept,
so the model learns to stop. Labels are the input ids with IGNORE_INDEX where the loss is not computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from peftrun.data.chat.encode import ChatEncoder, Rendered
from peftrun.data.chat.messages import Conversation
from peftrun.data.sources import RowProblem, column_map, extract_fields
from peftrun.data.templates import PROMPT_RENDERERS
from peftrun.errors import UserError

if TYPE_CHECKING:
    import torch

    from peftrun.recipe.schema import DataConfig

__all__ = [
    "DROP_REASONS",
    "IGNORE_INDEX",
    "Outcome",
    "Sample",
    "SampleEncoder",
    "Segment",
    "TokenizeStats",
    "alpaca_segments",
    "attention_mask",
    "chat_segments",
    "pad",
    "supervised_count",
    "text_segments",
]

IGNORE_INDEX = -100  # the label torch's cross-entropy (and transformers' causal-LM loss) skips

Segment = tuple[str, bool]  # (text, trainable)
RenderChat = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> text


# -------------------------------------------------------------------------------------------- segments


def alpaca_segments(fields: Mapping[str, str], prompt_template: str) -> list[Segment]:
    """[(prompt, False), (output, True)], or [] when the output is empty (nothing to learn)."""
    if not fields["output"].strip():
        return []
    prompt = PROMPT_RENDERERS[prompt_template](fields["instruction"], fields["input"])
    return [(prompt, False), (fields["output"], True)]


def text_segments(fields: Mapping[str, str]) -> list[Segment]:
    """The whole text, trainable; [] when it is blank."""
    return [(fields["text"], True)] if fields["text"].strip() else []


def chat_segments(messages: Sequence[dict[str, str]], render: RenderChat) -> list[Segment]:
    """Prompt/answer segments of a conversation, rendered incrementally with the chat template.

    Messages after the last assistant turn are left out: nothing after them is trained, so they would
    only cost compute. Raises RowProblem when the template is not prefix-consistent, because then the
    answer text cannot be cut out of the rendering.
    """
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    segments: list[Segment] = []
    covered = ""  # the rendering the segments so far add up to
    for i in assistant_turns:
        prompt = render(list(messages[:i]), True)
        full = render(list(messages[: i + 1]), False)
        if not prompt.startswith(covered) or not full.startswith(prompt):
            raise RowProblem(
                f"the chat template is of no family peftrun knows and is not prefix-consistent at message {i} "
                f"(rendering messages[:{i}] is not the start of rendering messages[:{i + 1}]), so the assistant "
                "turns cannot be cut out; mark the assistant output with {% generation %}...{% endgeneration %} "
                "in the template (data.chat_template may hold the Jinja)"
            )
        segments += [(prompt[len(covered) :], False), (full[len(prompt) :], True)]
        covered = full
    return segments


def chat_renderer(tokenizer: Any, template: str, tools: list[dict[str, Any]] | None = None) -> RenderChat:
    """Render messages with `template` exactly as `tokenizer.apply_chat_template` would.

    The lower-level renderer is used because apply_chat_template refuses an empty conversation, which a
    conversation opening with an assistant message needs as its prompt.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    special_tokens = dict(tokenizer.special_tokens_map)

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            # Annotated `-> str` upstream, but returns (renderings, generation indices).
            result: Any = render_jinja_template(
                [messages],
                tools=list(tools) if tools else None,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                **special_tokens,
            )
        except Exception as exc:  # jinja's TemplateError, or raise_exception() inside the template
            raise RowProblem(f"the chat template cannot render this conversation: {exc}") from None
        return str(result[0][0])

    return render


# -------------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    row: int  # 1-based row number in the source file
    input_ids: list[int]
    labels: list[int]


DROP_REASONS = ("", "overlong", "empty")  # why a row gave no sample; the index is stored in Arrow


@dataclass
class Outcome:
    """What became of one row: its sample, or why it gave none (then input_ids and labels are empty)."""

    row: int  # 1-based row number in the source file
    input_ids: list[int]
    labels: list[int]
    dropped: str = ""  # one of DROP_REASONS
    truncated: bool = False
    warned: bool = False  # chat: the doctor has a warning for this row (a dropped turn, no end-of-turn token)


@dataclass
class TokenizeStats:
    """What happened to the rows; totals count the kept samples only."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_empty: int = 0
    supervised_tokens: int = 0
    total_tokens: int = 0
    template_warnings: int = (
        0  # chat rows the doctor has a warning for (a dropped turn, no end-of-turn token)
    )

    def __iadd__(self, other: TokenizeStats) -> TokenizeStats:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self

    def count(self, outcome: Outcome) -> None:
        self.rows += 1
        self.template_warnings += outcome.warned
        if outcome.dropped:
            self.dropped_overlong += outcome.dropped == "overlong"
            self.dropped_empty += outcome.dropped == "empty"
            return
        self.kept += 1
        self.truncated += outcome.truncated
        self.total_tokens += len(outcome.input_ids)
        self.supervised_tokens += supervised_count(outcome.labels)


def supervised_count(labels: list[int]) -> int:
    """Tokens the loss is computed on."""
    return len(labels) - labels.count(IGNORE_INDEX)


def _token_text(tokenizer: Any, name: str) -> str | None:
    value = getattr(tokenizer, name, None)
    return str(value) if value is not None else None


class SampleEncoder:
    """Turns rows of one source into training samples, for one tokenizer and one `data` config.

    `source` names the file in errors; `chat_template` is the resolved Jinja template (chat format only).
    Chat rows of a known template (its family's turn markers, or {% generation %} tags) go through
    `ChatEncoder`: rendered once, tokenized once; others through the prefix segments below.
    """

    def __init__(
        self, tokenizer: Any, cfg: DataConfig, source: str, chat_template: str | None = None
    ) -> None:
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no EOS token, so samples cannot teach the model to stop")
        if cfg.format == "chat" and chat_template is None:
            raise ValueError("the chat format needs a resolved chat template")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.source = source
        self.columns = column_map(cfg.format, cfg.columns)
        self.bos_id: int | None = tokenizer.bos_token_id
        self.bos_text = _token_text(tokenizer, "bos_token") if self.bos_id is not None else None
        self.eos_id: int = tokenizer.eos_token_id
        self.eos_text = _token_text(tokenizer, "eos_token")
        self.chat = ChatEncoder(tokenizer, chat_template, cfg) if chat_template is not None else None
        self.chat_template = chat_template

    # rows -> segments

    def segments(self, row: Mapping[str, Any]) -> list[Segment]:
        """The row's segments with the tokenizer's BOS text removed from the front; [] if nothing to learn."""
        fields = extract_fields(row, self.cfg.format, self.columns, recipe_tools=self.cfg.tools)
        if self.cfg.format == "alpaca":
            segments = alpaca_segments(fields, self.cfg.prompt_template)
        elif self.cfg.format == "chat":
            assert self.chat_template is not None
            render = chat_renderer(self.tokenizer, self.chat_template, fields["tools"])
            segments = chat_segments(fields["messages"], render)
            if self.cfg.train_on == "last":
                last = max((i for i, (_, trainable) in enumerate(segments) if trainable), default=-1)
                segments = [(text, trainable and i == last) for i, (text, trainable) in enumerate(segments)]
        else:
            segments = text_segments(fields)
        return self._without_leading_bos(segments)

    def _without_leading_bos(self, segments: list[Segment]) -> list[Segment]:
        # A template that renders the BOS text itself (Llama 3) would otherwise give two BOS tokens.
        if segments and self.bos_text and segments[0][0].startswith(self.bos_text):
            text, trainable = segments[0]
            segments = [(text[len(self.bos_text) :], trainable), *segments[1:]]
        return segments

    def _needs_eos(self, segments: list[Segment]) -> bool:
        # Chat templates such as zephyr close every turn with EOS already; alpaca/text never do.
        if self.cfg.format != "chat" or not self.eos_text:
            return True
        return not segments[-1][0].rstrip().endswith(self.eos_text)

    # segments -> tokens

    def _assemble(self, pieces: list[tuple[list[int], bool]], needs_eos: bool) -> tuple[list[int], list[int]]:
        """One BOS (never a label: nothing comes before it), the pieces, EOS (always a label)."""
        input_ids: list[int] = []
        labels: list[int] = []
        if self.bos_id is not None:
            input_ids.append(self.bos_id)
            labels.append(IGNORE_INDEX)
        for ids, trainable in pieces:
            input_ids += ids
            labels += ids if trainable or self.cfg.train_on_prompt else [IGNORE_INDEX] * len(ids)
        if needs_eos:
            input_ids.append(self.eos_id)
            labels.append(self.eos_id)
        return input_ids, labels

    def _fit(self, row: int, input_ids: list[int], labels: list[int]) -> Outcome:
        """Apply data.overlong to a sample longer than max_seq_len."""
        max_len = self.cfg.max_seq_len
        if len(input_ids) <= max_len:
            return Outcome(row, input_ids, labels)
        if self.cfg.overlong == "error":
            raise UserError(
                f"{self.source}: row {row}: sample is {len(input_ids)} tokens, longer than data.max_seq_len="
                f"{max_len}; raise it, or set data.overlong to truncate or drop"
            )
        if self.cfg.overlong == "truncate" and supervised_count(labels[:max_len]):
            return Outcome(row, input_ids[:max_len], labels[:max_len], truncated=True)
        return Outcome(row, [], [], dropped="overlong")  # drop, or truncation left nothing to learn

    def encode(
        self, rows: Sequence[Mapping[str, Any]], first_row: int = 1
    ) -> tuple[list[Sample], TokenizeStats]:
        """Samples for a batch of rows (numbered from `first_row` in errors), and what happened to them."""
        samples, stats = [], TokenizeStats()
        for outcome in self.outcomes(rows, first_row):
            stats.count(outcome)
            if not outcome.dropped:
                samples.append(Sample(outcome.row, outcome.input_ids, outcome.labels))
        return samples, stats

    def outcomes(self, rows: Sequence[Mapping[str, Any]], first_row: int = 1) -> list[Outcome]:
        """One outcome per row, in order (numbered from `first_row` in errors).

        Segments of the whole batch are tokenized in one call, which fast tokenizers parallelise.
        """
        if self.chat is not None and self.chat.known:
            return self._chat_outcomes(rows, first_row)
        found: dict[int, Outcome] = {}
        rendered: list[tuple[int, list[Segment]]] = []
        for row_number, row in enumerate(rows, start=first_row):
            try:
                segments = self.segments(row)
            except RowProblem as exc:
                raise UserError(f"{self.source}: row {row_number}: {exc}") from None
            if segments:
                rendered.append((row_number, segments))
            else:
                found[row_number] = Outcome(row_number, [], [], dropped="empty")

        texts = [text for _, segments in rendered for text, _ in segments]
        token_ids = (
            iter(self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
            if texts
            else iter(())
        )
        for row_number, segments in rendered:
            pieces = [(list(next(token_ids)), trainable) for _, trainable in segments]
            found[row_number] = self._fit(row_number, *self._assemble(pieces, self._needs_eos(segments)))
        return [found[number] for number in range(first_row, first_row + len(rows))]

    def render_chat(self, row: Mapping[str, Any]) -> Rendered:
        """One chat row rendered once with its trained spans (templates of a known family, or tagged)."""
        assert self.chat is not None
        fields = extract_fields(row, "chat", self.columns, recipe_tools=self.cfg.tools)
        return self.chat.render(Conversation(fields["messages"], fields["tools"]))

    def _chat_outcomes(self, rows: Sequence[Mapping[str, Any]], first_row: int) -> list[Outcome]:
        """Chat rows of a known template: each rendered once, then all tokenized in one call."""
        assert self.chat is not None
        found: dict[int, Outcome] = {}
        numbered: list[tuple[int, Rendered]] = []
        for row_number, row in enumerate(rows, start=first_row):
            try:
                rendered = self.render_chat(row)
            except RowProblem as exc:
                raise UserError(f"{self.source}: row {row_number}: {exc}") from None
            if rendered.spans:
                numbered.append((row_number, rendered))
            else:
                found[row_number] = Outcome(row_number, [], [], dropped="empty")
        tokens = self.chat.tokenize([rendered for _, rendered in numbered])
        for (row_number, rendered), (ids, labels) in zip(numbered, tokens, strict=True):
            outcome = self._fit(row_number, ids, labels)
            outcome.warned = bool(rendered.notes)
            found[row_number] = outcome
        return [found[number] for number in range(first_row, first_row + len(rows))]


# ---- batches ------------------------------------------------------------------------------------------


def pad(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad id lists into one [batch, longest] long tensor."""
    import torch

    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), value, dtype=torch.long)
    for i, sequence in enumerate(sequences):
        out[i, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out


def attention_mask(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """1 on each sequence's tokens, 0 on the padding `pad` adds."""
    return pad([[1] * len(s) for s in sequences], 0)
