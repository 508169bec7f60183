"""model.chat / model.stream_chat: prompt formats, one streaming core, UTF-8-safe streaming, KV reuse."""

from __future__ import annotations

import pytest
import torch
from conftest import EMBEDDED_MODEL, randomize, tiny_v1_config, tiny_v2_config
from transformers import LogitsProcessor

from chatglm import ChatGLMTokenizer, Conversation, ChatEngine, GLM2ForConditionalGeneration, GLMForConditionalGeneration
from chatglm.generation import InvalidScoreLogitsProcessor, SamplingParams, generate


class ForceTokens(LogitsProcessor):
    """Make the model emit a fixed token sequence, whatever its weights say."""

    def __init__(self, prompt_length: int, tokens: list[int]) -> None:
        self.prompt_length = prompt_length
        self.tokens = tokens

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[min(step, len(self.tokens) - 1)]] = 0.0
        return forced


@pytest.fixture(scope="module")
def v2_tokenizer():
    return ChatGLMTokenizer.from_pretrained(str(EMBEDDED_MODEL))


@pytest.fixture
def v2_model(v2_tokenizer):
    config = tiny_v2_config(padded_vocab_size=-(-len(v2_tokenizer) // 64) * 64)
    return randomize(GLM2ForConditionalGeneration(config), std=0.1).eval()


@pytest.fixture(scope="module")
def v1_tokenizer(request):
    from conftest import ICE_TEXT_MODEL

    if not ICE_TEXT_MODEL.is_file():
        pytest.skip(f"the real chatglm-6b tokenizer is not at {ICE_TEXT_MODEL}")
    # The published tokenizer_config.json sets num_image_tokens 0 (the class default 20000 is pre-2023-04).
    return ChatGLMTokenizer.from_pretrained(str(ICE_TEXT_MODEL), num_image_tokens=0)


@pytest.fixture
def v1_model():
    # The real ChatGLM-6B vocabulary and special ids, at a tiny width.
    config = tiny_v1_config(
        vocab_size=130528, mask_token_id=130000, gmask_token_id=130001, bos_token_id=130004, eos_token_id=130005,
        hidden_size=32, inner_hidden_size=64,
    )
    return randomize(GLMForConditionalGeneration(config), std=0.1).eval()


def test_v2_prompt_strings_match_the_original_format(v2_tokenizer):
    history = [("你好", "你好👋！"), ("What is 1+1?", "2")]
    assert v2_tokenizer.build_prompt("再见", history) == (
        "[Round 1]\n\n问：你好\n\n答：你好👋！\n\n[Round 2]\n\n问：What is 1+1?\n\n答：2\n\n[Round 3]\n\n问：再见\n\n答："
    )
    ids = v2_tokenizer.build_chat_input("再见", history)["input_ids"][0].tolist()
    assert ids[:2] == [v2_tokenizer.get_command("[gMASK]"), v2_tokenizer.get_command("sop")]
    assert v2_tokenizer.decode(ids) == v2_tokenizer.build_prompt("再见", history)


def test_v1_chat_input_reproduces_the_published_token_ids(v1_tokenizer):
    history = [("你好", "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。")]
    ids = v1_tokenizer.build_chat_input("晚上睡不着应该怎么办", history)["input_ids"][0].tolist()
    assert ids == [
        53, 6945, 5, 8, 42, 4, 64286, 12, 74874, 4, 67342, 12, 74874, 130328, 130247, 130233, 130227, 35, 65806,
        68241, 75890, 14132, 5388, 340, 11, 21, 222, 6, 76693, 66877, 63852, 6, 66430, 68747, 102501, 63823, 4, 52,
        6945, 5, 9, 42, 4, 64286, 12, 65450, 83400, 64213, 66846, 4, 67342, 12, 130001, 130004,
    ]


@pytest.mark.parametrize("version", [1, 2])
def test_chat_is_stream_chat_run_to_the_end(version, v1_model, v1_tokenizer, v2_model, v2_tokenizer):
    model, tokenizer = (v1_model, v1_tokenizer) if version == 1 else (v2_model, v2_tokenizer)
    history = [("hi", "hello")]
    streamed = list(model.stream_chat(tokenizer, "你好", history, max_length=80, do_sample=False))
    response, new_history = model.chat(tokenizer, "你好", history, max_length=80, do_sample=False)
    assert streamed[-1] == (response, new_history)
    assert new_history == history + [("你好", response)]
    assert all(not text.endswith("\ufffd") for text, _ in streamed)


def test_streamed_text_never_ends_inside_a_utf8_character(v2_model, v2_tokenizer):
    # "你" and "好" as single bytes each (byte-fallback pieces), then EOS.
    byte_ids = v2_tokenizer.convert_tokens_to_ids(["<0xE4>", "<0xBD>", "<0xA0>", "<0xE5>", "<0xA5>", "<0xBD>"])
    prompt_length = v2_tokenizer.build_chat_input("x", [])["input_ids"].shape[1]
    force = ForceTokens(prompt_length, byte_ids + [v2_tokenizer.eos_token_id])
    stream = v2_model.stream_chat(v2_tokenizer, "x", [], max_length=prompt_length + 20, logits_processor=[force])
    yields = [text for text, _ in stream]
    assert yields == ["你", "你好"]


def test_length_limit_cutting_a_character_drops_the_dangling_bytes(v2_model, v2_tokenizer):
    byte_ids = v2_tokenizer.convert_tokens_to_ids(["<0xE4>", "<0xBD>", "<0xA0>", "<0xE5>", "<0xA5>"])
    prompt_length = v2_tokenizer.build_chat_input("x", [])["input_ids"].shape[1]
    force = ForceTokens(prompt_length, byte_ids)
    response, _ = v2_model.chat(v2_tokenizer, "x", [], max_length=prompt_length + 5, logits_processor=[force])
    assert response == "你"


def test_v2_kv_cache_reuse_across_turns_equals_re_running_the_whole_sequence(v2_model, v2_tokenizer):
    greedy = SamplingParams(do_sample=False)
    first_ids = v2_tokenizer.build_chat_input("你好", [])["input_ids"]
    *_, (response, history, cache) = v2_model.stream_chat(
        v2_tokenizer, "你好", [], max_length=first_ids.shape[1] + 6, do_sample=False, return_past_key_values=True
    )
    first_answer = generate(v2_model, first_ids, params=greedy, max_new_tokens=6)[0].tolist()
    assert cache.get_seq_length() == first_ids.shape[1] + len(first_answer)

    second_ids = v2_tokenizer.build_stream_inputs("再见", history)["input_ids"]
    whole = torch.cat([first_ids, torch.tensor([first_answer]), second_ids], dim=1)
    expected = generate(v2_model, whole, params=greedy, max_new_tokens=8)[0].tolist()
    *_, (second_response, _, cache) = v2_model.stream_chat(
        v2_tokenizer, "再见", history, past_key_values=cache, max_length=whole.shape[1] + 8, do_sample=False,
        return_past_key_values=True,
    )
    eos = v2_model.config.eos_token_id
    expected_text = v2_tokenizer.decode([t for t in expected if t != eos])
    assert second_response == expected_text.strip()


def test_v1_refuses_kv_reuse_with_a_clear_message(v1_model, v1_tokenizer):
    with pytest.raises(ValueError, match="ChatGLM2 feature"):
        list(v1_model.stream_chat(v1_tokenizer, "你好", [], return_past_key_values=True))


def test_nan_logits_are_replaced_by_the_guard_token():
    scores = torch.tensor([[0.0, float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    guarded = InvalidScoreLogitsProcessor()(torch.zeros(1, 1, dtype=torch.long), scores)
    assert int(guarded.argmax()) == 5 and torch.isfinite(guarded).all()


def test_chat_defaults_follow_the_version(v1_model, v2_model):
    assert v2_model._chat_defaults(None, None, None) == {"max_length": 8192, "top_p": 0.8, "temperature": 0.8}
    assert v1_model._chat_defaults(None, None, None) == {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}


def test_unknown_generation_argument_is_rejected_by_name(v2_model, v2_tokenizer):
    with pytest.raises(TypeError, match="num_beam"):
        v2_model.chat(v2_tokenizer, "hi", num_beam=2)


def test_sampling_with_a_seeded_generator_is_reproducible(v2_model, v2_tokenizer):
    runs = [
        v2_model.chat(v2_tokenizer, "hi", max_length=40, generator=torch.Generator().manual_seed(7))[0] for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_engine_conversation_keeps_history_and_cache_and_stopping_keeps_partial_answer():
    engine = ChatEngine.from_pretrained(str(EMBEDDED_MODEL))
    conversation = Conversation()
    first = "".join(engine.stream_reply(conversation, "你好", max_length=48, do_sample=False))
    assert conversation.history == [("你好", first)]
    assert conversation.past_key_values is not None
    reply = engine.stream_reply(conversation, "hello", max_length=400, do_sample=False)
    partial = next(reply) + next(reply)
    reply.close()
    assert conversation.history[-1][0] == "hello" and conversation.history[-1][1].startswith(partial)
    assert conversation.past_key_values is None  # re-encoded next turn
    assert not engine.lock.locked()


def test_engine_completion_honours_stop_strings_and_lengths():
    engine = ChatEngine.from_pretrained(str(EMBEDDED_MODEL))
    full = engine.complete([{"role": "user", "content": "hi"}], max_new_tokens=12, temperature=0)
    assert full.finish_reason in ("stop", "length") and full.completion_tokens <= 12
    if len(full.text) > 3:
        stop = full.text[2:4]
        cut = engine.complete([{"role": "user", "content": "hi"}], max_new_tokens=12, temperature=0, stop=[stop])
        assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"


def test_vanishing_temperature_means_greedy_not_overflow():
    scores = torch.tensor([[0.5, 2.0, -1.0]])
    from chatglm.generation import sample_next_token

    assert int(sample_next_token(scores, SamplingParams(temperature=5e-324, top_p=1e-100))) == 1


def test_ignore_eos_runs_to_the_length_limit(v2_model, v2_tokenizer, monkeypatch):
    prompt_length = v2_tokenizer.build_chat_input("x", [])["input_ids"].shape[1]
    force_eos = ForceTokens(prompt_length, [v2_tokenizer.convert_tokens_to_ids("<0x41>"), v2_tokenizer.eos_token_id])

    def cached_tokens() -> int:
        *_, (_, _, cache) = v2_model.stream_chat(
            v2_tokenizer, "x", [], max_length=prompt_length + 6, logits_processor=[force_eos], return_past_key_values=True
        )
        return cache.get_seq_length() - prompt_length

    assert cached_tokens() == 1  # "A", then EOS ends the answer
    monkeypatch.setenv("CHATGLM_IGNORE_EOS", "1")
    assert cached_tokens() == 6  # EOS is just another token up to the length limit
