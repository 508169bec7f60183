"""One small interface over the matmul kernels for quantized weights, chosen at run time.

A kernel is a function ``(module, x2d) -> y2d`` computing ``x2d @ dequant(W)^T + bias`` for a 2-D input on the
module's device, returning x's dtype. The registered kernels:

``torch``  reference: dequantize the whole weight with PyTorch ops, then ``F.linear``. Always works (CPU, CUDA,
           MPS, any dtype); every other kernel is tested against it.
``cpu``    the C kernel (csrc/qlinear_cpu.c): fused unpack + dot product streaming each packed weight once for
           a few tokens; for long inputs, tiles of the weight are dequantized by C code and multiplied with
           PyTorch's float matmul (compute-bound, so the matmul library is what matters there).
``aten``   PyTorch's own packed CPU kernels ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``; the
           official layout is repacked into theirs on first use (a second copy of the weights, kept only
           while this kernel is selected).
``cuda``   NVRTC-compiled extraction kernels + cuBLAS, falling back to PyTorch dequantization on the GPU.

Inputs that need a gradient (P-tuning trains through the quantized layers) take the differentiable ``torch``
(CPU) or ``cuda`` path unless a kernel is forced.

Selection: ``set_kernel(name)`` or the environment variable ``CHATGLM_QUANT_KERNEL`` force one kernel
(``auto`` restores the default); a forced kernel that cannot run the given input raises instead of silently
measuring something else. Defaults, chosen by measurement on the 2-core AMD EPYC (Zen 4) machine of this
project (bench/README.md): CUDA tensors -> ``cuda``; CPU -> ``cpu`` when the C kernel builds (fused kernel
below PREFILL_MIN_ROWS rows: 2-3x faster than ``aten`` for one row; tiles above: 2-3x faster than ``aten`` for
512 rows), else ``aten`` when the op exists for this shape (far faster than dequantizing the whole weight),
else ``torch``; anything else (MPS, ...) -> ``torch``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import cpu_kernel
from .format import dequantize_weight, unpack_int4

if TYPE_CHECKING:
    from .linear import QuantizedLinear

__all__ = [
    "KERNEL_ENV",
    "KERNELS",
    "set_kernel",
    "get_kernel",
    "available_kernels",
    "select_kernel",
    "PREFILL_MIN_ROWS",
]

KERNEL_ENV = "CHATGLM_QUANT_KERNEL"
KernelFn = Callable[["QuantizedLinear", torch.Tensor], torch.Tensor]

# From this many input rows on, the CPU kernel switches from the fused dot product (memory-bound for one row,
# cost grows with every row) to dequantized tiles + float matmul (compute-bound, dequantization paid once).
# Crossover measured on the 27392 x 4096 MLP matrix (bench/bench_kernels.py --crossover, int8 activations):
# about 32-40 rows for int4 and 20-24 for int8.
PREFILL_MIN_ROWS = {4: 32, 8: 24}
# Output rows per dequantized tile in the prefill path: big enough for an efficient matmul, small enough that
# the scratch tile (rows x in_features in bf16/fp32) stays a few MB instead of a full float weight.
_TILE_ROWS = 1024

_forced: str | None = None


def set_kernel(name: str | None) -> None:
    """Force a kernel for every QuantizedLinear ("torch", "cpu", "aten", "cuda"); None or "auto": default."""
    global _forced
    if name is not None and name != "auto" and name not in KERNELS:
        raise ValueError(f"unknown quantized kernel {name!r}; choose from auto, {', '.join(KERNELS)}")
    _forced = None if name in (None, "auto") else name


def get_kernel() -> str:
    """The forced kernel name, or "auto"."""
    if _forced is not None:
        return _forced
    env = os.environ.get(KERNEL_ENV, "").strip().lower()
    if env and env != "auto":
        if env not in KERNELS:
            raise ValueError(f"{KERNEL_ENV}={env!r} is not one of auto, {', '.join(KERNELS)}")
        return env
    return "auto"


# --------------------------------------------------------------------------------------------------------
# torch reference


def torch_linear(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    w = dequantize_weight(module.weight, module.weight_scale, module.bits, dtype=x.dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.linear(x, w, bias)


# --------------------------------------------------------------------------------------------------------
# C kernel


def _cpu_ok(module: QuantizedLinear, x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16) \
        and cpu_kernel.available()


def cpu_linear(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    if x.shape[0] < PREFILL_MIN_ROWS[module.bits]:
        scale, bias = module._f32_scale_and_bias()
        return cpu_kernel.qlinear(x, module.weight, scale, bias, module.bits, module.out_features)
    return cpu_linear_tiles(module, x)


def cpu_linear_tiles(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """Prefill path of the C kernel: dequantize row tiles of W with C code, multiply with PyTorch's matmul."""
    scale, bias = module._f32_scale_and_bias()
    # Long input: compute-bound. bf16 matmul (oneDNN) is ~2.7x faster than fp32 on CPUs with bf16 support, and
    # the model already runs in bf16 then; fp32 inputs keep fp32; fp16 matmul on CPU is slow, so fp16 inputs
    # are multiplied in fp32 and rounded back.
    compute = torch.float32 if x.dtype == torch.float16 else x.dtype
    xc = x.to(compute)
    y = torch.empty(x.shape[0], module.out_features, dtype=compute)
    tile = torch.empty(min(_TILE_ROWS, module.out_features), module.in_features, dtype=compute)
    for start in range(0, module.out_features, _TILE_ROWS):
        stop = min(start + _TILE_ROWS, module.out_features)
        w = cpu_kernel.dequantize_rows(module.weight, scale, module.bits, module.in_features, start, stop,
                                       compute, out=tile[: stop - start])
        torch.matmul(xc, w.t(), out=y[:, start:stop])
    if bias is not None:
        y += bias.to(compute)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------------
