"""Prompt and chat templates: the text around the data before it becomes tokens.

Chat masking (see `tokenize.py`) needs templates that are *prefix-consistent*: rendering
`messages[:i]` with a generation prompt must be a string prefix of rendering `messages[:i+1]`. Every
built-in template here renders each message independently of what follows it, which guarantees that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftrun.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from peftrun.recipe.schema import DataConfig

__all__ = [
    "CHAT_TEMPLATES",
    "PROMPT_RENDERERS",
    "adopt_chat_template",
    "dataset_templates",
    "recipe_chat_template",
    "render_alpaca_prompt",
    "render_plain_prompt",
    "resolve_chat_template",
]

# ChatML (Qwen, OpenHermes, ...): `<|im_start|>role\ncontent<|im_end|>\n`.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 instruct; the BOS it renders is de-duplicated by the tokenization step.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Zephyr: `<|role|>\ncontent</s>\n`, with the tokenizer's own EOS closing each turn.
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "zephyr": ZEPHYR}

# Stanford Alpaca's prompts, verbatim (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_alpaca_prompt(instruction: str, input: str) -> str:
    """The Stanford Alpaca prompt; the `### Input:` block only when there is an input."""
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def render_plain_prompt(instruction: str, input: str) -> str:
    """Instruction, a blank line and the input, then a newline: no scaffolding for the model to learn."""
    if input.strip():
        return f"{instruction}\n\n{input}\n"
    return f"{instruction}\n"


PROMPT_RENDERERS = {"alpaca": render_alpaca_prompt, "plain": render_plain_prompt}


def _tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template; some tokenizers keep several by name, 'default' is the chat one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def recipe_chat_template(name: str) -> str:
    """The Jinja that `data.chat_template` stands for: the value itself when it is Jinja, else a built-in's."""
    if "{{" in name or "{%" in name:
        return name
    if name not in CHAT_TEMPLATES:
        raise UserError(
            f"data.chat_template: unknown template '{name}'{did_you_mean(name, CHAT_TEMPLATES)} "
            f"(built-in: {', '.join(CHAT_TEMPLATES)})"
        )
    return CHAT_TEMPLATES[name]


def resolve_chat_template(tokenizer: Any, name: str | None) -> str:
    """The Jinja chat template to render with: the built-in `name` when given, else the tokenizer's own.

    A value that is itself Jinja (contains `{{` or `{%`) is used as the template, so a custom template can
    live in the recipe without editing the tokenizer's files.
    """
    if name is not None:
        return recipe_chat_template(name)
    template = _tokenizer_template(tokenizer)
    if template is None:
        raise UserError(
            f"the tokenizer has no chat template; set data.chat_template to one of {', '.join(CHAT_TEMPLATES)}"
        )
    return template


def adopt_chat_template(tokenizer: Any, fmt: str, name: str | None) -> str | None:
    """The resolved chat template of a chat set (None for other formats); the tokenizer adopts the recipe's.

    The run saves this tokenizer (final/, exports, merges), which must render chats as training did.
    """
    if fmt != "chat":
        return None
    template = resolve_chat_template(tokenizer, name)
    if name is not None:
        tokenizer.chat_template = template
    return template


def dataset_templates(tokenizer: Any, cfg: DataConfig) -> list[str | None]:
    """Each dataset's resolved chat template (None where it is not chat), in `cfg.sources()` order; the
    tokenizer adopts data.chat_template when the recipe sets one and a dataset is chat."""
    sources = cfg.sources()
    any_chat = any(source.format == "chat" for source in sources)
    adopt_chat_template(tokenizer, "chat" if any_chat else cfg.format, cfg.chat_template)
    return [
        resolve_chat_template(tokenizer, source.chat_template) if source.format == "chat" else None
        for source in sources
    ]
