"""P-tuning v2 in the model core, chatglm.ptuning (save / load / errors), and ptuning/main.py end to end."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from conftest import EMBEDDED_MODEL
from finetune_helpers import (
    PTUNING_ROWS,
    copy_base_weights,
    embedded_model,
    embedded_tokenizer,
    sample_ids,
    tiny_model,
    write_jsonl,
)
from safetensors import safe_open

from chatglm import ChatGLMConfig, ChatGLMTokenizer, GLM2ForConditionalGeneration
from chatglm.cli import add_model_arguments, engine_from_args
from chatglm.loading import CheckpointError
from chatglm.modeling_glm import glm_position_ids
from chatglm.modeling_utils import PrefixEncoder
from chatglm.ptuning import (
    PREFIX_KEY,
    enable_prefix_tuning,
    load_lora,
    load_prefix_encoder,
    load_ptuned_model,
    read_prefix_settings,
)
from ptuning.data import (
    IGNORE_INDEX,
    Seq2SeqCollator,
    build_prompt,
    encode_conversation_v2,
    encode_train_v1,
    encode_train_v2,
    preprocess_eval,
)
from ptuning.main import main as ptuning_main
from ptuning.metrics import score_pair, score_texts


def _prefix_keys(model: torch.nn.Module) -> list[str]:
    return sorted(k for k in model.state_dict() if k.startswith(PREFIX_KEY))


def _kv_heads_and_dim(config: ChatGLMConfig) -> tuple[int, int]:
    if config.version == 2:
        return config.multi_query_group_num, config.kv_channels
    return config.num_attention_heads, config.hidden_size // config.num_attention_heads


def _save_prefix(model: torch.nn.Module, folder, **kwargs) -> None:
    # Exactly what PrefixTrainer writes: the trainable parameters only, through save_pretrained.
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(folder, state_dict=trainable, **kwargs)


# ================================================================================================================
# The prefix encoder of the model core, checked against the spec (ptuning_eval.md)
# ================================================================================================================


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_encoder_has_the_original_names_and_shapes(version: int, projection: bool) -> None:
    model = tiny_model(version, pre_seq_len=5, prefix_projection=projection)
    config = model.config
    heads, dim = _kv_heads_and_dim(config)
    kv_size = config.num_layers * 2 * heads * dim
    hidden = config.hidden_size
    shapes = {k[len(PREFIX_KEY):]: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(PREFIX_KEY)}
    if not projection:
        assert shapes == {"embedding.weight": (5, kv_size)}
    else:
        embed = kv_size if version == 2 else hidden
        assert shapes == {
            "embedding.weight": (5, embed),
            "trans.0.weight": (hidden, embed), "trans.0.bias": (hidden,),
            "trans.2.weight": (kv_size, hidden), "trans.2.bias": (kv_size,),
        }
    assert model.transformer.prefix_encoder.dropout.p == 0.1


def test_prefix_sizes_of_the_real_models() -> None:
    # spec table: 28·128·2·2 = 14336 per prefix token for ChatGLM2-6B, 28·4096·2 = 229376 for ChatGLM-6B.
    with torch.device("meta"):
        v2 = PrefixEncoder(ChatGLMConfig(pre_seq_len=128))
        v1 = PrefixEncoder(ChatGLMConfig(version=1, pre_seq_len=128))
        v2_projected = PrefixEncoder(ChatGLMConfig(pre_seq_len=128, prefix_projection=True))
    assert tuple(v2.embedding.weight.shape) == (128, 14336)
    assert tuple(v1.embedding.weight.shape) == (128, 229376)
    assert tuple(v2_projected.trans[0].weight.shape) == (4096, 14336)
    assert tuple(v2_projected.trans[2].weight.shape) == (14336, 4096)


@pytest.mark.parametrize("version", [1, 2])
def test_only_the_prefix_encoder_is_trainable(version: int) -> None:
    model = tiny_model(version, pre_seq_len=3, prefix_projection=True)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == _prefix_keys(model)


@pytest.mark.parametrize("version", [1, 2])
def test_prefix_key_value_layout_matches_the_original_reshape(version: int) -> None:
    model = tiny_model(version, pre_seq_len=3)
    encoder = model.transformer.prefix_encoder.eval()
    config = model.config
    heads, dim = _kv_heads_and_dim(config)
    batch = 2
    # The original: embedding(prefix_tokens) [b, pre, kv] -> view [b, pre, 2·layers, heads, d] -> permute to
    # [2·layers, pre, b, heads, d] -> split(2): per layer (key, value), sequence-first.
    raw = encoder.embedding.weight.detach().unsqueeze(0).expand(batch, -1, -1)
    reference = raw.reshape(batch, 3, 2 * config.num_layers, heads, dim).permute(2, 1, 0, 3, 4).split(2)
    layers = encoder(batch, torch.float32)
    assert len(layers) == config.num_layers
    for (key, value), ref in zip(layers, reference):
        assert key.shape == (batch, heads, 3, dim)  # 2 K/V groups for ChatGLM2, every head for ChatGLM-6B
        torch.testing.assert_close(key.permute(2, 0, 1, 3), ref[0], rtol=0, atol=0)
        torch.testing.assert_close(value.permute(2, 0, 1, 3), ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_prefix_keys_are_not_rotated_and_token_positions_do_not_shift(version: int) -> None:
    model = tiny_model(version, pre_seq_len=3)
    base = tiny_model(version, seed=1)
    copy_base_weights(model, base)
    ids = sample_ids(version, model.config)
    cache = model(ids, use_cache=True).past_key_values
    expected = model.transformer.prefix_encoder(1, torch.float32)
    for layer, (key, value) in enumerate(expected):
        torch.testing.assert_close(cache.layers[layer].keys[:, :, :3], key, rtol=0, atol=0)
        torch.testing.assert_close(cache.layers[layer].values[:, :, :3], value, rtol=0, atol=0)
    # The first layer's token keys depend only on the tokens and their positions: identical to the base model's,
    # so the tokens are still numbered from 0 (the prefix takes no positions).
    base_cache = base(ids, use_cache=True).past_key_values
    torch.testing.assert_close(cache.layers[0].keys[:, :, 3:], base_cache.layers[0].keys)
    # ... while the prefix does change what the model computes.
    assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_incremental_decoding_with_a_prefix_equals_the_full_forward(version: int) -> None:
    model = tiny_model(version, pre_seq_len=3)
    ids = sample_ids(version, model.config, length=7)
    full = model(ids).logits[:, -1]
    first = model(ids[:, :-1], use_cache=True)
    position_ids = None
    if version == 1:
        position_ids = glm_position_ids(ids, None, model.config)[..., -1:]
    step = model(ids[:, -1:], position_ids=position_ids, past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full)
    assert model.past_length(step.past_key_values) == ids.shape[1]  # the prefix is not counted


@pytest.mark.parametrize("version", [1, 2])
def test_left_padded_batch_with_a_prefix_matches_single_rows(version: int) -> None:
    model = tiny_model(version, pre_seq_len=3)
    config = model.config
    long = sample_ids(version, config, length=8)[0].tolist()
    short = sample_ids(version, config, length=5)[0].tolist()
    pad = config.pad_token_id
    ids = torch.tensor([[pad] * (len(long) - len(short)) + short, long])
    mask = torch.tensor([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
    batched = model(**model.prepare_inputs_for_generation(ids, attention_mask=mask, use_cache=False)).logits[:, -1]
    for row, single in enumerate((short, long)):
        alone = torch.tensor([single])
        expected = model(**model.prepare_inputs_for_generation(alone, attention_mask=torch.ones_like(alone))).logits
        torch.testing.assert_close(batched[row], expected[0, -1], rtol=1e-4, atol=1e-5)


def test_prefix_dropout_is_active_only_in_training() -> None:
    model = tiny_model(2, pre_seq_len=4)
    encoder = model.transformer.prefix_encoder
    encoder.train()
    torch.manual_seed(0)
    a = encoder(1, torch.float32)[0][0]
    b = encoder(1, torch.float32)[0][0]
    assert not torch.equal(a, b)
    zeros = (a == 0).float().mean().item()
    assert 0.02 < zeros < 0.3  # about 10% dropped
    encoder.eval()
    torch.testing.assert_close(encoder(1, torch.float32)[0][0], encoder(1, torch.float32)[0][0], rtol=0, atol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_gradient_checkpointing_with_a_prefix_gives_the_same_gradients(version: int) -> None:
    # A KV cache would be appended to twice when checkpointing re-runs a layer; training runs without one.
    model = tiny_model(version, pre_seq_len=3).train()
    ids = sample_ids(version, model.config)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        torch.manual_seed(0)  # the same prefix dropout mask both times
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append(model.transformer.prefix_encoder.embedding.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


def test_half_precision_base_with_an_fp32_prefix() -> None:
    model = tiny_model(2).to(torch.bfloat16)
    enable_prefix_tuning(model, 4)
    assert all(p.dtype == torch.float32 for p in model.transformer.prefix_encoder.parameters())
    assert model.transformer.embedding.word_embeddings.weight.dtype == torch.bfloat16
    ids = sample_ids(2, model.config)
    out = model(ids, labels=ids, use_cache=True)
    assert out.past_key_values.layers[0].keys.dtype == torch.bfloat16  # the prefix is cast to the base dtype
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    grad = model.transformer.prefix_encoder.embedding.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(PREFIX_KEY))


def _train_steps(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, steps: int, lr: float) -> tuple[float, float]:
    """(loss before, loss after) `steps` AdamW steps on one batch; losses measured in eval mode (no dropout)."""
    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(ids, labels=labels, use_cache=False).loss)

    before = loss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids, labels=labels, use_cache=False).loss.backward()
        optimizer.step()
    return before, loss()


@pytest.mark.parametrize("bits", [4, 8])
def test_ptuning_a_quantized_base_trains_only_the_prefix(bits: int) -> None:
    try:
        from chatglm.quantization import quantize_model
    except ImportError:
        pytest.skip("chatglm.quantization.quantize_model is not available")
    model = tiny_model(2)
    quantize_model(model, bits)
    enable_prefix_tuning(model, 4)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith(PREFIX_KEY))
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    before, after = _train_steps(model, ids, ids, steps=8, lr=5e-2)
    assert after < before
    for key, value in model.state_dict().items():
        if key.startswith(PREFIX_KEY):
            assert not torch.equal(value, snapshot[key]), key
        else:
            assert torch.equal(value, snapshot[key]), key
    assert model.transformer.encoder.layers[0].self_attention.query_key_value.weight.dtype == torch.int8


# ================================================================================================================
# Saving and loading a prefix (chatglm.ptuning)
# ================================================================================================================


def _demo_batch(tokenizer: ChatGLMTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [encode_train_v2(tokenizer, build_prompt(2, r["prompt"], r["history"]), r["response"], 48, 24,
                            pad_to_max_length=False) for r in PTUNING_ROWS]
    batch = Seq2SeqCollator(tokenizer.pad_token_id)([{"input_ids": i, "labels": lab} for i, lab in rows])
    return batch["input_ids"], batch["labels"]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_steps_lower_the_loss_and_change_only_the_prefix(version: int, projection: bool) -> None:
    torch.manual_seed(0)
    model = tiny_model(version, pre_seq_len=4, prefix_projection=projection)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    ids = sample_ids(version, model.config, length=9)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    before, after = _train_steps(model, ids, labels, steps=8, lr=2e-2)
    assert after < before - 0.05
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])}
    assert changed == set(_prefix_keys(model))


def test_ptuning_the_demo_model_and_reloading_the_saved_prefix_gives_the_same_outputs(tmp_path) -> None:
    tokenizer = embedded_tokenizer()
    model = embedded_model()
    base_logits = model(torch.tensor([[2001, 2003, 100, 101]])).logits
    torch.manual_seed(0)
    enable_prefix_tuning(model, 8)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    ids, labels = _demo_batch(tokenizer)
    before, after = _train_steps(model, ids, labels, steps=10, lr=5e-2)
    assert after < before
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])}
    assert changed == set(_prefix_keys(model))

    _save_prefix(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == [PREFIX_KEY + "embedding.weight"]
    assert read_prefix_settings(tmp_path / "ckpt") == (8, False)

    reloaded, _ = load_ptuned_model(str(EMBEDDED_MODEL), tmp_path / "ckpt", dtype=torch.float32)
    assert reloaded.config.pre_seq_len == 8 and not reloaded.training
    probe = torch.tensor([[2001, 2003, 100, 101]])
    model.eval()
    torch.testing.assert_close(reloaded(probe).logits, model(probe).logits, rtol=0, atol=0)
    assert not torch.allclose(reloaded(probe).logits, base_logits, atol=1e-3)
    assert reloaded.chat(tokenizer, "你好", do_sample=False, max_new_tokens=12)[0] == \
        model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=12)[0]


def test_original_pytorch_model_bin_checkpoints_load(tmp_path) -> None:
    model = tiny_model(2, pre_seq_len=4)
    _save_prefix(model, tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").is_file()
    other = tiny_model(2, seed=3, pre_seq_len=4)
    load_prefix_encoder(other, tmp_path)
    torch.testing.assert_close(other.transformer.prefix_encoder.embedding.weight,
                               model.transformer.prefix_encoder.embedding.weight, rtol=0, atol=0)


def test_a_mismatched_prefix_is_a_clear_error(tmp_path) -> None:
    model = tiny_model(2, pre_seq_len=4)
    _save_prefix(model, tmp_path)
    weights = str(tmp_path / "model.safetensors")

    longer = tiny_model(2, pre_seq_len=8)
    with pytest.raises(CheckpointError) as error:
        load_prefix_encoder(longer, tmp_path)
    message = str(error.value)
    assert weights in message and "pre_seq_len=4" in message and "pre_seq_len=8" in message
    assert "--pre_seq_len 4" in message

    projected = tiny_model(2, pre_seq_len=4, prefix_projection=True)
    with pytest.raises(CheckpointError, match="prefix_projection=False.*prefix_projection=True"):
        load_prefix_encoder(projected, tmp_path)

    with pytest.raises(CheckpointError, match="has no prefix encoder: load it with pre_seq_len=4"):
        load_prefix_encoder(tiny_model(2), tmp_path)

    deeper = tiny_model(2, pre_seq_len=4, num_layers=3)
    with pytest.raises(CheckpointError, match="different base model"):
        load_prefix_encoder(deeper, tmp_path)

    full = tmp_path / "full"
    tiny_model(2).save_pretrained(full)
    with pytest.raises(CheckpointError, match="not a P-tuning v2 checkpoint"):
        load_prefix_encoder(model, full)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_prefix_encoder(model, tmp_path / "missing")


def test_cli_options_load_a_ptuning_checkpoint(tmp_path) -> None:
    model = embedded_model()
    enable_prefix_tuning(model, 4)
    _save_prefix(model, tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    common = ["--model", str(EMBEDDED_MODEL), "--dtype", "float32", "--ptuning_checkpoint", str(tmp_path / "ckpt")]

    engine = engine_from_args(parser.parse_args(common + ["--pre_seq_len", "4"]), announce=False)
    assert engine.model.config.pre_seq_len == 4
    torch.testing.assert_close(engine.model.transformer.prefix_encoder.embedding.weight,
                               model.transformer.prefix_encoder.embedding.weight, rtol=0, atol=0)
    assert isinstance(engine.chat("你好", do_sample=False, max_new_tokens=4)[0], str)
    # Without --pre_seq_len the value is read from the checkpoint.
    assert engine_from_args(parser.parse_args(common), announce=False).model.config.pre_seq_len == 4
    with pytest.raises(CheckpointError, match="pre_seq_len=4"):
        engine_from_args(parser.parse_args(common + ["--pre-seq-len", "16"]), announce=False)
    with pytest.raises(SystemExit):
        engine_from_args(parser.parse_args(["--model", str(EMBEDDED_MODEL), "--pre_seq_len", "4"]), announce=False)


# ================================================================================================================
# Data pipeline and metrics of ptuning/main.py
# ================================================================================================================


def test_v2_training_example_layout() -> None:
    tokenizer = embedded_tokenizer()
    prompt = build_prompt(2, "你好", [["hi", "hello"]])
    assert prompt == "[Round 1]\n\n问：hi\n\n答：hello\n\n[Round 2]\n\n问：你好\n\n答："
    ids, labels = encode_train_v2(tokenizer, prompt, "你好呀", 64, 16)
    a = tokenizer.encode(prompt)
    b = tokenizer.encode("你好呀", add_special_tokens=False)
    assert a[:2] == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    n = len(a) + len(b) + 1
    assert len(ids) == len(labels) == 64 + 16 + 1
    assert ids == a + b + [2] + [0] * (81 - n)
    assert labels == [IGNORE_INDEX] * len(a) + b + [2] + [IGNORE_INDEX] * (81 - n)
    unpadded, unpadded_labels = encode_train_v2(tokenizer, prompt, "你好呀", 64, 16, pad_to_max_length=False)
    assert unpadded == ids[:n] and unpadded_labels == labels[:n]
    # Without ignore_pad_token_for_loss the original trains on pad ids (prompt and padding alike).
    _, raw_labels = encode_train_v2(tokenizer, prompt, "你好呀", 64, 16, ignore_pad=False)
    assert raw_labels == [0] * len(a) + b + [2] + [0] * (81 - n)


def test_history_loss_learns_every_answer_with_the_chat_token_boundaries() -> None:
    tokenizer = embedded_tokenizer()
    turns = [("你好", "嗨！"), ("hello", "Hi!"), ("谢谢", "不客气！")]
    ids, labels = encode_conversation_v2(tokenizer, turns, 256, 64)
    # Exactly the tokens a chat feeds: the first prompt whole, later rounds as stream_chat appends them.
    expected = tokenizer.build_chat_input("你好")["input_ids"][0].tolist()
    answers = []
    for i, (query, answer) in enumerate(turns):
        if i:
            expected += tokenizer.build_stream_inputs(query, turns[:i])["input_ids"][0].tolist()
        answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        answers.append(answer_ids)
        expected += answer_ids
    assert ids == expected + [2]
    learned = [t for t in labels if t != IGNORE_INDEX]
    assert learned == answers[0] + answers[1] + answers[2] + [2]
    # Too long: the oldest rounds go, the last one stays.
    short_ids, _ = encode_conversation_v2(tokenizer, turns, 20, 5)
    assert len(short_ids) <= 26 and short_ids[:2] == expected[:2]
    assert tokenizer.decode(short_ids).rstrip().endswith("不客气！")


def test_v1_training_example_layout(ice_text_model) -> None:
    tokenizer = ChatGLMTokenizer(str(ice_text_model), num_image_tokens=0)
    ids, labels = encode_train_v1(tokenizer, "你好", "你好！", 16, 8)
    a = tokenizer.encode("你好", add_special_tokens=False)
    b = tokenizer.encode("你好！", add_special_tokens=False)
    body = a + [130001, 130004] + b + [130005]
    assert ids == body + [3] * (24 - len(body))
    assert labels == [IGNORE_INDEX] * (len(a) + 1) + [130004] + b + [130005] + [IGNORE_INDEX] * (24 - len(body))
    assert build_prompt(1, "你好", None) == "你好"
    assert build_prompt(1, "再见", [["你好", "嗨"]]) == "[Round 0]\n问：你好\n答：嗨\n[Round 1]\n问：再见\n答："


def test_evaluation_rows_are_left_padded_prompts_with_response_labels() -> None:
    tokenizer = embedded_tokenizer()
    args = argparse.Namespace(prompt_column="q", response_column="a", history_column=None, source_prefix="",
                              max_source_length=64, val_max_target_length=16, ignore_pad_token_for_loss=True)
    out = preprocess_eval({"q": ["你好", "hello there", ""], "a": ["嗨", "hi", "skipped"]}, tokenizer, args, 2)
    assert len(out["input_ids"]) == 2  # the row with an empty prompt is skipped
    first = tokenizer.encode(build_prompt(2, "你好", None))
    width = len(out["input_ids"][1])
    assert out["input_ids"][0] == [0] * (width - len(first)) + first
    assert out["attention_mask"][0] == [0] * (width - len(first)) + [1] * len(first)
    assert tokenizer.decode(out["labels"][1], skip_special_tokens=True) == "hi"


def test_collator_pads_training_rows_right_and_generation_rows_left() -> None:
    collate = Seq2SeqCollator(pad_token_id=0)
    train = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert train["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert train["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    gen = collate([{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [9]},
                   {"input_ids": [5], "attention_mask": [1], "labels": [8, 9]}])
    assert gen["input_ids"].tolist() == [[5, 6], [0, 5]]
    assert gen["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert gen["labels"].tolist() == [[-100, 9], [8, 9]]


def test_metrics() -> None:
    perfect = score_pair("今天天气很好。", "今天天气很好。")
    assert perfect == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    assert score_pair("", "今天天气很好。") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    partial = score_pair("今天天气不错", "今天天气很好")
    assert 0 < partial["rouge-1"] < 100 and 0 < partial["bleu-4"] < 100
    mean = score_texts(["今天天气很好。", ""], ["今天天气很好。", "今天天气很好。"])
    assert mean["rouge-1"] == pytest.approx(50.0) and mean["bleu-4"] == pytest.approx(50.0)


# ================================================================================================================
# ptuning/main.py end to end on the embedded model
# ================================================================================================================


def _main_args(tmp_path, *extra: str) -> list[str]:
    data = write_jsonl(tmp_path / "data.json", PTUNING_ROWS)
    return [
        "--model_name_or_path", str(EMBEDDED_MODEL),
        "--train_file", str(data), "--test_file", str(data),
        "--prompt_column", "prompt", "--response_column", "response", "--history_column", "history",
        "--output_dir", str(tmp_path / "out"), "--overwrite_output_dir",
        "--cache_dir", str(tmp_path / "cache"),
        "--max_source_length", "48", "--max_target_length", "24",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "1",
        "--logging_steps", "1", "--report_to", "none", "--seed", "0", "--disable_tqdm", "True",
        *extra,
    ]


def test_main_ptuning_saves_only_the_prefix_and_predicts(tmp_path) -> None:
    results = ptuning_main(_main_args(
        tmp_path, "--do_train", "--do_predict", "--predict_with_generate", "--do_sample", "False",
        "--pre_seq_len", "4", "--learning_rate", "2e-2", "--max_steps", "4", "--save_steps", "2",
    ))
    out = tmp_path / "out"
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            assert sorted(handle.keys()) == [PREFIX_KEY + "embedding.weight"]
        assert json.loads((folder / "config.json").read_text())["pre_seq_len"] == 4
        assert (folder / "tokenizer.model").is_file()
    assert math.isfinite(results["train_loss"])

    metrics = json.loads((out / "predict_results.json").read_text())
    assert {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4"} <= set(metrics)
    lines = [json.loads(line) for line in (out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()]
    assert [line["labels"] for line in lines] == [row["response"] for row in PTUNING_ROWS]

    # The saved prefix on a freshly loaded base reproduces the predictions (greedy, same dtype as training used).
    model, tokenizer = load_ptuned_model(str(EMBEDDED_MODEL), out / "checkpoint-4", pre_seq_len=4,
                                         dtype=torch.bfloat16)
    for row, line in zip(PTUNING_ROWS, lines):
        answer, _ = model.chat(tokenizer, row["prompt"], row["history"] or [], do_sample=False, max_new_tokens=24)
        assert answer == line["predict"]


def test_main_full_finetuning_lowers_the_loss_and_saves_every_weight(tmp_path) -> None:
    ptuning_main(_main_args(tmp_path, "--do_train", "--learning_rate", "1e-3", "--max_steps", "6",
                            "--save_strategy", "no"))
    out = tmp_path / "out"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("transformer.output_layer.weight").dtype == torch.float32
    assert keys == set(embedded_model().state_dict()) - {"transformer.rotary_pos_emb.inv_freq"} or \
        keys == set(embedded_model().state_dict())
    tuned = GLM2ForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    probe = torch.tensor([[2001, 2003, 100, 101]])
    assert not torch.allclose(tuned(probe).logits, embedded_model()(probe).logits, atol=1e-4)


def test_main_lora_trains_an_adapter_on_query_key_value(tmp_path) -> None:
    ptuning_main(_main_args(tmp_path, "--do_train", "--lora_rank", "4", "--learning_rate", "1e-2",
                            "--max_steps", "3", "--save_strategy", "no"))
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"query_key_value"}
    merged = load_lora(embedded_model(), out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    probe = torch.tensor([[2001, 2003, 100, 101]])
    assert not torch.allclose(merged(probe).logits, embedded_model()(probe).logits, atol=1e-5)


def test_main_rejects_quantized_full_finetuning(tmp_path) -> None:
    with pytest.raises(ValueError, match="quantization_bit needs --pre_seq_len"):
        ptuning_main(_main_args(tmp_path, "--do_train", "--quantization_bit", "4", "--max_steps", "1"))
