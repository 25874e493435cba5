"""Which characters of one rendered conversation the model writes: the trained spans.

A family's turns are recognised by its special strings: the header that opens an assistant turn (the
prompt writes it, the model does not), the end-of-turn text the model emits (trained, closes the turn),
and the headers of other turns (close the turn, not trained). Cutting one full rendering this way keeps
everything a template does with the position of a turn (Qwen3's think block on the last turn only,
Mistral's system text in the last user turn, GLM's turn ending at the next `<|user|>`), which comparing
renderings of shorter conversations cannot.

Templates that mark their output with `{% generation %}` need none of this: their spans are taken as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FAMILIES", "TurnMarkers", "find_spans", "identify_family"]

Span = tuple[int, int]  # [start, end) character offsets in the rendering


@dataclass(frozen=True)
class TurnMarkers:
    family: str
    signature: tuple[str, ...]  # all of these appear in a rendering of the family's template
    opens: tuple[str, ...]  # text right before a turn the model writes
    ends: tuple[str, ...]  # the end-of-turn text the model emits: trained, closes the turn
    stops: tuple[str, ...]  # the start of another turn: closes the turn, not trained
    # The end-of-turn text the model emits after a last turn that the template leaves open (GLM stops
    # by writing the next turn's header, which the template renders only when a turn follows).
    open_end: str | None = None
    string_arguments: bool = False  # the template concatenates tool-call arguments as JSON text
    null_content: bool = False  # the template tests `content is none` (else a null content becomes "")

    def resolved(self, eos_token: str | None) -> TurnMarkers:
        """`{eos}` in ends replaced by the tokenizer's EOS text."""
        ends = tuple(eos_token or "" if e == "{eos}" else e for e in self.ends)
        return TurnMarkers(**{**self.__dict__, "ends": tuple(e for e in ends if e)})


# Most specific first: the first family whose signature is in the probe rendering is the template's.
FAMILIES: tuple[TurnMarkers, ...] = (
    TurnMarkers(
        family="phi4",
        signature=("<|im_start|>assistant<|im_sep|>",),
        opens=("<|im_start|>assistant<|im_sep|>",),
        ends=("<|im_end|>",),
        stops=("<|im_start|>",),
    ),
    TurnMarkers(
        family="chatml",  # Qwen2.5, Qwen3, Hermes, peftrun's chatml, ...
        signature=("<|im_start|>assistant\n",),
        opens=("<|im_start|>assistant\n",),
        ends=("<|im_end|>",),
        stops=("<|im_start|>",),
    ),
    TurnMarkers(
        family="llama3",
        signature=("<|start_header_id|>assistant<|end_header_id|>\n\n",),
        opens=("<|start_header_id|>assistant<|end_header_id|>\n\n",),
        ends=("<|eot_id|>", "<|eom_id|>"),
        stops=("<|start_header_id|>",),
    ),
    TurnMarkers(
        family="gemma",
        signature=("<start_of_turn>model\n",),
        opens=("<start_of_turn>model\n",),
        ends=("<end_of_turn>",),
        stops=("<start_of_turn>",),
    ),
    TurnMarkers(
        family="glm4",
        signature=("[gMASK]<sop>", "<|assistant|>"),
        opens=("<|assistant|>",),
        ends=("<|user|>", "<|observation|>"),
        stops=("<|system|>",),
        open_end="<|user|>",
    ),
    TurnMarkers(
        family="phi3",
        signature=("<|assistant|>\n", "<|end|>"),
        opens=("<|assistant|>\n",),
        ends=("<|end|>",),
        stops=("<|user|>", "<|system|>"),
    ),
    TurnMarkers(
        family="zephyr",
        signature=("<|assistant|>\n",),
        opens=("<|assistant|>\n",),
        ends=("{eos}",),
        stops=("<|user|>", "<|system|>"),
    ),
    TurnMarkers(
        family="mistral",  # v0.3 (SentencePiece) and Nemo (Tekken)
        signature=("[INST]", "[/INST]"),
        opens=("[/INST]", "[/TOOL_RESULTS]"),
        ends=("{eos}",),
        stops=("[INST]", "[TOOL_RESULTS]", "[AVAILABLE_TOOLS]"),
    ),
    TurnMarkers(
        family="deepseek",  # DeepSeek-R1 and its distills, DeepSeek-V3
        signature=("<｜Assistant｜>",),
        opens=("<｜Assistant｜>", "<｜tool▁outputs▁end｜>"),
        ends=("<｜end▁of▁sentence｜>",),
        stops=("<｜User｜>", "<｜tool▁outputs▁begin｜>"),
        string_arguments=True,
        null_content=True,
    ),
)


def identify_family(probe_rendering: str) -> TurnMarkers | None:
    """The family whose markers a rendering of a short conversation shows; None for an unknown template."""
    for markers in FAMILIES:
        if all(s in probe_rendering for s in markers.signature):
            return markers
    return None


def _first(text: str, needles: Sequence[str], start: int) -> tuple[int, str] | None:
    """The earliest occurrence at or after `start` of any needle (the longest on a tie)."""
    found = [(i, n) for n in needles if n and (i := text.find(n, start)) >= 0]
    return min(found, key=lambda hit: (hit[0], -len(hit[1]))) if found else None


def find_spans(text: str, markers: TurnMarkers) -> tuple[list[Span], list[int]]:
    """The trained spans of `text`, and the indices of those that end without an end-of-turn text."""
    spans: list[Span] = []
    unended: list[int] = []
    position = 0
    closers = (*markers.ends, *markers.stops, *markers.opens)
    while (opened := _first(text, markers.opens, position)) is not None:
        start = opened[0] + len(opened[1])
        closed = _first(text, closers, start)
        ended = closed is not None and closed[1] in markers.ends
        end = len(text) if closed is None else closed[0] + (len(closed[1]) if ended else 0)
        if text[start:end].strip():
            if not ended:
                unended.append(len(spans))
            spans.append((start, end))
        position = max(end, start)
    return spans, unended
