"""Prompt strings and response post-processing of both ChatGLM generations (spec/chat.md)."""

from __future__ import annotations

import sys

import pytest

from chatglm.prompt import (
    V1_FORMAT,
    V2_FORMAT,
    build_incremental_prompt_v2,
    build_prompt_v1,
    build_prompt_v2,
    get_prompt_format,
    messages_to_query_history,
    process_response_v1,
    process_response_v2,
)

FULL_COLON = "\uff1a"


def test_prompt_module_imports_only_the_standard_library() -> None:
    # The API layer and data scripts use the prompt strings without the model stack.
    import ast

    import chatglm.prompt as prompt_module

    tree = ast.parse(open(prompt_module.__file__, encoding="utf-8").read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


# -- v2 ---------------------------------------------------------------------------------------------------------


def test_v2_prompt_without_history() -> None:
    assert build_prompt_v2("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert build_prompt_v2("你好", []) == build_prompt_v2("你好", None)


def test_v2_prompt_uses_full_width_colon() -> None:
    prompt = build_prompt_v2("q")
    assert f"问{FULL_COLON}q" in prompt and prompt.endswith(f"答{FULL_COLON}")
    assert ":" not in prompt


def test_v2_prompt_with_one_turn() -> None:
    assert build_prompt_v2("晚上睡不着应该怎么办", [("你好", "你好👋！")]) == (
        "[Round 1]\n\n问：你好\n\n答：你好👋！\n\n[Round 2]\n\n问：晚上睡不着应该怎么办\n\n答："
    )


def test_v2_prompt_with_two_turns_accepts_lists() -> None:
    history = [["q1", "r1"], ("q2", "r2")]  # JSON gives lists, chat() gives tuples
    assert build_prompt_v2("q3", history) == (
        "[Round 1]\n\n问：q1\n\n答：r1\n\n"
        "[Round 2]\n\n问：q2\n\n答：r2\n\n"
        "[Round 3]\n\n问：q3\n\n答："
    )


def test_v2_incremental_prompt() -> None:
    assert build_incremental_prompt_v2("q3", [("q1", "r1"), ("q2", "r2")]) == "\n\n[Round 3]\n\n问：q3\n\n答："
    # Appending it to the previous prompt + answer gives exactly the full prompt.
    history = [("q1", "r1")]
    assert build_prompt_v2("q1") + "r1" + build_incremental_prompt_v2("q2", history) == build_prompt_v2("q2", history)


def test_v2_incremental_prompt_needs_history() -> None:
    with pytest.raises(ValueError):
        build_incremental_prompt_v2("q", [])


def test_malformed_history_turn_is_rejected() -> None:
    with pytest.raises(ValueError):
        build_prompt_v2("q", [("only one",)])


# -- v1 ---------------------------------------------------------------------------------------------------------


def test_v1_prompt_without_history_is_the_raw_query() -> None:
    assert build_prompt_v1("你好") == "你好"
    assert build_prompt_v1("你好", []) == "你好"


def test_v1_prompt_with_one_turn() -> None:
    # The chatglm.cpp v1 test prompt (spec/tokenizer.md).
    assert build_prompt_v1(
        "晚上睡不着应该怎么办", [("你好", "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。")]
    ) == (
        "[Round 0]\n问：你好\n答：你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。\n"
        "[Round 1]\n问：晚上睡不着应该怎么办\n答："
    )


def test_v1_prompt_with_two_turns() -> None:
    assert build_prompt_v1("q3", [("q1", "r1"), ("q2", "r2")]) == (
        "[Round 0]\n问：q1\n答：r1\n[Round 1]\n问：q2\n答：r2\n[Round 2]\n问：q3\n答："
    )


# -- post-processing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  你好  \n", "你好"),
        ("我的训练时间是[[训练时间]]。", "我的训练时间是2023年。"),
        ("你好,世界!", "你好,世界!"),  # v2 leaves ASCII punctuation alone
    ],
)
def test_process_response_v2(raw: str, expected: str) -> None:
    assert process_response_v2(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  你好  ", "你好"),
        ("[[训练时间]]", "2023年"),
        ("你好,世界!", "你好，世界！"),
        ("问:答;好?", "问：答；好？"),
        ("Hello, world! a:b; c?", "Hello, world! a:b; c?"),  # no CJK neighbour: unchanged
        ("ChatGLM-6B,很高兴", "ChatGLM-6B，很高兴"),  # CJK on the right only
        ("很高兴,ChatGLM", "很高兴，ChatGLM"),  # CJK on the left only
        ("中,,文", "中，，文"),  # each mark touches a CJK char on one side
        ("中, 文", "中， 文"),
        ("a , 中", "a , 中"),  # a space in between: not adjacent
        ("你好👋!我是", "你好👋！我是"),
        ("\u4e00,\u9fff", "\u4e00，\u9fff"),  # range ends are CJK
        ("\u3400,x", "\u3400,x"),  # extension A is outside U+4E00..U+9FFF
    ],
)
def test_process_response_v1(raw: str, expected: str) -> None:
    assert process_response_v1(raw) == expected


