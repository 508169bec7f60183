"""The model math of both generations: cache equivalence, padding, shapes of the real checkpoints, losses."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FIXTURES, randomize, tiny_v1_config, tiny_v2_config

from chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, GLM2ForConditionalGeneration, GLMForConditionalGeneration
from chatglm.generation import SamplingParams, generate
from chatglm.layers import apply_rotary_half, apply_rotary_interleaved, rotary_cos_sin, rotary_inv_freq
from chatglm.modeling_glm import glm_position_ids

GREEDY = SamplingParams(do_sample=False)


def v1_prompt(body: list[int], config: ChatGLMConfig) -> list[int]:
    return body + [config.gmask_token_id, config.bos_token_id]


# -- the real checkpoints' tables (spec/checkpoints.md), written out independently of the model code ---------


def chatglm2_6b_table() -> dict[str, tuple[int, ...]]:
    table = {
        "transformer.embedding.word_embeddings.weight": (65024, 4096),
        "transformer.rotary_pos_emb.inv_freq": (32,),
        "transformer.encoder.final_layernorm.weight": (4096,),
        "transformer.output_layer.weight": (65024, 4096),
    }
    for i in range(28):
        p = f"transformer.encoder.layers.{i}."
        table.update({
            p + "input_layernorm.weight": (4096,),
            p + "self_attention.query_key_value.weight": (4608, 4096),
            p + "self_attention.query_key_value.bias": (4608,),
            p + "self_attention.dense.weight": (4096, 4096),
            p + "post_attention_layernorm.weight": (4096,),
            p + "mlp.dense_h_to_4h.weight": (27392, 4096),
            p + "mlp.dense_4h_to_h.weight": (4096, 13696),
        })
    return table


def chatglm_6b_table() -> dict[str, tuple[int, ...]]:
    table = {
        "transformer.word_embeddings.weight": (130528, 4096),
        "transformer.final_layernorm.weight": (4096,),
        "transformer.final_layernorm.bias": (4096,),
        "lm_head.weight": (130528, 4096),
    }
    for i in range(28):
        p = f"transformer.layers.{i}."
        table.update({
            p + "input_layernorm.weight": (4096,),
            p + "input_layernorm.bias": (4096,),
            p + "attention.query_key_value.weight": (12288, 4096),
            p + "attention.query_key_value.bias": (12288,),
            p + "attention.rotary_emb.inv_freq": (32,),
            p + "attention.dense.weight": (4096, 4096),
            p + "attention.dense.bias": (4096,),
            p + "post_attention_layernorm.weight": (4096,),
            p + "post_attention_layernorm.bias": (4096,),
            p + "mlp.dense_h_to_4h.weight": (16384, 4096),
            p + "mlp.dense_h_to_4h.bias": (16384,),
            p + "mlp.dense_4h_to_h.weight": (4096, 16384),
            p + "mlp.dense_4h_to_h.bias": (4096,),
        })
    return table


@pytest.mark.parametrize(
    "config_file, table, model_class",
    [
        ("chatglm2-6b.json", chatglm2_6b_table, GLM2ForConditionalGeneration),
        ("chatglm-6b.json", chatglm_6b_table, GLMForConditionalGeneration),
    ],
)
def test_state_dict_of_real_configs_matches_published_checkpoint_tables(config_file, table, model_class):
    config = ChatGLMConfig(**json.loads((FIXTURES / "configs" / config_file).read_text()))
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    assert type(model) is model_class
    got = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert got == table()


def test_real_v2_index_keys_count_matches_spec():
    # The published index holds 200 keys; 4 + 28 * 7 = 200.
    assert len(chatglm2_6b_table()) == 200
    assert len(chatglm_6b_table()) == 368


@pytest.mark.parametrize(
    "config_file, version, bits",
    [("chatglm2-6b.json", 2, 0), ("chatglm2-6b-int4.json", 2, 4), ("chatglm-6b.json", 1, 0), ("chatglm-6b-int4.json", 1, 4)],
)
def test_config_reads_the_four_published_config_files(config_file, version, bits):
    raw = json.loads((FIXTURES / "configs" / config_file).read_text())
    config = ChatGLMConfig(**raw)
    assert config.version == version
    assert config.quantization_bit == bits
    assert config.head_dim == 128
    assert config.num_key_value_heads == (2 if version == 2 else 32)


def test_config_version_is_told_from_fields_never_from_names():
    assert ChatGLMConfig(name_or_path="THUDM/chatglm-6b", padded_vocab_size=100).version == 2
    assert ChatGLMConfig(inner_hidden_size=64).version == 1
    with pytest.raises(ValueError, match="mixes"):
        ChatGLMConfig(inner_hidden_size=64, ffn_hidden_size=64)


def test_config_save_and_reload_keeps_version_and_fields(tmp_path):
    config = tiny_v1_config()
    config.save_pretrained(tmp_path)
    again = ChatGLMConfig.from_pretrained(tmp_path)
    assert again.version == 1 and again.gmask_token_id == config.gmask_token_id and again.tie_word_embeddings


# -- rotary embeddings ---------------------------------------------------------------------------------------


def test_glm2_rope_rotates_adjacent_pairs_of_the_first_half_only():
    x = torch.randn(1, 1, 3, 8)
    positions = torch.arange(3).unsqueeze(0)
    cos, sin = rotary_cos_sin(positions, rotary_inv_freq(4), torch.float32)
    out = apply_rotary_interleaved(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:])
    # Reference: complex multiplication of (x0 + i x1) by e^{i·pos·θ}.
    pairs = torch.view_as_complex(x[..., :4].reshape(1, 1, 3, 2, 2).contiguous())
    theta = 10000.0 ** (-torch.arange(0, 4, 2).float() / 4)
    rot = torch.polar(torch.ones(3, 2), torch.arange(3).float().unsqueeze(1) * theta)
    expected = torch.view_as_real(pairs * rot).flatten(-2)
    torch.testing.assert_close(out[..., :4], expected)


def test_glm_rope_uses_rotate_half_layout():
    x = torch.randn(1, 1, 2, 4)
    cos, sin = rotary_cos_sin(torch.tensor([[0, 1]]), rotary_inv_freq(4), torch.float32)
    out = apply_rotary_half(x, cos, sin)
    theta = 10000.0 ** (-torch.arange(0, 4, 2).float() / 4)
    angle = theta  # position 1
    x1, x2 = x[0, 0, 1, :2], x[0, 0, 1, 2:]
    expected = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()])
    torch.testing.assert_close(out[0, 0, 1], expected)
    torch.testing.assert_close(out[0, 0, 0], x[0, 0, 0])


def test_glm_2d_positions_follow_gmask_and_sop():
    config = tiny_v1_config()
    ids = torch.tensor([[5, 6, 7, 151, 154, 9, 10]])
    positions = glm_position_ids(ids, None, config)
    assert positions[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3]  # from <sop> on, tokens sit at the [gMASK] position
    assert positions[0, 1].tolist() == [0, 0, 0, 0, 1, 2, 3]  # block positions count from <sop>
    padded = glm_position_ids(torch.tensor([[3, 3, 5, 151, 154]]), torch.tensor([[0, 0, 1, 1, 1]]), config)
    assert padded[0, :, 2:].tolist() == glm_position_ids(torch.tensor([[5, 151, 154]]), None, config)[0].tolist()


# -- KV cache and padding ----------------------------------------------------------------------------------------


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 round-off: 1e-5 of the logits' own scale (they reach ~10 in these tiny models)."""
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=0)


