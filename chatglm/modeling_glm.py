"""ChatGLM-6B (GLM v1): LayerNorm, 2-D rotary positions, a prefix-LM mask and alpha-scaled residuals.

Reads top to bottom like the network: word embeddings → N × (LayerNorm a → a·α + attention(a) → LayerNorm m
→ m·α + GELU-MLP(m)) → final LayerNorm → lm_head. Parameter names and shapes are those of the published
THUDM/chatglm-6b checkpoint (spec/checkpoints.md §2). ChatGLM2's file, modeling_glm2.py, is the sibling;
the differences between the two are deliberate and listed in the docstrings below.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from .configuration_chatglm import ChatGLMConfig
from .layers import Linear, apply_rotary_half, attention, build_attention_mask, rotary_inv_freq
from .modeling_utils import ChatGLMOutput, ChatGLMPreTrainedModel, PrefixEncoder


def glm_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: ChatGLMConfig,
) -> torch.Tensor:
    """GLM's positions for whole sequences: [batch, 2, seq] (or [batch, seq] without 2-D encoding).

    Row 0 counts tokens up to the `<sop>` that starts the answer and then stays at the [gMASK] position
    (the blank being filled); row 1 (block position) is 0 over the prompt and counts 1, 2, ... from `<sop>`.
    Left padding is skipped: real tokens count from 0 as they would in an unpadded row.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        pads = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        pads = length - attention_mask.long().sum(-1)
    rel = (torch.arange(length, device=device).unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)

    def first_index(token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        hits = input_ids == token_id
        return hits.any(-1), hits.long().argmax(-1) - pads

    has_sop, sop_index = first_index(config.bos_token_id)
    context_length = torch.where(has_sop, sop_index, length - pads)
    has_gmask, gmask_index = first_index(config.gmask_token_id)
    has_mask, mask_index = first_index(config.mask_token_id)
    mask_position = torch.where(has_gmask, gmask_index, torch.where(has_mask, mask_index, context_length - 1))

    in_context = rel < context_length.unsqueeze(1)
    positions = torch.where(in_context, rel, mask_position.unsqueeze(1))
    if not config.position_encoding_2d:
        # Without block positions, generated tokens keep counting when the blank is a [gMASK].
        return torch.where(has_gmask.unsqueeze(1), rel, positions)
    block_positions = torch.where(in_context, torch.zeros_like(rel), rel - context_length.unsqueeze(1) + 1)
    return torch.stack([positions, block_positions], dim=1)


def padding_mask_from_glm_mask(mask: torch.Tensor) -> torch.Tensor:
    """[batch, 1, L, L] bool (True = masked, the original tokenizer's prefix-LM mask) -> [batch, L] 1/0 padding mask.

    The last row of a left-padded prefix-LM mask sees every real token and no padding, so it is exactly
    the key padding mask; the prefix-LM structure itself is rebuilt from the `<sop>` position.
    """
    return (~mask[:, 0, -1, :].bool()).long()


class GLMRotaryEmbedding(nn.Module):
    """RoPE of dim head_dim/2 in rotate-half layout; applied twice (positions, block positions).

    The original rounds inv_freq to fp16 whatever the model dtype, and the published weights were
    trained with those rounded frequencies, so they are reproduced here. Angles are taken in fp16 for
    fp16 models (as the original) and in fp32 otherwise (the original's bf16 path also rounded the
    positions to bf16, which loses positions above 256; that is not reproduced).
    """

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dim = config.hidden_size // (config.num_attention_heads * 2)
        # Persistent only so the state dict matches the checkpoint; the values are always recomputed.
        self.register_buffer("inv_freq", rotary_inv_freq(self.dim).half().float(), persistent=True)

    def reset_buffers(self, device: torch.device | None = None) -> None:
        self.inv_freq = rotary_inv_freq(self.dim, device=device).half().float()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rotary_inv_freq(self.dim, device=position_ids.device).half()
        if dtype == torch.float16:
            angles = (position_ids.half().unsqueeze(-1) * inv_freq).float()
        else:
            angles = position_ids.float().unsqueeze(-1) * inv_freq.float()
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        state_dict.pop(prefix + "inv_freq", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GLMAttention(nn.Module):
    """Full multi-head attention; QKV rows interleaved per head ([q|k|v] of head 0, then head 1, ...).

    The original divides the query by √d·(layer_id+1) and multiplies the fp32 scores back by
    (layer_id+1) to keep fp16 scores in range. That is softmax(QKᵀ/√d) exactly, which SDPA computes
    with fp32 accumulation, so the coefficient is not needed here.
    """

    def __init__(self, config: ChatGLMConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.position_encoding_2d = config.position_encoding_2d
        self.rotary_emb = GLMRotaryEmbedding(config)
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = Linear(config.hidden_size, config.hidden_size, bias=True)
        self.attention_dropout = config.attention_dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3 * self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # each [b, h, s, d]
        if self.position_encoding_2d:
            # First half of each head rotates with the token position, second half with the block position.
            q1, q2 = query.chunk(2, dim=-1)
            k1, k2 = key.chunk(2, dim=-1)
            cos, sin = self.rotary_emb(position_ids[:, 0], hidden_states.dtype)
            block_cos, block_sin = self.rotary_emb(position_ids[:, 1], hidden_states.dtype)
            query = torch.cat([apply_rotary_half(q1, cos, sin), apply_rotary_half(q2, block_cos, block_sin)], dim=-1)
            key = torch.cat([apply_rotary_half(k1, cos, sin), apply_rotary_half(k2, block_cos, block_sin)], dim=-1)
        else:
            cos, sin = self.rotary_emb(position_ids, hidden_states.dtype)
            query, key = apply_rotary_half(query, cos, sin), apply_rotary_half(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_id)
        dropout = self.attention_dropout if self.training else 0.0
        return self.dense(attention(query, key, value, mask, is_causal, dropout))


class GLMMLP(nn.Module):
    """Plain 4h GELU MLP (tanh approximation), with biases; ChatGLM2 uses a gated SwiGLU instead."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.inner_hidden_size, bias=True)
        self.dense_4h_to_h = Linear(config.inner_hidden_size, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


class GLMBlock(nn.Module):
    """GLM's residual: the skip path carries the *normed* input scaled by α = √(2·num_layers)."""

    def __init__(self, config: ChatGLMConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = GLMAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLMMLP(config)
        self.alpha = math.sqrt(2 * config.num_layers)
        self.hidden_dropout = config.hidden_dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        attn_out = self.attention(normed, position_ids, mask, is_causal, cache)
        hidden_states = normed * self.alpha + F.dropout(attn_out, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden_states)
        return normed * self.alpha + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)


class GLMModel(nn.Module):
    """`transformer` in the checkpoint: word embeddings, the layer stack, the final LayerNorm."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: DynamicCache | None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        all_hidden: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                hidden_states = checkpoint(layer, hidden_states, position_ids, mask, is_causal, cache, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, position_ids, mask, is_causal, cache)
        hidden_states = self.final_layernorm(hidden_states)
        if all_hidden is not None:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden


class GLMForConditionalGeneration(ChatGLMPreTrainedModel):
    """ChatGLM-6B with its lm_head (tied to the word embeddings, though the checkpoint stores both)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        if config.version != 1:
            raise ValueError(f"GLMForConditionalGeneration needs a ChatGLM-6B config, got version {config.version}")
        super().__init__(config)
        self.transformer = GLMModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_lm_head()
        if config.pre_seq_len:
            for name, param in self.named_parameters():
                param.requires_grad = name.startswith("transformer.prefix_encoder.")
        self.post_init()

    def tie_lm_head(self) -> None:
        """Share the word embedding matrix with lm_head (again after loading replaced it)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def generate(self, *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any):  # noqa: ANN201
        """transformers' generate, also accepting the tokenizer's 4-D prefix-LM mask and [b, 2, L] positions."""
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = padding_mask_from_glm_mask(attention_mask)
        kwargs.pop("position_ids", None)  # recomputed every step from the ids and the padding mask
        return super().generate(*args, attention_mask=attention_mask, **kwargs)

    def _position_ids_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        # The mask may also cover tokens held in the cache; positions come from this sequence alone.
        token_mask = attention_mask[:, -input_ids.shape[1] :] if attention_mask is not None else None
        return glm_position_ids(input_ids, token_mask, self.config)

    def _context_end(self, input_ids: torch.Tensor | None, seq: int, past: int, key_length: int, device) -> torch.Tensor | None:  # noqa: ANN001
        """Key index where the bidirectional prompt ends: the first `<sop>` of this chunk.

        A fresh chunk without `<sop>` is all prompt (bidirectional); a chunk that continues a cache
        without one is generated text and stays causal.
        """
        if input_ids is None:
            return None if past else torch.full((1,), key_length, device=device)
        hits = input_ids == self.config.bos_token_id
        first = torch.where(hits.any(-1), hits.long().argmax(-1), torch.full_like(hits[:, 0], seq, dtype=torch.long))
        if past and not bool(hits.any()):
            return None
        return first + (key_length - seq)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        return_last_logit: bool = False,
        cache: DynamicCache | None = None,
        **kwargs: Any,
    ) -> ChatGLMOutput:
        """Logits for `input_ids` given the tokens already in `past_key_values` (or `cache`).

        position_ids [batch, 2, seq] are derived from the ids when the cache is empty; continuing a
        cache needs them passed (generation does). attention_mask [batch, past+seq]: 1 for real tokens,
        0 for left padding; the prefix-LM structure comes from the position of `<sop>`.
        """
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = padding_mask_from_glm_mask(attention_mask)
        model = self.transformer
        if inputs_embeds is None:
            inputs_embeds = model.word_embeddings(input_ids)
        seq = inputs_embeds.shape[1]
        device = inputs_embeds.device
        state = self._start_forward(
            inputs_embeds, attention_mask, cache if cache is not None else past_key_values, use_cache,
            output_hidden_states, output_attentions, model.prefix_encoder, model.gradient_checkpointing,
        )
        if position_ids is None:
            if state.past or input_ids is None:
                raise ValueError("position_ids are required when continuing from a KV cache or feeding inputs_embeds")
            token_mask = attention_mask[:, -seq:] if attention_mask is not None else None
            position_ids = glm_position_ids(input_ids, token_mask, self.config)
        context_end = self._context_end(input_ids, seq, state.past, state.key_length, device)
        mask, is_causal = build_attention_mask(state.key_padding, seq, state.key_length, context_end, device=device)
        hidden_states, all_hidden = model(inputs_embeds, position_ids, mask, is_causal, state.cache, state.output_hidden_states)
        return self._finish_forward(hidden_states, all_hidden, self.lm_head, labels, return_last_logit, state)