# -- formats ----------------------------------------------------------------------------------------------------


def test_prompt_formats_bundle_defaults() -> None:
    assert (V2_FORMAT.max_length, V2_FORMAT.top_p, V2_FORMAT.temperature) == (8192, 0.8, 0.8)
    assert (V1_FORMAT.max_length, V1_FORMAT.top_p, V1_FORMAT.temperature) == (2048, 0.7, 0.95)
    assert V2_FORMAT.build_prompt("q") == build_prompt_v2("q")
    assert V1_FORMAT.build_prompt("q", [("a", "b")]) == build_prompt_v1("q", [("a", "b")])
    assert V1_FORMAT.process_response("好,") == "好，"
    assert V2_FORMAT.build_incremental_prompt is build_incremental_prompt_v2
    assert V1_FORMAT.build_incremental_prompt is None
    assert V2_FORMAT.generation_defaults() == {"max_length": 8192, "top_p": 0.8, "temperature": 0.8, "do_sample": True}
    assert get_prompt_format(1) is V1_FORMAT and get_prompt_format(2) is V2_FORMAT
    with pytest.raises(ValueError):
        get_prompt_format(3)


# -- OpenAI messages --------------------------------------------------------------------------------------------


def _m(role: str, content: object) -> dict[str, object]:
    return {"role": role, "content": content}


def test_messages_single_user() -> None:
    assert messages_to_query_history([_m("user", "你好")]) == ("你好", [])


def test_messages_dialogue_pairs_turns() -> None:
    messages = [_m("user", "q1"), _m("assistant", "r1"), _m("user", "q2"), _m("assistant", "r2"), _m("user", "q3")]
    assert messages_to_query_history(messages) == ("q3", [("q1", "r1"), ("q2", "r2")])


def test_messages_system_is_prepended_to_the_query() -> None:
    messages = [_m("system", "Be brief."), _m("user", "q1"), _m("assistant", "r1"), _m("user", "q2")]
    assert messages_to_query_history(messages) == ("Be brief.\nq2", [("q1", "r1")])


def test_messages_systems_anywhere_are_joined_in_order() -> None:
    messages = [
        _m("system", "s1"),
        _m("user", "q1"),
        _m("system", "s2"),
        _m("assistant", "r1"),
        _m("system", "s3"),
        _m("user", "q2"),
    ]
    assert messages_to_query_history(messages) == ("s1\ns2\ns3\nq2", [("q1", "r1")])


def test_messages_consecutive_users_merge_into_the_next_turn() -> None:
    messages = [_m("user", "a"), _m("user", "b"), _m("assistant", "r"), _m("user", "c"), _m("user", "d")]
    assert messages_to_query_history(messages) == ("c\nd", [("a\nb", "r")])


def test_messages_assistant_without_user_gets_empty_query() -> None:
    messages = [_m("assistant", "Hi, how can I help?"), _m("assistant", "Still here."), _m("user", "q")]
    assert messages_to_query_history(messages) == ("q", [("", "Hi, how can I help?"), ("", "Still here.")])


def test_messages_content_parts_and_none() -> None:
    messages = [
        _m("user", [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]),
        _m("assistant", None),
        _m("user", [{"type": "text", "text": "q"}]),
    ]
    assert messages_to_query_history(messages) == ("q", [("part one\npart two", "")])


def test_messages_accept_attribute_objects() -> None:
    class Message:
        def __init__(self, role: str, content: str) -> None:
            self.role, self.content = role, content

    assert messages_to_query_history([Message("system", "s"), Message("user", "q")]) == ("s\nq", [])


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [_m("user", "q"), _m("assistant", "r")],  # trailing assistant
        [_m("system", "s")],  # no user at all
        [_m("user", "q"), _m("tool", "x"), _m("user", "q")],  # unknown role
        [_m("function", "x"), _m("user", "q")],
        [_m("user", [{"type": "image_url", "image_url": {"url": "x"}}])],  # non-text part
    ],
)
def test_messages_invalid(messages: list[dict[str, object]]) -> None:
    with pytest.raises(ValueError):
        messages_to_query_history(messages)


def test_messages_error_messages_are_clear() -> None:
    with pytest.raises(ValueError, match="last message must have role 'user'"):
        messages_to_query_history([_m("user", "q"), _m("assistant", "r")])
    with pytest.raises(ValueError, match="unsupported message role 'tool'"):
        messages_to_query_history([_m("tool", "x"), _m("user", "q")])
