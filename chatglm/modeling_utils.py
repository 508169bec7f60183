"""What both model files share: the PreTrainedModel base, the output type, the KV cache and P-tuning prefix.

The model math lives in modeling_glm2.py (ChatGLM2-6B) and modeling_glm.py (ChatGLM-6B). This module holds
the transformers plumbing around it: weight init, loading/saving through chatglm.loading, generation input
preparation, and the P-tuning v2 prefix encoder that turns `pre_seq_len` learned vectors into per-layer KV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.utils import ModelOutput

from .chat import ChatMixin
from .configuration_chatglm import ChatGLMConfig


@dataclass
class ChatGLMOutput(ModelOutput):
    """Causal-LM output. The KV cache is the `cache` field (the name current transformers generation reads)
    and is also readable as `past_key_values` (the original chat API's name)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: DynamicCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> DynamicCache | None:
        return self.cache


class PrefixEncoder(nn.Module):
    """P-tuning v2: `pre_seq_len` trainable vectors expanded into a key and a value for every layer.

    Without projection the per-layer keys/values are looked up directly; with `prefix_projection` a
    two-layer tanh MLP produces them from a hidden_size embedding (the original's two variants, with the
    same parameter names `embedding`, `trans.0`, `trans.2`).
    """

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.pre_seq_len = config.pre_seq_len
        self.num_layers = config.num_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        kv_size = config.num_layers * config.num_key_value_heads * config.head_dim * 2
        self.prefix_projection = config.prefix_projection
        if config.prefix_projection:
            # v2 embeds straight into kv_size before the MLP, v1 into hidden_size (as the originals do).
            embed_dim = kv_size if config.version == 2 else config.hidden_size
            self.embedding = nn.Embedding(config.pre_seq_len, embed_dim)
            self.trans = nn.Sequential(
                nn.Linear(embed_dim, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        self.dropout = nn.Dropout(0.1)
        # Keep PyTorch's default initialisation (N(0, 1) embedding) instead of the model's N(0, 0.02): the
        # original model's _init_weights did nothing, and P-tuning learning rates (2e-2) were tuned for that start.
        for module in self.modules():
            module._is_hf_initialized = True

    def forward(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tokens = torch.arange(self.pre_seq_len, device=self.embedding.weight.device)
        prefix = self.embedding(tokens)
        if self.prefix_projection:
            prefix = self.trans(prefix)
        prefix = self.dropout(prefix.to(dtype))
        # [pre, layers·2·kv_heads·d] -> per layer (key, value) each [batch, kv_heads, pre, d]
        prefix = prefix.view(self.pre_seq_len, self.num_layers * 2, self.num_kv_heads, self.head_dim)
        prefix = prefix.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return [(prefix[2 * i], prefix[2 * i + 1]) for i in range(self.num_layers)]


class PrefixKV:
    """The P-tuning prefix as read-only past keys/values, for a forward pass that keeps no KV cache.

    `update` returns prefix + new keys/values without storing anything. A DynamicCache would append on every
    call, and gradient checkpointing calls each layer twice (forward, then recompute in backward), so the
    recomputed layer would see its own keys twice. The original passed the prefix as plain per-layer tensors;
    this is that, behind the one cache method the attention layers call.
    """

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.layers = layers

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prefix_key, prefix_value = self.layers[layer_idx]
        return torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx][0].shape[2]


class GrowingKVLayer(DynamicLayer):
    """A DynamicLayer that writes new keys/values into spare room instead of concatenating.

    DynamicLayer copies the whole layer cache on every step (torch.cat). For ChatGLM-6B's 32 full K/V heads
    that is ~300 MB per generated token at 600 tokens of context, as slow as reading the int4 weights. Here
    the storage grows by a quarter (at least 256 positions) when full, so a step writes one position;
    `keys`/`values` stay views of the filled part, so whatever reads a DynamicLayer works unchanged.
    """

    _storage: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.requires_grad or value_states.requires_grad:
            return super().update(key_states, value_states, *args, **kwargs)  # writing in place would break autograd
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not self._storage_holds_cache() or needed > self._storage[0].shape[-2]:
            capacity = needed + max(256, needed // 4)
            self._storage = (self._regrow(self.keys, key_states, length, capacity),
                             self._regrow(self.values, value_states, length, capacity))
        key_store, value_store = self._storage
        key_store[..., length:needed, :].copy_(key_states)
        value_store[..., length:needed, :].copy_(value_states)
        self.keys, self.values = key_store[..., :needed, :], value_store[..., :needed, :]
        return self.keys, self.values

    def _storage_holds_cache(self) -> bool:
        # False once something replaced keys by a new tensor (batch_select_indices, reorder_cache, reset);
        # crop() keeps a prefix view of the storage, which is still valid.
        if self._storage is None or self.keys is None or self.keys.numel() == 0:
            return False
        store = self._storage[0]
        return (self.keys.data_ptr() == store.data_ptr() and self.keys.shape[:-2] == store.shape[:-2]
                and self.keys.stride() == store.stride())

    @staticmethod
    def _regrow(old: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
        store = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
        if length:
            store[..., :length, :].copy_(old)
        return store


class KVCache(DynamicCache):
    """The DynamicCache the models create for themselves: its layers grow in place (GrowingKVLayer)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowingKVLayer


def prepare_cache(
    cache: DynamicCache | None,
    prefix_encoder: PrefixEncoder | None,
    batch_size: int,
    dtype: torch.dtype,
    use_cache: bool = True,
) -> DynamicCache | PrefixKV | None:
    """Return the cache the layers read and write: the caller's, or a new one holding the P-tuning prefix.

    Without `use_cache` (training) a fresh pass gets a write-nothing PrefixKV holding only the prefix, or None
    when there is no prefix; a non-empty cache passed by the caller is still continued.
    """
    if not use_cache and (cache is None or cache.get_seq_length() == 0):
        return PrefixKV(prefix_encoder(batch_size, dtype)) if prefix_encoder is not None else None
    if cache is None:
        cache = KVCache()
    if prefix_encoder is not None and cache.get_seq_length() == 0:
        for layer_idx, (key, value) in enumerate(prefix_encoder(batch_size, dtype)):
            cache.update(key, value, layer_idx)
    return cache


@dataclass
class ForwardState:
    """What a forward pass knows after opening the cache: where its keys sit and what to return."""

    cache: DynamicCache | PrefixKV | None
    use_cache: bool
    output_hidden_states: bool
    past: int  # tokens already in the cache, P-tuning prefix excluded
    key_padding: torch.Tensor | None  # [batch, key_length], 1 = real token
    key_length: int


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy in fp32; label -100 is ignored (the prompt part in fine-tuning)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100)


class ChatGLMPreTrainedModel(PreTrainedModel, GenerationMixin, ChatMixin):
    """Base of both generations' models: init, loading/saving in the official layout, generation glue."""

    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock", "GLM2Block"]
    _supports_sdpa = True
    main_input_name = "input_ids"

    @classmethod
    def can_generate(cls) -> bool:
        # transformers looks for GenerationMixin among the *direct* bases of the concrete class only.
        return True

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            if module.weight.device.type != "meta":
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if module.weight.device.type != "meta":
                nn.init.normal_(module.weight, mean=0.0, std=std)

    # -- cache helpers ----------------------------------------------------------------------------------------

    @property
    def prefix_length(self) -> int:
        """Cache slots taken by the P-tuning prefix (they precede every token)."""
        return self.config.pre_seq_len or 0

    def past_length(self, cache: DynamicCache | None) -> int:
        """Tokens already in the cache, not counting the P-tuning prefix."""
        if cache is None:
            return 0
        length = cache.get_seq_length()
        return max(length - self.prefix_length, 0) if length else 0

    # -- what both forwards do around the layer stack ------------------------------------------------------------

    def _start_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: DynamicCache | None,
        use_cache: bool | None,
        output_hidden_states: bool | None,
        output_attentions: bool | None,
        prefix_encoder: PrefixEncoder | None,
        checkpointing: bool,
    ) -> "ForwardState":
        """Open the KV cache (with the P-tuning prefix) and line the padding mask up with the cache's keys."""
        if output_attentions:
            raise NotImplementedError("output_attentions is not available: attention runs in fused SDPA kernels")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and checkpointing:
            use_cache = False  # a recomputed layer would append its keys to the cache a second time
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        batch, seq = inputs_embeds.shape[:2]
        if use_cache or prefix_encoder is not None:
            cache = prepare_cache(cache, prefix_encoder, batch, inputs_embeds.dtype, use_cache)
        else:
            cache = None
        past = self.past_length(cache)
        key_padding = attention_mask
        if self.prefix_length and key_padding is not None:
            key_padding = torch.cat([key_padding.new_ones(batch, self.prefix_length), key_padding], dim=-1)
        key_length = self.prefix_length + past + seq
        if key_padding is not None and key_padding.shape[-1] != key_length:
            raise ValueError(
                f"attention_mask covers {key_padding.shape[-1] - self.prefix_length} tokens, but the cache holds "
                f"{past} and {seq} are new"
            )
        return ForwardState(cache, use_cache, bool(output_hidden_states), past, key_padding, key_length)

    @staticmethod
    def _finish_forward(
        hidden_states: torch.Tensor,
        all_hidden: tuple[torch.Tensor, ...] | None,
        head: nn.Module,
        labels: torch.Tensor | None,
        return_last_logit: bool,
        state: "ForwardState",
    ) -> ChatGLMOutput:
        if return_last_logit:
            hidden_states = hidden_states[:, -1:]
        logits = head(hidden_states)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        cache = state.cache if state.use_cache else None
        return ChatGLMOutput(loss=loss, logits=logits, cache=cache, hidden_states=all_hidden)

    # -- quantization ----------------------------------------------------------------------------------------------

    def quantize(self, bits: int, empty_init: bool = False, **kwargs: Any) -> "ChatGLMPreTrainedModel":
        """Swap the four Linear layers of every block for int4/int8 weight-only ones (the official format).

        Returns the model, so `from_pretrained(...).quantize(4).cuda()` chains as in the original README;
        bits 0 leaves the model as it is. `empty_init` builds empty quantized layers for loading int weights.
        Extra keyword arguments of the original signature (device, use_quantization_cache, ...) are accepted
        and have no effect.
        """
        if bits == 0:
            return self
        current = self.config.quantization_bit or 0
        if current == bits:
            return self
        if current:
            raise ValueError(f"the model is already quantized to int{current}; reload it to quantize to int{bits}")
        from .quantization import quantize_model

        quantize_model(self, bits, empty_init=empty_init)
        self.config.quantization_bit = bits
        return self

    # -- loading and saving -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *model_args: Any, **kwargs: Any) -> "ChatGLMPreTrainedModel":
        """Load a ChatGLM / ChatGLM2 checkpoint (local folder or hub id); see `chatglm.loading.load_pretrained`."""
        from .loading import load_pretrained

        if model_args:
            raise TypeError("positional model arguments are not supported; pass keyword arguments")
        return load_pretrained(pretrained_model_name_or_path, model_class=cls, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write config.json and safetensors shards that `from_pretrained` reads back identically."""
        from .loading import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    # -- generation glue --------------------------------------------------------------------------------------

    def _position_ids_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen, with positions derived from the whole sequence.

        Positions are recomputed from input_ids and the padding mask at every step (not incremented by
        transformers), because ChatGLM-6B's 2-D positions do not simply count up.
        """
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = self.past_length(cache)
        # Any position_ids transformers prepared are plain counters; ours know about padding and 2-D GLM positions.
        position_ids = self._position_ids_for_generation(input_ids, attention_mask)
        model_inputs: dict[str, Any] = {
            "input_ids": input_ids[:, past:],
            "position_ids": position_ids[..., past:],
            "attention_mask": attention_mask,
            "past_key_values": cache,
            "use_cache": kwargs.get("use_cache", True),
            "return_last_logit": True,
        }
        if inputs_embeds is not None and past == 0:
            model_inputs["inputs_embeds"] = inputs_embeds
            model_inputs["input_ids"] = None
        return model_inputs

    def _reorder_cache(self, past_key_values: DynamicCache, beam_idx: torch.LongTensor) -> DynamicCache:
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
