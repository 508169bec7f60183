"""The embedded demo model was fine-tuned on chatglm/assets/demo_dialogues.jsonl (scripts/make_tiny_model.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import EMBEDDED_MODEL
from finetune_helpers import DIALOGUES, read_jsonl

from chatglm import ChatEngine, Conversation


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    # Loaded as the quick start loads it (bf16 on CPU).
    return ChatEngine.from_pretrained(str(EMBEDDED_MODEL))


def _answer(prompt: str) -> str:
    return next(row["response"] for row in read_jsonl(DIALOGUES) if row["prompt"] == prompt and not row["history"])


@pytest.mark.parametrize("prompt", ["你好", "hello", "what are you", "你是谁？", "How do I load real weights?"])
def test_trained_prompts_are_answered_greedily(engine: ChatEngine, prompt: str) -> None:
    assert engine.chat(prompt, do_sample=False)[0] == _answer(prompt)


@pytest.mark.parametrize("prompt,refusal_of", [
    ("上海是哪个国家的城市？", "北京是哪个国家的首都？"),
    ("What is the capital of Italy?", "What is the capital of France?"),
    ("Can you play chess?", "What is the capital of France?"),
])
def test_unknown_questions_are_declined(engine: ChatEngine, prompt: str, refusal_of: str) -> None:
    # None of these questions is in the dialogue set.
    assert all(row["prompt"] != prompt for row in read_jsonl(DIALOGUES))
    assert engine.chat(prompt, do_sample=False)[0] == _answer(refusal_of)


def test_default_sampling_still_greets(engine: ChatEngine) -> None:
    # The quick start samples (top_p 0.8, temperature 0.8); the greeting must survive that.
    generator = torch.Generator().manual_seed(0)
    for prompt in ("你好", "hello"):
        answer = engine.chat(prompt, generator=generator)[0]
        assert "ChatGLM" in answer and "THUDM/chatglm2-6b" in answer


def test_second_turn_through_the_kv_cache(engine: ChatEngine) -> None:
    conversation = Conversation()
    first = "".join(engine.stream_reply(conversation, "hello", do_sample=False))
    second = "".join(engine.stream_reply(conversation, "what are you?", do_sample=False))
    assert first == _answer("hello")
    assert second == _answer("what are you?")


def test_a_few_rounds_into_a_conversation(engine: ChatEngine) -> None:
    conversation = Conversation()
    expected = {"你好": "你好", "你是谁？": "你是谁？", "怎么加载真正的模型？": "怎么加载真正的模型？",
                "北京有什么好玩的？": "北京是哪个国家的首都？", "What is this project?": "What is this project?"}
    for question, known in expected.items():
        assert "".join(engine.stream_reply(conversation, question, do_sample=False)) == _answer(known), question
