"""One configuration class for both ChatGLM generations.

The real checkpoints share `model_type: "chatglm"` but describe different networks with different field
names: ChatGLM2-6B uses Megatron-style names (`padded_vocab_size`, `ffn_hidden_size`, `kv_channels`,
`multi_query_attention`, ...), ChatGLM-6B the older GLM names (`inner_hidden_size`, `max_sequence_length`,
`position_encoding_2d`, ...). The version is told from which of those fields are present, never from a
model name, and each version keeps only its own fields so a saved config.json looks like the real one.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# Fields that only one generation's config.json carries; any one of them decides the version.
_V2_ONLY_FIELDS = ("padded_vocab_size", "ffn_hidden_size", "kv_channels", "multi_query_attention", "seq_length", "rmsnorm")
_V1_ONLY_FIELDS = ("inner_hidden_size", "max_sequence_length", "position_encoding_2d", "gmask_token_id")

# Defaults are the published chatglm2-6b / chatglm-6b config.json values (spec/checkpoints.md), so a config
# built with only a few overrides (the tiny test models) still has every field the model code reads.
V2_DEFAULTS: dict[str, Any] = {
    "num_layers": 28,
    "padded_vocab_size": 65024,
    "hidden_size": 4096,
    "ffn_hidden_size": 13696,
    "kv_channels": 128,
    "num_attention_heads": 32,
    "seq_length": 32768,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "layernorm_epsilon": 1e-5,
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "bias_dropout_fusion": True,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "apply_query_key_layer_scaling": True,
    "attention_softmax_in_fp32": True,
    "fp32_residual_connection": False,
    "original_rope": True,
    "rope_ratio": 1.0,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}

V1_DEFAULTS: dict[str, Any] = {
    "num_layers": 28,
    "vocab_size": 130528,
    "hidden_size": 4096,
    "inner_hidden_size": 16384,
    "num_attention_heads": 32,
    "layernorm_epsilon": 1e-5,
    "max_sequence_length": 2048,
    "position_encoding_2d": True,
    "bos_token_id": 130004,
    "eos_token_id": 130005,
    "mask_token_id": 130000,
    "gmask_token_id": 130001,
    "pad_token_id": 3,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    # The real lm_head is stored as its own tensor but the original ties it to the word embeddings.
    "tie_word_embeddings": True,
}

# Fields shared by both versions (P-tuning v2 and quantization), with the original's defaults.
COMMON_DEFAULTS: dict[str, Any] = {
    "quantization_bit": 0,
    "pre_seq_len": None,
    "prefix_projection": False,
    "classifier_dropout": None,
    "use_cache": True,
}


def detect_version(fields: dict[str, Any]) -> int:
    """Tell ChatGLM (1) from ChatGLM2 (2) by the fields a config carries; a bare config means version 2."""
    has_v2 = [name for name in _V2_ONLY_FIELDS if name in fields]
    has_v1 = [name for name in _V1_ONLY_FIELDS if name in fields]
    if has_v2 and has_v1:
        raise ValueError(
            f"config mixes ChatGLM2 fields {has_v2} with ChatGLM-6B fields {has_v1}; it describes neither model"
        )
    if has_v1:
        return 1
    return 2


class ChatGLMConfig(PretrainedConfig):
    """Configuration of a ChatGLM-6B (v1) or ChatGLM2-6B (v2) model, read from the official config.json.

    `config.version` (1 or 2) is derived from the fields present. Pass `version=1` to build a v1 config
    from defaults alone (e.g. `ChatGLMConfig(version=1, num_layers=2, hidden_size=64, ...)`).
    """

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, version: int | None = None, **kwargs: Any) -> None:
        # transformers adds these on save; they are not model fields.
        given = {k: v for k, v in kwargs.items() if k not in ("transformers_version",)}
        if version is None:
            version = detect_version(given)
        elif version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version!r}")
        defaults = V1_DEFAULTS if version == 1 else V2_DEFAULTS
        for name, value in {**COMMON_DEFAULTS, **defaults}.items():
            kwargs.setdefault(name, value)
        tie = kwargs.pop("tie_word_embeddings")
        model_fields = {name: kwargs.pop(name) for name in list(kwargs) if name in defaults or name in COMMON_DEFAULTS}
        for name, value in model_fields.items():
            setattr(self, name, value)
        self.tie_word_embeddings = tie
        if version == 2:
            # The official code exposes the padded size under both names; keep them equal.
            kwargs.pop("vocab_size", None)
            self.vocab_size = self.padded_vocab_size
        self._version = version
        super().__init__(**kwargs)
        self._validate()

    @property
    def version(self) -> int:
        return self._version

    # Sizes under one name for code that serves both versions (generation, quantization, P-tuning).
    @property
    def head_dim(self) -> int:
        return self.kv_channels if self._version == 2 else self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        if self._version == 2 and self.multi_query_attention:
            return self.multi_query_group_num
        return self.num_attention_heads

    @property
    def max_positions(self) -> int:
        return self.seq_length if self._version == 2 else self.max_sequence_length

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    def _validate(self) -> None:
        if self.quantization_bit not in (0, 4, 8):
            raise ValueError(f"quantization_bit must be 0, 4 or 8, got {self.quantization_bit!r}")
        if self._version == 1 and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self._version == 2 and self.multi_query_attention and self.num_attention_heads % self.multi_query_group_num:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"multi_query_group_num {self.multi_query_group_num}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_version", None)
        if self._version == 2:
            # The real chatglm2 config.json stores vocab_size too; keep it equal to padded_vocab_size.
            out["vocab_size"] = self.padded_vocab_size
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        out = super().to_diff_dict()
        out.pop("_version", None)
        # Always write the fields that decide the version, so a saved config reloads as the same version.
        for name in _V2_ONLY_FIELDS if self._version == 2 else _V1_ONLY_FIELDS:
            out[name] = getattr(self, name)
        out["tie_word_embeddings"] = self.tie_word_embeddings
        return out
