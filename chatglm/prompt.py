"""Prompt formats of ChatGLM-6B (v1) and ChatGLM2-6B (v2), as plain data and string functions.

Pure Python on purpose (no torch, no transformers): the API server, the demos, the P-tuning data pipeline and the
tokenizers all build prompts from here, so the exact strings live in one place (spec/chat.md).

The colon after 问 / 答 is the full-width `：` (U+FF1A), never ASCII `:`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

History = list[tuple[str, str]]

__all__ = [
    "History",
    "PromptFormat",
    "V1_FORMAT",
    "V2_FORMAT",
    "build_incremental_prompt_v2",
    "build_prompt_v1",
    "build_prompt_v2",
    "get_prompt_format",
    "messages_to_query_history",
    "process_response_v1",
    "process_response_v2",
]

# The model was trained with this placeholder standing for its training date.
_TRAINING_TIME_PLACEHOLDER = "[[训练时间]]"
_TRAINING_TIME = "2023年"

# ASCII mark -> full-width mark, applied by v1 only when the mark touches a CJK character.
_V1_PUNCTUATION = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
# Lookarounds (rather than consuming the neighbour) so that e.g. "中,,文" converts both marks: the first touches
# 中 on its left, the second touches 文 on its right.
_V1_PUNCTUATION_RE = re.compile(r"(?<=[\u4e00-\u9fff])[,!:;?]|[,!:;?](?=[\u4e00-\u9fff])")


def _turns(history: Optional[Sequence[Sequence[str]]]) -> History:
    # Histories arrive as tuples from chat() and as 2-element lists from JSON; normalise both.
    if not history:
        return []
    turns: History = []
    for turn in history:
        if len(turn) != 2:
            raise ValueError(f"each history turn must be a (query, response) pair, got {turn!r}")
        turns.append((turn[0], turn[1]))
    return turns


def build_prompt_v2(query: str, history: Optional[Sequence[Sequence[str]]] = None) -> str:
    """ChatGLM2-6B prompt: 1-based rounds, blank lines between the parts, always with a `[Round N]` header.

    >>> build_prompt_v2("你好")
    '[Round 1]\\n\\n问：你好\\n\\n答：'
    """
    turns = _turns(history)
    parts = [f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(turns, start=1)]
    parts.append(f"[Round {len(turns) + 1}]\n\n问：{query}\n\n答：")
    return "".join(parts)


def build_incremental_prompt_v2(query: str, history: Sequence[Sequence[str]]) -> str:
    """Text appended to an existing KV cache to ask the next question (ChatGLM2 `stream_chat` with past_key_values).

    The cache already holds the previous prompt and the generated answer, so only the turn separator and the new
    round are added: `\\n\\n[Round {n+1}]\\n\\n问：{query}\\n\\n答：` with n = len(history).

    The caller encodes this text WITHOUT special tokens and drops the first token: SentencePiece prepends its dummy
    prefix `▁` to every encoded text, which is not part of the conversation (the full prompt has no space there).
    `ChatGLM2Tokenizer.build_stream_inputs` does exactly that.
    """
    turns = _turns(history)
    if not turns:
        raise ValueError("the incremental prompt continues a conversation; use build_prompt_v2 for an empty history")
    return f"\n\n[Round {len(turns) + 1}]\n\n问：{query}\n\n答："


def build_prompt_v1(query: str, history: Optional[Sequence[Sequence[str]]] = None) -> str:
    """ChatGLM-6B prompt: the bare query when there is no history, else 0-based rounds with single newlines."""
    turns = _turns(history)
    if not turns:
        return query
    parts = [f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(turns)]
    parts.append(f"[Round {len(turns)}]\n问：{query}\n答：")
    return "".join(parts)


def process_response_v2(response: str) -> str:
    """ChatGLM2-6B post-processing: strip and fill in the training-date placeholder."""
    return response.strip().replace(_TRAINING_TIME_PLACEHOLDER, _TRAINING_TIME)


def process_response_v1(response: str) -> str:
    """ChatGLM-6B post-processing: as v2, plus ASCII `,!:;?` become full-width when next to a CJK character."""
    response = process_response_v2(response)
    return _V1_PUNCTUATION_RE.sub(lambda m: _V1_PUNCTUATION[m.group(0)], response)


# --------------------------------------------------------------------------------------------------------------
# OpenAI-style messages
# --------------------------------------------------------------------------------------------------------------


def _field(message: Any, name: str) -> Any:
    # Accept plain dicts and attribute objects (e.g. pydantic request models) alike.
    if isinstance(message, Mapping):
        return message.get(name)
    return getattr(message, name, None)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = _field(part, "type")
            if kind != "text":
                raise ValueError(f"unsupported message content part of type {kind!r}; only text parts are accepted")
            texts.append(_field(part, "text") or "")
        return "\n".join(texts)
    raise ValueError(f"message content must be a string, a list of text parts or None, got {type(content).__name__}")


def messages_to_query_history(messages: Sequence[Any]) -> tuple[str, History]:
    """Turn OpenAI-style chat messages into ChatGLM's `(query, history)`.

    ChatGLM has no system role, so system prompts are folded into the current query: all system messages (any
    number, anywhere in the list) are joined with "\\n" and put in front of the final user message, separated from
    it by "\\n". That is the only place system text goes.

    The other messages are read in order: a user message followed by an assistant message forms one history turn.
    Consecutive user messages are merged (joined with "\\n") into the next user turn, including into the final
    query; an assistant message without a preceding user message becomes a turn with an empty query.

    Content may be a string, a list of `{"type": "text", "text": ...}` parts (joined with "\\n") or None ("").

    Raises ValueError for an empty list, a final message that is not from the user, or a role other than
    system/user/assistant.
    """
    if not messages:
        raise ValueError("messages must not be empty")
    roles = [_field(m, "role") for m in messages]
    for role in roles:
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unsupported message role {role!r}; expected 'system', 'user' or 'assistant'")
    if roles[-1] != "user":
        raise ValueError(f"the last message must have role 'user' (the question to answer), got {roles[-1]!r}")

    system_texts: list[str] = []
    history: History = []
    pending_user: Optional[str] = None
    for message, role in zip(messages[:-1], roles[:-1]):
        text = _content_text(_field(message, "content"))
        if role == "system":
            system_texts.append(text)
        elif role == "user":
            pending_user = text if pending_user is None else f"{pending_user}\n{text}"
        else:
            history.append((pending_user if pending_user is not None else "", text))
            pending_user = None

    query = _content_text(_field(messages[-1], "content"))
    if pending_user is not None:
        query = f"{pending_user}\n{query}"
    if system_texts:
        query = "\n".join(system_texts) + "\n" + query
    return query, history


# --------------------------------------------------------------------------------------------------------------
# Per-version bundles
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """A model generation's prompt builder, response post-processor and chat sampling defaults (spec/chat.md)."""

    version: int
    build_prompt: Callable[[str, Optional[Sequence[Sequence[str]]]], str]
    process_response: Callable[[str], str]
    max_length: int
    top_p: float
    temperature: float
    # Only v2 can continue a conversation from a KV cache.
    build_incremental_prompt: Optional[Callable[[str, Sequence[Sequence[str]]], str]] = None

    def generation_defaults(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "top_p": self.top_p, "temperature": self.temperature, "do_sample": True}


V2_FORMAT = PromptFormat(
    version=2,
    build_prompt=build_prompt_v2,
    process_response=process_response_v2,
    max_length=8192,
    top_p=0.8,
    temperature=0.8,
    build_incremental_prompt=build_incremental_prompt_v2,
)

V1_FORMAT = PromptFormat(
    version=1,
    build_prompt=build_prompt_v1,
    process_response=process_response_v1,
    max_length=2048,
    top_p=0.7,
    temperature=0.95,
)


def get_prompt_format(version: int) -> PromptFormat:
    """The PromptFormat of generation 1 (ChatGLM-6B) or 2 (ChatGLM2-6B)."""
    if version == 1:
        return V1_FORMAT
    if version == 2:
        return V2_FORMAT
    raise ValueError(f"unknown ChatGLM version {version!r}; expected 1 or 2")
