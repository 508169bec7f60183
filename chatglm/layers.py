"""Pieces shared by both ChatGLM generations: linear layers, norms, rotary embeddings, masks, attention.

Tensors are batch-first inside this package: hidden states [batch, seq, hidden], attention heads
[batch, heads, seq, head_dim] (what `scaled_dot_product_attention` wants). The official code is
sequence-first; the layout never leaks into parameter names or shapes, so checkpoints load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that multiplies a single bf16 CPU row with ATen's GEMV.

    oneDNN, PyTorch's CPU matmul for bf16, streams the weight at ~20 GB/s when the input is one row; ATen's
    own GEMV reaches ~32 GB/s on the same machine (bench/README.md). One row is every decoding step at batch
    1: all layers of a bf16 model, the output layer of a quantized one. From two rows on oneDNN is faster,
    so it stays in charge there.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]:
            with _onednn_disabled():
                return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@contextmanager
def _onednn_disabled() -> Iterator[None]:
    # A process-wide switch: a matmul in another thread during these microseconds takes ATen's path too.
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and rounded once, as the original does.

    F.rms_norm upcasts half-precision inputs the same way (bit-identical to the original's four ops,
    tests/test_modeling.py) in one fused op.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.eps)


def rotary_inv_freq(rotary_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """θ_i = base^(-2i/rotary_dim) for i < rotary_dim/2, in fp32."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of position·θ for every position id: [..., seq] -> [..., seq, len(θ)].

    Angles and cos/sin are computed in fp32 and only then rounded to the model dtype, which is what
    the ChatGLM2 rope cache does (it is built in fp32 and cast to fp16/bf16 once).
    """
    angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq.to(torch.float32)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2·len(θ) channels of every head in adjacent pairs (x[2i], x[2i+1]); pass the rest.

    x: [batch, heads, seq, head_dim]; cos, sin: [batch, seq, n_pairs]. This is ChatGLM2's RoPE: only the
    first half of each head is rotated, and pairs are neighbours (GPT-J style), not halves.
    """
    n_pairs = cos.shape[-1]
    rotated, passed = x[..., : 2 * n_pairs], x[..., 2 * n_pairs :]
    pairs = rotated.unflatten(-1, (n_pairs, 2))  # [b, h, s, n_pairs, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((out, passed), dim=-1)


def apply_rotary_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX style RoPE over the whole last dim: x·cos + rotate_half(x)·sin, with cos = cat(c, c).

    x: [batch, heads, seq, dim]; cos, sin: [batch, seq, dim/2].
    """
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def build_attention_mask(
    key_padding_mask: torch.Tensor | None,
    query_length: int,
    key_length: int,
    context_end: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """The boolean mask for SDPA (True = may attend) or None, and whether SDPA should apply causality.

    Queries are always the last `query_length` of `key_length` positions (earlier ones come from the
    KV cache, including a P-tuning prefix). key_padding_mask: [batch, key_length], 1 for real tokens
    (left padding is 0). context_end: [batch] key index up to which attention is bidirectional
    (ChatGLM-6B's prefix-LM over the prompt); None means purely causal (ChatGLM2).
    """
    all_real = key_padding_mask is None or bool(key_padding_mask.all())
    if all_real and query_length == 1:
        return None, False  # the last position sees every key, whatever the prefix-LM context
    if all_real and context_end is None and query_length == key_length:
        return None, True
    source = key_padding_mask if key_padding_mask is not None else context_end
    batch = source.shape[0] if source is not None else 1
    device = source.device if source is not None else device
    query_pos = torch.arange(key_length - query_length, key_length, device=device).view(1, -1, 1)
    key_pos = torch.arange(key_length, device=device).view(1, 1, -1)
    allowed = (key_pos <= query_pos).expand(batch, -1, -1)
    if context_end is not None:
        allowed = allowed | (key_pos < context_end.view(-1, 1, 1).to(device))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool().view(batch, 1, key_length)
    # A padding query row sees no key at all; SDPA would return NaN there, and NaN in a padded
    # position's value vector poisons later layers (0·NaN = NaN). Let such rows see everything.
    empty_rows = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty_rows
    return allowed.unsqueeze(1), False


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V with grouped K/V heads expanded to the query heads.

    query: [b, hq, s, d]; key/value: [b, hkv, t, d] with hq a multiple of hkv; returns [b, s, hq·d].
    """
    batch, num_heads, seq, head_dim = query.shape
    groups = num_heads // key.shape[1]
    scale = 1.0 / math.sqrt(head_dim)
    if seq == 1 and groups == 1 and mask is None and dropout_p == 0.0 and query.device.type == "cpu":
        # One query per head (ChatGLM-6B decoding). CPU SDPA reads K/V at ~5 GB/s for a single query row;
        # two batched GEMVs read them ~3x faster (bench/README.md). Scores are rounded to the model dtype
        # before the fp32 softmax, as the original's half-precision attention did.
        scores = torch.matmul(key, query.transpose(-1, -2)).float().mul_(scale)  # [b, h, t, 1]
        probs = scores.softmax(dim=-2).to(value.dtype)
        return torch.matmul(probs.transpose(-1, -2), value).transpose(1, 2).flatten(2)
    if groups > 1 and mask is None and not is_causal:
        # Decoding (every query sees every key): fold the heads that share a K/V group into the query axis,
        # so each group's keys are read once instead of being copied per head.
        grouped = query.reshape(batch, key.shape[1], groups * seq, head_dim)
        out = F.scaled_dot_product_attention(grouped, key, value, dropout_p=dropout_p, scale=scale)
        return out.view(batch, num_heads, seq, head_dim).transpose(1, 2).flatten(2)
    if groups > 1 and not _SDPA_HAS_GQA:
        # Query head h reads K/V group h // groups (consecutive heads share a group).
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    gqa = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **gqa
    )
    return out.transpose(1, 2).flatten(2)


# torch >= 2.5 lets SDPA read grouped K/V heads directly (enable_gqa).
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
