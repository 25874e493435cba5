"""The compatibility corpus: published chat templates of 12 model families (tests/data/templates, sources
in SOURCES.md), a tokenizer per family built here with its special tokens, and the conversations users
train on. Tokenizers are byte-level with no merges: any text round-trips, so a decoded span is exactly
the characters it covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent.parent / "templates"


@dataclass(frozen=True)
class Family:
    name: str
    bos: str | None
    eos: str
    specials: tuple[str, ...]
    adds_bos: bool  # the real tokenizer puts BOS in front of any text it encodes
    end_of_turn: tuple[str, ...]  # what every trained turn ends with (one of)

    @property
    def template(self) -> str:
        return (TEMPLATES / f"{self.name}.jinja").read_text(encoding="utf-8")


QWEN_SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
MISTRAL_SPECIALS = (
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)
PHI3_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
GEMMA_SPECIALS = ("<start_of_turn>", "<end_of_turn>")
FAMILIES = (
    Family("qwen3", None, "<|im_end|>", QWEN_SPECIALS, False, ("<|im_end|>",)),
    Family("qwen2_5", None, "<|im_end|>", QWEN_SPECIALS, False, ("<|im_end|>",)),
    Family(
        "llama3_1",
        "<|begin_of_text|>",
        "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
        True,
        ("<|eot_id|>",),
    ),
    Family("gemma2", "<bos>", "<eos>", GEMMA_SPECIALS, True, ("<end_of_turn>",)),
    Family("gemma3", "<bos>", "<eos>", GEMMA_SPECIALS, True, ("<end_of_turn>",)),
    Family("mistral_v0_3", "<s>", "</s>", MISTRAL_SPECIALS, True, ("</s>",)),
    Family("mistral_nemo", "<s>", "</s>", MISTRAL_SPECIALS, True, ("</s>",)),
    Family("phi3", "<s>", "<|endoftext|>", PHI3_SPECIALS, True, ("<|end|>",)),
    Family("phi3_5", "<s>", "<|endoftext|>", PHI3_SPECIALS, True, ("<|end|>",)),
    Family(
        "phi4",
        "<|endoftext|>",
        "<|im_end|>",
        ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
        False,
        ("<|im_end|>",),
    ),
    Family(
        "deepseek_r1_distill",
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        (
            "<｜User｜>",
            "<｜Assistant｜>",
            "<｜tool▁calls▁begin｜>",
            "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>",
            "<｜tool▁call▁end｜>",
            "<｜tool▁sep｜>",
            "<｜tool▁outputs▁begin｜>",
            "<｜tool▁outputs▁end｜>",
            "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>",
        ),
        True,
        ("<｜end▁of▁sentence｜>",),
    ),
    Family(
        "glm4_5",
        None,
        "<|endoftext|>",
        (
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<arg_key>",
            "</arg_key>",
            "<arg_value>",
            "</arg_value>",
            "<tool_response>",
            "</tool_response>",
        ),
        False,
        ("<|user|>", "<|observation|>"),
    ),
)


def build_tokenizer(family: Family) -> Any:
    """A fast tokenizer with the family's special tokens, BOS/EOS and chat template (no hub, no training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = list(dict.fromkeys([t for t in (family.bos, family.eos) if t] + list(family.specials)))
    backend.add_special_tokens(specials)
    if family.adds_bos and family.bos:
        bos_id = backend.token_to_id(family.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", special_tokens=[(family.bos, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=family.bos,
        eos_token=family.eos,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = family.template
    return tokenizer


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
SYSTEM = {"role": "system", "content": "You answer in one short sentence."}


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def _assistant(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


CONVERSATIONS: dict[str, dict[str, Any]] = {
    "single": {"messages": [_user("What is two plus two?"), _assistant("Two plus two is four.")]},
    "three_turns": {
        "messages": [
            _user("Name a colour."),
            _assistant("Blue."),
            _user("Another one?"),
            _assistant("Green."),
            _user("And a third?"),
            _assistant("Red."),
        ]
    },
    "system": {"messages": [SYSTEM, _user("Where is Paris?"), _assistant("Paris is in France.")]},
    "reasoning_inline": {
        "messages": [
            _user("Is 7 prime?"),
            _assistant("<think>\nIt has no divisor but 1 and 7.\n</think>\n\nYes, 7 is prime."),
        ]
    },
    "reasoning_field": {
        "messages": [
            _user("Is 9 prime?"),
            _assistant("No, 9 is three times three.", reasoning_content="9 = 3 x 3."),
        ]
    },
    "tool_call": {
        "messages": [
            _user("What is the weather in Paris?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call00001",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp_c": 21}'},
            _assistant("It is 21 C in Paris."),
        ],
        "tools": TOOLS,
    },
}
# Texts that are never the model's: no trained token may come from them.
PROMPT_TEXTS = (
    "What is two plus two?",
    "Name a colour.",
    "Another one?",
    "And a third?",
    "You answer in one short sentence.",
    "Where is Paris?",
    "Is 7 prime?",
    "Is 9 prime?",
    "What is the weather in Paris?",
    '{"temp_c": 21}',
    "Current weather in a city",
)