def incremental_logits(model, ids, split, position_ids=None):
    out = model(ids[:, :split], position_ids=None if position_ids is None else position_ids[..., :split], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    for t in range(split, ids.shape[1]):
        pos = None if position_ids is None else position_ids[..., t : t + 1]
        out = model(ids[:, t : t + 1], position_ids=pos, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def test_glm2_incremental_decoding_equals_full_forward(tiny_v2):
    ids = torch.randint(0, 150, (2, 12), generator=torch.Generator().manual_seed(1))
    full = tiny_v2(ids).logits
    assert_logits_close(incremental_logits(tiny_v2, ids, 5), full)


def test_glm2_multi_token_chunk_on_a_cache_equals_full_forward(tiny_v2):
    ids = torch.randint(0, 150, (1, 12), generator=torch.Generator().manual_seed(2))
    full = tiny_v2(ids).logits
    first = tiny_v2(ids[:, :7], use_cache=True)
    rest = tiny_v2(ids[:, 7:], past_key_values=first.past_key_values, use_cache=True)
    assert_logits_close(torch.cat([first.logits, rest.logits], 1), full)


def test_glm_incremental_decoding_equals_full_forward(tiny_v1):
    config = tiny_v1.config
    ids = torch.tensor([v1_prompt([10, 11, 12, 13], config) + [20, 21, 22, 23, 24]] * 2)
    ids[1, 0] = 40
    positions = glm_position_ids(ids, None, config)
    full = tiny_v1(ids).logits
    assert_logits_close(incremental_logits(tiny_v1, ids, 6, positions), full)


def test_glm_prompt_is_bidirectional_and_answer_causal(tiny_v1):
    config = tiny_v1.config
    base = v1_prompt([10, 11, 12], config) + [30, 31]
    changed_prompt_end = v1_prompt([10, 11, 13], config) + [30, 31]
    changed_answer_end = v1_prompt([10, 11, 12], config) + [30, 32]
    logits = tiny_v1(torch.tensor([base, changed_prompt_end, changed_answer_end])).logits
    # A later prompt token changes what the first prompt token sees; a later answer token does not.
    assert not torch.allclose(logits[0, 0], logits[1, 0])
    torch.testing.assert_close(logits[0, :-1], logits[2, :-1])


@pytest.mark.parametrize("version", [1, 2])
def test_batched_generation_with_left_padding_equals_one_by_one(version, tiny_v1, tiny_v2):
    model = tiny_v1 if version == 1 else tiny_v2
    config = model.config
    prompts = [[10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32, 33]]
    if version == 1:
        prompts = [v1_prompt(p, config) for p in prompts]
    width = max(map(len, prompts))
    pad = config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = generate(model, ids, mask, params=GREEDY, max_new_tokens=12)
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), params=GREEDY, max_new_tokens=12)
        assert batched[row, : alone.shape[1]].tolist() == alone[0].tolist()
    assert len({tuple(r) for r in batched.tolist()}) > 1


