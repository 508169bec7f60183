"""Weight-only int8/int4 quantization in the official ChatGLM format, with CPU, CUDA and PyTorch kernels.

Public API::

    quantize_weight(w, bits) -> (q_packed, scale)      # official layout, bit-exact for fp16 weights
    dequantize_weight(q, scale, bits, dtype=None)      # the reference every kernel is tested against
    QuantizedLinear(in_features, out_features, bits, bias=True, dtype=None, device=None)
    QuantizedLinear.from_linear(linear, bits); module.load_float_weight(w); module.post_load()
    quantize_model(model, bits, module_filter=None, empty_init=False)
    set_kernel("auto" | "torch" | "cpu" | "aten" | "cuda")   # or env CHATGLM_QUANT_KERNEL
    set_num_threads(n | None)                                 # C kernel threads; None follows torch

Importing this package loads no CUDA library and compiles nothing: the C kernel is built on first CPU use,
CUDA code is touched only when a CUDA tensor arrives.
"""

from .cpu_kernel import get_num_threads, set_num_threads
from .format import (
    SUPPORTED_BITS,
    compute_scale,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
    unpack_weight,
)
from .kernels import KERNEL_ENV, available_kernels, get_kernel, set_kernel
from .linear import DEFAULT_TARGETS, QuantizedLinear, default_module_filter, quantize_model

__all__ = [
    "DEFAULT_TARGETS",
    "KERNEL_ENV",
    "SUPPORTED_BITS",
    "QuantizedLinear",
    "available_kernels",
    "compute_scale",
    "default_module_filter",
    "dequantize_weight",
    "get_kernel",
    "get_num_threads",
    "pack_int4",
    "quantize_model",
    "quantize_weight",
    "set_kernel",
    "set_num_threads",
    "unpack_int4",
    "unpack_weight",
]
