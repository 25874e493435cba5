"""Rows of every shape users bring become the messages chat templates expect, or one clear error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from peftrun.data.chat.messages import conversation_of
from peftrun.data.sources import RowProblem, column_map

COLUMNS = column_map("chat", {})
CALL = {
    "id": "call00001",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_openai_tool_calls_pass_through_with_arguments_as_objects() -> None:
    row = {
        "messages": [
            {"role": "user", "content": "Weather?", "name": "ann"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call00001", "content": {"temp_c": 21}},
            {"role": "assistant", "content": "21 C.", "reasoning_content": "The tool said so."},
        ]
    }
    messages = conversation_of(row, COLUMNS).messages
    assert messages[0] == {"role": "user", "content": "Weather?", "name": "ann"}
    assert messages[1]["content"] is None  # templates test `content is none`
    assert messages[1]["tool_calls"] == [
        {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert messages[2] == {"role": "tool", "tool_call_id": "call00001", "content": '{"temp_c": 21}'}
    assert messages[3]["reasoning_content"] == "The tool said so."


def test_text_parts_become_one_string() -> None:
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]
    }
    assert conversation_of(row, COLUMNS).messages[0]["content"] == "ab"


def test_sharegpt_rows_are_converted() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Weather?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}}),
            },
            {"from": "observation", "value": '{"temp_c": 3}'},
            {"from": "gpt", "value": "3 C."},
        ],
        "tools": json.dumps(TOOLS),
    }
    conversation = conversation_of(row, COLUMNS)
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert conversation.messages[2]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Oslo"},
    }
    assert conversation.tools == TOOLS


def test_prompt_completion_pairs() -> None:
    assert conversation_of({"prompt": "2+2?", "completion": "4"}, COLUMNS).messages == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    conversational = {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "yo"}],
    }
    assert [m["content"] for m in conversation_of(conversational, COLUMNS).messages] == ["hi", "yo"]


def test_tools_from_the_recipe_unless_the_row_has_its_own() -> None:
    row: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    assert conversation_of(row, COLUMNS, TOOLS).tools == TOOLS
    own = [{"type": "function", "function": {"name": "other"}}]
    assert conversation_of({**row, "tools": own}, COLUMNS, TOOLS).tools == own


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content must be a string, got null"),
        (
            {"messages": [{"role": "assistant", "content": "x", "tool_call": []}]},
            "messages[0] has unknown key 'tool_call' (known: role, content, tool_calls, tool_call_id, name, "
            "reasoning_content, thinking)",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}
                ]
            },
            "messages[0].tool_calls[0] needs function.name (a string)",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"function": {"name": "f", "arguments": "{"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments is not JSON",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}]},
            "messages[0].content[0] is a 'image' part; only text parts can be trained on",
        ),
        (
            {"conversations": [{"from": "bot", "value": "x"}]},
            "conversations[0] has unknown 'from' 'bot' (known: system, human, user, gpt, assistant, function_call, observation, tool)",
        ),
    ],
)
def test_bad_rows_say_what_is_wrong(row: dict[str, Any], message: str) -> None:
    with pytest.raises(RowProblem) as caught:
        conversation_of(row, COLUMNS)
    assert str(caught.value) == message
