"""ChatGLM2-6B (GLM2): a pre-norm decoder with RMSNorm, multi-query attention, half-head RoPE and SwiGLU.

Reads top to bottom like the network: embedding → rotary table → N × (RMSNorm → attention → residual →
RMSNorm → SwiGLU → residual) → final RMSNorm → output layer. Parameter names and shapes are those of
the published THUDM/chatglm2-6b checkpoint (spec/checkpoints.md §1), so its shards load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from .configuration_chatglm import ChatGLMConfig
from .layers import (
    Linear,
    RMSNorm,
    apply_rotary_interleaved,
    attention,
    build_attention_mask,
    rotary_cos_sin,
    rotary_inv_freq,
)
from .modeling_utils import ChatGLMOutput, ChatGLMPreTrainedModel, PrefixEncoder


class GLM2Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class GLM2RotaryEmbedding(nn.Module):
    """RoPE over the first half of each head: kv_channels/2 rotated channels, i.e. kv_channels/4 angles."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.rotary_dim = config.kv_channels // 2
        self.base = 10000.0 * getattr(config, "rope_ratio", 1.0)
        # Persistent only so the state dict matches the checkpoint; the values are always recomputed.
        self.register_buffer("inv_freq", rotary_inv_freq(self.rotary_dim, self.base), persistent=True)

    def reset_buffers(self, device: torch.device | None = None) -> None:
        self.inv_freq = rotary_inv_freq(self.rotary_dim, self.base, device=device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rotary_inv_freq(self.rotary_dim, self.base, device=position_ids.device)
        return rotary_cos_sin(position_ids, inv_freq, dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # The stored inv_freq is a rounded copy of a constant; never let it override the fp32 value.
        state_dict.pop(prefix + "inv_freq", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GLM2Attention(nn.Module):
    """Multi-query attention: 32 query heads share 2 K/V groups; one fused QKV projection."""

    def __init__(self, config: ChatGLMConfig, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_kv_heads = config.multi_query_group_num if config.multi_query_attention else config.num_attention_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # Rows are [all Q | all K | all V], unlike ChatGLM-6B's per-head interleaving.
        self.query_key_value = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = Linear(self.q_size, config.hidden_size, bias=config.add_bias_linear)
        self.attention_dropout = config.attention_dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states)
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query = query.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [b, hq, s, d]
        key = key.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, hkv, s, d]
        value = value.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query = apply_rotary_interleaved(query, cos, sin)
        key = apply_rotary_interleaved(key, cos, sin)
        if cache is not None:
            # The cache keeps the 2 groups un-expanded: 16× less memory than per-head K/V.
            key, value = cache.update(key, value, self.layer_number - 1)
        dropout = self.attention_dropout if self.training else 0.0
        context = attention(query, key, value, mask, is_causal, dropout)
        return self.dense(context)


class GLM2MLP(nn.Module):
    """SwiGLU: dense_h_to_4h produces [gate | up] (gate first), silu(gate)·up, then dense_4h_to_h."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLM2Block(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number: int) -> None:
        super().__init__()
        norm = RMSNorm if config.rmsnorm else nn.LayerNorm
        self.input_layernorm = norm(config.hidden_size, eps=config.layernorm_epsilon)
        self.self_attention = GLM2Attention(config, layer_number)
        self.post_attention_layernorm = norm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLM2MLP(config)
        self.residual_from_norm = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        attn_out = self.self_attention(normed, cos, sin, mask, is_causal, cache)
        residual = normed if self.residual_from_norm else hidden_states
        hidden_states = residual + F.dropout(attn_out, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.residual_from_norm else hidden_states
        return residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)


class GLM2Transformer(nn.Module):
    """The layer stack plus the final norm (the checkpoint's `transformer.encoder`)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([GLM2Block(config, i + 1) for i in range(config.num_layers)])
        if config.post_layer_norm:
            norm = RMSNorm if config.rmsnorm else nn.LayerNorm
            self.final_layernorm = norm(config.hidden_size, eps=config.layernorm_epsilon)
        else:
            self.final_layernorm = None
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
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
                hidden_states = checkpoint(layer, hidden_states, cos, sin, mask, is_causal, cache, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, cos, sin, mask, is_causal, cache)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        if all_hidden is not None:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden


class GLM2Model(nn.Module):
    """`transformer` in the checkpoint: embedding, rotary table, encoder, output layer (untied)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.embedding = GLM2Embedding(config)
        self.rotary_pos_emb = GLM2RotaryEmbedding(config)
        self.encoder = GLM2Transformer(config)
        self.output_layer = Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None


class GLM2ForConditionalGeneration(ChatGLMPreTrainedModel):
    """ChatGLM2-6B with its LM head, `chat`/`stream_chat` (from ChatMixin) and `generate` support."""

    def __init__(self, config: ChatGLMConfig) -> None:
        if config.version != 2:
            raise ValueError(f"GLM2ForConditionalGeneration needs a ChatGLM2 config, got version {config.version}")
        super().__init__(config)
        self.transformer = GLM2Model(config)
        if config.pre_seq_len:
            # P-tuning v2 trains the prefix only.
            for name, param in self.named_parameters():
                param.requires_grad = name.startswith("transformer.prefix_encoder.")
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def _position_ids_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        # Real tokens count from 0 after any left padding, so a padded row sees the positions it would alone.
        if attention_mask is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

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

        position_ids default to past_length + arange(seq); attention_mask [batch, past+seq] marks real
        tokens (1) and left padding (0). With `labels`, the next-token loss is returned too.
        """
        model = self.transformer
        if inputs_embeds is None:
            inputs_embeds = model.embedding(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        state = self._start_forward(
            inputs_embeds, attention_mask, cache if cache is not None else past_key_values, use_cache,
            output_hidden_states, output_attentions, model.prefix_encoder, model.encoder.gradient_checkpointing,
        )
        if position_ids is None:
            position_ids = torch.arange(state.past, state.past + seq, device=inputs_embeds.device).expand(batch, seq)
        cos, sin = model.rotary_pos_emb(position_ids, inputs_embeds.dtype)
        mask, is_causal = build_attention_mask(state.key_padding, seq, state.key_length, device=inputs_embeds.device)
        hidden_states, all_hidden = model.encoder(
            inputs_embeds, cos, sin, mask, is_causal, state.cache, state.output_hidden_states
        )
        return self._finish_forward(hidden_states, all_hidden, model.output_layer, labels, return_last_logit, state)