@pytest.mark.parametrize("version", [1, 2])
def test_transformers_generate_matches_own_token_loop(version, tiny_v1, tiny_v2):
    model = tiny_v1 if version == 1 else tiny_v2
    prompt = [10, 11, 12, 13]
    if version == 1:
        prompt = v1_prompt(prompt, model.config)
    ids = torch.tensor([prompt])
    ours = generate(model, ids, params=GREEDY, max_new_tokens=8)
    theirs = model.generate(ids, max_new_tokens=8, do_sample=False)[:, ids.shape[1] :]
    assert theirs[0].tolist() == ours[0, : theirs.shape[1]].tolist()


def test_padding_rows_do_not_produce_nan(tiny_v2):
    ids = torch.tensor([[0, 0, 0, 5, 6], [7, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    logits = tiny_v2(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.isfinite(logits).all()


# -- training-facing outputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_labels_give_shifted_cross_entropy_and_hidden_states_are_returned(version, tiny_v1, tiny_v2):
    model = tiny_v1 if version == 1 else tiny_v2
    ids = torch.tensor([v1_prompt([10, 11, 12], model.config) + [20, 21]]) if version == 1 else torch.tensor([[10, 11, 12, 20, 21]])
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels, output_hidden_states=True)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert len(out.hidden_states) == model.config.num_layers + 1
    assert out.hidden_states[-1].shape == (1, ids.shape[1], model.config.hidden_size)


def test_gradient_checkpointing_gives_same_gradients(tiny_v2):
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    tiny_v2.train()
    tiny_v2(ids, labels=ids, use_cache=False).loss.backward()
    plain = tiny_v2.transformer.encoder.layers[0].mlp.dense_4h_to_h.weight.grad.clone()
    tiny_v2.zero_grad()
    tiny_v2.gradient_checkpointing_enable()
    tiny_v2(ids, labels=ids, use_cache=False).loss.backward()
    torch.testing.assert_close(tiny_v2.transformer.encoder.layers[0].mlp.dense_4h_to_h.weight.grad, plain)


def test_v1_lm_head_is_tied_to_word_embeddings(tiny_v1):
    assert tiny_v1.lm_head.weight is tiny_v1.transformer.word_embeddings.weight


def test_glm_residual_scale_is_sqrt_two_times_layers():
    model = GLMForConditionalGeneration(tiny_v1_config(num_layers=3))
    assert model.transformer.layers[0].alpha == pytest.approx(math.sqrt(6))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_forward_stays_close_to_fp32(tiny_v2, dtype):
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    reference = tiny_v2(ids).logits
    low = randomize(GLM2ForConditionalGeneration(tiny_v2_config())).eval().to(dtype)
    out = low(ids).logits.float()
    assert torch.isfinite(out).all()
    # bf16 keeps 8 bits of mantissa; the tiny model's logits agree to a few percent of their spread.
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("seq, causal", [(1, False), (5, True)])
def test_grouped_attention_equals_attention_over_expanded_heads(seq, causal):
    from chatglm.layers import attention

    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 8, seq, 16, generator=generator)
    key = torch.randn(2, 2, seq if causal else 7, 16, generator=generator)
    value = torch.randn(key.shape, generator=generator)
    expanded = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(4, 1), value.repeat_interleave(4, 1), is_causal=causal
    )
    torch.testing.assert_close(attention(query, key, value, None, causal), expanded.transpose(1, 2).flatten(2))


def test_single_bf16_row_linear_matches_onednn_and_leaves_the_backend_switch_alone():
    from chatglm.layers import Linear

    layer = Linear(64, 96).to(torch.bfloat16)
    rows = torch.randn(3, 1, 64).to(torch.bfloat16)
    before = torch.backends.mkldnn.enabled
    one_by_one = torch.cat([layer(rows[i : i + 1]) for i in range(3)])  # one row each: ATen's GEMV
    together = layer(rows)  # three rows: oneDNN
    assert torch.backends.mkldnn.enabled == before
    torch.testing.assert_close(one_by_one, together, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(together.float(), torch.nn.functional.linear(rows.float(), layer.weight.float(),
                                                                            layer.bias.float()), atol=3e-2, rtol=3e-2)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_equals_the_original_fp32_formula_rounded_once(dtype):
    from chatglm.layers import RMSNorm

    norm = RMSNorm(256).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256))
    x = (torch.randn(2, 5, 256) * 7).to(dtype)
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    original = (norm.weight * (x * torch.rsqrt(variance + norm.eps))).to(dtype)
    assert torch.equal(norm(x), original)


