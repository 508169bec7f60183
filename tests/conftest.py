"""Shared fixtures: tiny random ChatGLM / ChatGLM2 models (CPU, fp32) and paths to real tokenizer files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import chatglm
from chatglm import ChatGLMConfig, GLM2ForConditionalGeneration, GLMForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ICE_TEXT_MODEL = SHARED / "tokenizers" / "chatglm-6b" / "ice_text.model"
FIXTURES = Path(__file__).parent / "fixtures"
EMBEDDED_MODEL = Path(chatglm.__file__).parent / "assets" / "tiny-chatglm2"


def tiny_v2_config(**overrides) -> ChatGLMConfig:
    fields = dict(
        num_layers=2, padded_vocab_size=160, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
        num_attention_heads=4, multi_query_group_num=2, seq_length=512,
    )
    fields.update(overrides)
    return ChatGLMConfig(**fields)


def tiny_v1_config(**overrides) -> ChatGLMConfig:
    # Special ids are placed inside the small vocabulary, in the real order ([MASK], [gMASK], ..., <sop>, <eop>).
    fields = dict(
        version=1, num_layers=2, vocab_size=160, hidden_size=64, inner_hidden_size=128, num_attention_heads=4,
        max_sequence_length=512, mask_token_id=150, gmask_token_id=151, bos_token_id=154, eos_token_id=155,
        pad_token_id=3,
    )
    fields.update(overrides)
    return ChatGLMConfig(**fields)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Weights large enough that a tiny random model's greedy output varies from token to token."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point():
                noise = torch.randn(param.shape, generator=generator) * std
                param.copy_((1.0 + noise) if name.endswith("layernorm.weight") else noise)
    return model


@pytest.fixture
def tiny_v2() -> GLM2ForConditionalGeneration:
    return randomize(GLM2ForConditionalGeneration(tiny_v2_config())).eval()


@pytest.fixture
def tiny_v1() -> GLMForConditionalGeneration:
    return randomize(GLMForConditionalGeneration(tiny_v1_config())).eval()


@pytest.fixture
def ice_text_model() -> Path:
    if not ICE_TEXT_MODEL.is_file():
        pytest.skip(f"the real chatglm-6b tokenizer is not at {ICE_TEXT_MODEL}")
    return ICE_TEXT_MODEL


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only with RUN_SLOW=1, so the default suite stays within minutes."""
    import os

    if os.environ.get("RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow; set RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
