"""The official ChatGLM weight-only quantization format, in plain PyTorch.

Layout (spec/checkpoints.md §4):

* one scale per output row: ``scale[o] = max_i |W[o, i]| / (2**(bits-1) - 1)``, i.e. /127 or /7, stored in the
  model dtype under ``<linear>.weight_scale``;
* ``q = round(W / scale[:, None])`` (round half to even, as ``torch.round``), stored as int8 under
  ``<linear>.weight`` with shape ``[out, in * bits // 8]``;
* int4 packs two values per byte: the HIGH nibble holds the even column ``2j``, the LOW nibble the odd column
  ``2j + 1``, both signed 4-bit two's complement.

The functions here are the reference every kernel is tested against. They never touch CUDA-only code, so they
work on CPU, CUDA and MPS tensors alike.
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_BITS",
    "check_bits",
    "packed_in_features",
    "compute_scale",
    "quantize_weight",
    "quantize_weight_torch",
    "dequantize_weight",
    "pack_int4",
    "unpack_int4",
    "unpack_weight",
]

SUPPORTED_BITS = (4, 8)

# Rows quantized per step by the PyTorch path: bounds the fp32 temporaries to ~16 MB each even for the
# 27392 x 4096 MLP weight, which keeps quantize-on-load within its memory budget.
_ROW_CHUNK = 1024


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is 4 or 8, else raise ValueError."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"weight-only quantization supports bits=4 or bits=8, got {bits!r}")
    return int(bits)


def packed_in_features(in_features: int, bits: int) -> int:
    """Number of int8 columns that store ``in_features`` values at ``bits`` bits."""
    check_bits(bits)
    if bits == 4 and in_features % 2:
        # The official layout has no padding rule for an odd column count; refuse rather than invent one.
        raise ValueError(f"int4 packing needs an even in_features, got {in_features}")
    return in_features * bits // 8


def compute_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-row scale ``max|W[o]| / qmax`` in ``weight.dtype``.

    The original ran ``absmax / 7`` on CUDA, where dividing by a Python number is done as a multiplication by the
    fp32 reciprocal and the product is rounded once to the tensor dtype. We do exactly that, on any device, so a
    CPU run reproduces the shipped tensors. (For fp16/bf16 the fp32 quotient and the fp32 reciprocal product
    round to the same value anyway; for fp32 weights they can differ in the last bit, and we follow CUDA.)
    """
    qmax = 2 ** (check_bits(bits) - 1) - 1
    absmax = weight.abs().amax(dim=-1)
    # 1.0f / qmax as one IEEE fp32 division (not a double rounded to float), like `opmath_t(1.0) / b` in ATen.
    inv = torch.ones((), dtype=torch.float32, device=weight.device) / qmax
    return (absmax.to(torch.float32) * inv).to(weight.dtype)


def _quantize_rows(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    # True division in fp32 rounded to the weight dtype, then round-half-even in that dtype: the order of
    # roundings the original's fp16 CUDA ops performed. Rounding first to fp16 matters: 2.4998 can become 2.5.
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero rows: q = 0, not NaN
    q = (weight.to(torch.float32) / safe.to(torch.float32)[:, None]).to(weight.dtype)
    q = torch.round(q)
    # No-op for fp16 (|q| <= qmax there) but a bf16 quotient can round up to 127.5 -> 128, which would wrap.
    q = q.clamp_(-qmax, qmax)
    return q.to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] of shape [..., 2n] into [..., n]: high nibble = even column, low = odd."""
    if q.shape[-1] % 2:
        raise ValueError("pack_int4 needs an even number of columns")
    q = q.to(torch.int16)  # int16 so the shift and the masks never overflow or sign-smear
    hi = (q[..., 0::2] & 0xF) << 4
    lo = q[..., 1::2] & 0xF
    packed = hi | lo  # 0..255
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 [..., n] -> int8 [..., 2n] with values in [-8, 7]."""
    p = packed.to(torch.int8)
    hi = p >> 4  # arithmetic shift of the signed byte sign-extends the high nibble
    lo = (p << 4) >> 4  # move the low nibble up, then sign-extend it back down
    return torch.stack((hi, lo), dim=-1).flatten(-2)


def unpack_weight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored int8 tensor as one int8 value per weight, shape [out, in]."""
    return unpack_int4(qweight) if check_bits(bits) == 4 else qweight


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight [out, in] into the official layout.

    Returns ``(q_packed, scale)``: int8 ``[out, in * bits // 8]`` and ``[out]`` in ``weight.dtype``. Bit-for-bit
    equal to the original's tensors when ``weight`` is fp16. CPU tensors go through the C kernel when it is
    available (same bits, much faster, no temporaries); otherwise PyTorch ops run row-chunk by row-chunk so
    the fp32 temporaries stay small.
    """
    bits = check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {weight.dtype}")
    out_features, in_features = weight.shape
    packed_cols = packed_in_features(in_features, bits)
    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and _use_c_quantizer():
        from . import cpu_kernel

        return cpu_kernel.quantize(weight.contiguous(), bits)
    return quantize_weight_torch(weight, bits, packed_cols)


def _use_c_quantizer() -> bool:
    from . import cpu_kernel

    return _C_QUANTIZER_ENABLED and cpu_kernel.available()


# Tests switch this off to compare the C quantizer with the PyTorch one.
_C_QUANTIZER_ENABLED = True


def quantize_weight_torch(weight: torch.Tensor, bits: int, packed_cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch implementation of :func:`quantize_weight` (any device)."""
    out_features, in_features = weight.shape
    packed_cols = packed_cols or packed_in_features(in_features, bits)
    packed = torch.empty(out_features, packed_cols, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_features, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        for start in range(0, out_features, _ROW_CHUNK):
            stop = min(start + _ROW_CHUNK, out_features)
            rows = weight[start:stop]
            scale[start:stop] = compute_scale(rows, bits)  # per chunk: no full-size |W| temporary
            q = _quantize_rows(rows, scale[start:stop], bits)
            packed[start:stop] = pack_int4(q) if bits == 4 else q
    return packed, scale


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``q * scale[:, None]`` as a float [out, in] tensor (``dtype`` defaults to the scale's dtype).

    The product is formed in fp32 and rounded once, so it is exact for int8 values times any fp16/bf16 scale
    whenever the result is representable — the same numbers the original's extraction kernels produce.
    """
    dtype = dtype or scale.dtype
    q = unpack_weight(qweight, bits)
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)
