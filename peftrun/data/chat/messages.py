"""Conversations as chat templates expect them: OpenAI-style messages, read from the shapes datasets use.

A row is one of:
- `messages`: a list of {role, content, ...}; roles system/user/assistant/tool. Keys the templates read
  pass through untouched: `tool_calls` (content may then be null), `tool_call_id`, `name`,
  `reasoning_content`. Content made of text parts ([{type: text, text}]) becomes one string.
- ShareGPT `conversations`: a list of {from, value}; human/gpt/system/function_call/observation become
  user/assistant/system/assistant-with-tool_calls/tool.
- `prompt` and `completion`: strings (a user turn and an assistant turn) or lists of messages.

Tool definitions come from a `tools` column (a list, or JSON text of one) or from `data.tools`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from peftrun.data.sources import RowProblem

__all__ = ["ROLES", "SHAREGPT_ROLES", "Conversation", "RowProblem", "conversation_of"]

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
# Keys a message may carry besides role and content; anything else is an error (a typo would be lost).
_PASSED_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "thinking")


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = field(default=None)


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _text_content(value: Any, where: str) -> str:
    """Multi-part content that is text, as one string; any other part cannot be rendered as text."""
    texts = []
    for j, part in enumerate(value):
        if isinstance(part, str):
            texts.append(part)
        elif (
            isinstance(part, dict)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            raise RowProblem(f"{where}.content[{j}] is a {kind!r} part; only text parts can be trained on")
    return "".join(texts)


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """tool_calls as {type, id?, function: {name, arguments}}, arguments an object when it is JSON text."""
    if not isinstance(value, list) or not value:
        raise RowProblem(f"{where}.tool_calls must be a non-empty list, got {_type_name(value)}")
    calls = []
    for j, call in enumerate(value):
        if not isinstance(call, dict):
            raise RowProblem(f"{where}.tool_calls[{j}] must be an object, got {_type_name(call)}")
        function = call.get("function", call)  # {name, arguments} without the OpenAI wrapper is accepted
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowProblem(f"{where}.tool_calls[{j}] needs function.name (a string)")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise RowProblem(f"{where}.tool_calls[{j}].function.arguments is not JSON") from None
        fixed = {k: v for k, v in call.items() if k != "function" and k not in ("name", "arguments")}
        fixed["type"] = call.get("type", "function")
        fixed["function"] = {**function, "arguments": arguments}
        calls.append(fixed)
    return calls


def _message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RowProblem(f"{where} must be an object with role and content, got {_type_name(message)}")
    if "role" not in message:
        raise RowProblem(f"{where} is missing 'role' (keys: {', '.join(message) or 'none'})")
    role = message.get("role")
    if role not in ROLES:
        raise RowProblem(f"{where} has unknown role {role!r} (known: {', '.join(ROLES)})")
    # Null keys are what Arrow gives a message for its neighbours' keys (Hub datasets): not the row's own.
    unknown = [k for k, v in message.items() if v is not None and k not in ("role", "content", *_PASSED_KEYS)]
    if unknown:
        raise RowProblem(
            f"{where} has unknown key {unknown[0]!r} (known: role, content, {', '.join(_PASSED_KEYS)})"
        )
    fixed: dict[str, Any] = {k: v for k, v in message.items() if v is not None}
    fixed["role"] = role
    content = message.get("content")
    if isinstance(content, list):
        content = _text_content(content, where)
    elif role == "tool" and isinstance(content, (dict, list)):
        content = json.dumps(content, ensure_ascii=False)
    if message.get("tool_calls") is not None:
        if role != "assistant":
            raise RowProblem(f"{where}: only assistant messages carry tool_calls, this one is {role!r}")
        fixed["tool_calls"] = _tool_calls(message["tool_calls"], where)
        if content is not None and not isinstance(content, str):
            raise RowProblem(f"{where}.content must be a string or null, got {_type_name(content)}")
        fixed["content"] = content  # null stays null: templates test `content is none`
    elif "content" not in message:
        raise RowProblem(f"{where} is missing 'content' (keys: {', '.join(message)})")
    elif not isinstance(content, str):
        raise RowProblem(f"{where}.content must be a string, got {_type_name(content)}")
    else:
        fixed["content"] = content
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise RowProblem(f"{where}.reasoning_content must be a string, got {_type_name(reasoning)}")
    return fixed


def _messages(value: Any, column: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else _type_name(value)
        raise RowProblem(f"'{column}' must be a non-empty list of {{role, content}}, got {got}")
    return [_message(m, f"{column}[{i}]") for i, m in enumerate(value)]


def _json_text(value: str, column: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise RowProblem(f"'{column}' is text that is not JSON") from None


def _from_sharegpt(value: Any, column: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RowProblem(f"'{column}' must be a non-empty list of {{from, value}}, got {_type_name(value)}")
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(value):
        where = f"{column}[{i}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RowProblem(f"{where} must be an object with from and value (a string)")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RowProblem(f"{where} has unknown 'from' {speaker!r} (known: {', '.join(SHAREGPT_ROLES)})")
        if speaker == "function_call":
            call = _json_text(turn["value"], f"{where}.value")
            calls = call if isinstance(call, list) else [call]
            messages.append(_message({"role": "assistant", "content": None, "tool_calls": calls}, where))
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


def _turns(value: Any, role: str, column: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, column)


def _tools(value: Any, column: str) -> list[dict[str, Any]] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        value = _json_text(value, column)
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowProblem(f"'{column}' must be a list of tool definitions (objects), got {_type_name(value)}")
    return value


def conversation_of(
    row: Mapping[str, Any], columns: Mapping[str, str], recipe_tools: Sequence[dict[str, Any]] | None = None
) -> Conversation:
    """The row's conversation, whichever shape it has; `columns` maps peftrun's names to the file's."""
    messages_col = columns["messages"]
    if row.get(messages_col) is not None:
        messages = _messages(row[messages_col], messages_col)
    elif row.get(columns["conversations"]) is not None:
        messages = _from_sharegpt(row[columns["conversations"]], columns["conversations"])
    elif row.get(columns["prompt"]) is not None and row.get(columns["completion"]) is not None:
        messages = _turns(row[columns["prompt"]], "user", columns["prompt"]) + _turns(
            row[columns["completion"]], "assistant", columns["completion"]
        )
    else:
        present = ", ".join(str(c) for c, v in row.items() if v is not None) or "none"
        raise RowProblem(
            f"missing '{messages_col}' (columns: {present}); map it with data.columns, or give ShareGPT "
            f"'{columns['conversations']}' or '{columns['prompt']}' and '{columns['completion']}'"
        )
    tools = _tools(row.get(columns["tools"]), columns["tools"])
    return Conversation(
        messages, tools if tools is not None else (list(recipe_tools) if recipe_tools else None)
    )