def test_growing_kv_layer_appends_in_place_and_matches_concatenation():
    from chatglm.modeling_utils import KVCache

    generator = torch.Generator().manual_seed(0)
    cache = KVCache()
    keys, values = [], []
    pointers = set()
    for step, length in enumerate([300] + [1] * 100 + [7]):  # prompt, tokens (through a regrowth), a chunk
        k = torch.randn(2, 3, length, 8, generator=generator)
        v = torch.randn(2, 3, length, 8, generator=generator)
        keys.append(k)
        values.append(v)
        got_k, got_v = cache.update(k, v, 0)
        assert torch.equal(got_k, torch.cat(keys, dim=2)) and torch.equal(got_v, torch.cat(values, dim=2))
        pointers.add(got_k.data_ptr())
    assert cache.get_seq_length() == 407
    assert len(pointers) <= 3  # storage reallocated only when full, not per step

    cache.crop(-7)  # keeps a view of the first 400: the next update writes after them
    k = torch.randn(2, 3, 1, 8, generator=generator)
    got_k, _ = cache.update(k, k, 0)
    assert got_k.shape[2] == 401 and torch.equal(got_k[:, :, :400], torch.cat(keys, dim=2)[:, :, :400])
    assert torch.equal(got_k[:, :, 400:], k)

    cache.batch_select_indices(torch.tensor([1]))  # replaces the tensors: the layer regrows from them
    got_k, _ = cache.update(k[1:], k[1:], 0)
    assert got_k.shape == (1, 3, 402, 8) and torch.equal(got_k[0, :, 401:], k[1])


def test_growing_kv_layer_concatenates_tensors_that_need_gradients():
    from chatglm.modeling_utils import KVCache

    cache = KVCache()
    k = torch.randn(1, 2, 4, 8, requires_grad=True)
    got_k, got_v = cache.update(k, k * 2, 0)
    got_k2, _ = cache.update(k, k * 2, 0)
    (got_k.sum() + got_k2.sum()).backward()  # no in-place write into a tensor saved for backward
    assert torch.equal(k.grad, torch.full_like(k, 3.0))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_single_query_full_head_attention_equals_sdpa(dtype, tolerance):
    from chatglm.layers import attention

    generator = torch.Generator().manual_seed(4)
    query = torch.randn(2, 4, 1, 16, generator=generator).to(dtype)
    storage = torch.randn(2, 2, 4, 40, 16, generator=generator).to(dtype)
    key, value = storage[0, :, :, :33], storage[1, :, :, :33]  # strided views, as the growing KV cache hands out
    expected = torch.nn.functional.scaled_dot_product_attention(query.float(), key.float(), value.float())
    got = attention(query, key, value, None, False)
    torch.testing.assert_close(got.float(), expected.transpose(1, 2).flatten(2), atol=tolerance, rtol=tolerance)