# PyTorch packed CPU ops


def _aten_group_size(in_features: int) -> int | None:
    for g in (256, 128, 64, 32):
        if in_features % g == 0:
            return g
    return None


def _aten_ok(module: QuantizedLinear, x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    # Shape limits found by testing torch 2.13: the bf16 int8 op reads out of bounds (wrong results or a
    # segfault) when in_features is not a multiple of 64; the int4 packing needs out_features % 16 == 0.
    if module.bits == 8:
        return hasattr(torch.ops.aten, "_weight_int8pack_mm") and module.in_features % 64 == 0
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and module.out_features % 16 == 0
            and _aten_group_size(module.in_features) is not None)


def _aten_cache(module: QuantizedLinear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    def build() -> tuple[torch.Tensor, torch.Tensor, int]:
        scale = module.weight_scale.detach().to(dtype)
        if module.bits == 8:
            return module.weight, scale, 0
        group = _aten_group_size(module.in_features)
        assert group is not None
        # The op dequantizes (u - 8) * scale + zero per group; our q + 8 with a zero of 0 and the row scale
        # repeated for every group of the row is exactly q * scale.
        u = (unpack_int4(module.weight).to(torch.int32) + 8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
        groups = module.in_features // group
        sz = torch.stack([scale.expand(groups, -1), torch.zeros(groups, module.out_features, dtype=dtype)], -1)
        return packed, sz.contiguous(), group

    return module.cached(f"aten-{dtype}", (module.weight, module.weight_scale), build)  # type: ignore[return-value]


def aten_linear(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    packed, sz, group = _aten_cache(module, x.dtype)
    x = x.contiguous()
    if module.bits == 8:
        y = torch.ops.aten._weight_int8pack_mm(x, packed, sz)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y


# --------------------------------------------------------------------------------------------------------
# CUDA


def _cuda_ok(module: QuantizedLinear, x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def cuda_linear(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    from .cuda_kernel import dequantize_cuda  # CUDA-only code stays unimported on CPU machines

    scale, _ = module._f32_scale_and_bias()
    w = dequantize_cuda(module.weight, scale, module.bits, x.dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.linear(x, w, bias)


# --------------------------------------------------------------------------------------------------------

KERNELS: dict[str, tuple[Callable[[QuantizedLinear, torch.Tensor], bool], KernelFn]] = {
    "torch": (lambda m, x: True, torch_linear),
    "cpu": (_cpu_ok, cpu_linear),
    "aten": (_aten_ok, aten_linear),
    "cuda": (_cuda_ok, cuda_linear),
}


def available_kernels(module: QuantizedLinear, x: torch.Tensor) -> list[str]:
    """Names of the kernels that can run ``module`` on input ``x`` here (may build the C kernel)."""
    return [name for name, (ok, _) in KERNELS.items() if ok(module, x)]


def select_kernel(module: QuantizedLinear, x: torch.Tensor) -> KernelFn:
    """The kernel to use for this module and 2-D input (forced one, else the measured default)."""
    name = get_kernel()
    if name != "auto":
        ok, fn = KERNELS[name]
        if not ok(module, x):
            raise RuntimeError(f"quantized kernel {name!r} cannot run int{module.bits} on a {x.dtype} "
                               f"{x.device.type} input here")
        return fn
    if x.device.type == "cuda":
        return cuda_linear
    if x.requires_grad and torch.is_grad_enabled():
        # The C and aten kernels have no backward; P-tuning trains through quantized layers (gradients flow
        # to the input only), which the dequantize + F.linear path provides.
        return torch_linear
    if x.device.type == "cpu":
        for candidate in ("cpu", "aten"):
            ok, fn = KERNELS[candidate]
            if ok(module, x):
                return fn
    return torch_linear
