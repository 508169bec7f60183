"""CUDA weight extraction: our own kernels (csrc/qextract.cu) compiled at run time with NVRTC and launched through
``cpm_kernels``' module loader, the same runtime the original used, but from source and for the GPU actually
present, so there is no fixed list of architectures and every output dtype (fp16, bf16, fp32) exists.

The kernels only turn the packed weight into a float matrix; the matmul is cuBLAS via ``F.linear``. If
``cpm_kernels`` is missing, NVRTC is missing, compilation fails, or the first launch disagrees with the
PyTorch reference, we warn once and dequantize with PyTorch ops on the GPU instead (see ``torch_dequantize``),
which works for every dtype. Nothing CUDA-related is imported until a CUDA tensor reaches this module.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from .format import dequantize_weight

__all__ = ["dequantize_cuda", "status", "reset"]

SOURCE = Path(__file__).with_name("csrc") / "qextract.cu"
_DTYPE_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
_THREADS = 256

_lock = threading.Lock()
# per device index: a dict of kernel functions, or None when the NVRTC path is unusable on that device
_kernels: dict[int, dict[str, Any] | None] = {}
_errors: dict[int, str] = {}


def _compile_ptx(arch: str) -> bytes:
    from cpm_kernels.library import nvrtc  # imported here: it loads CUDA libraries

    prog = nvrtc.nvrtcProgram()
    nvrtc.nvrtcCreateProgram(prog, SOURCE.read_text(), "qextract.cu", 0, [], [])
    try:
        nvrtc.nvrtcCompileProgram(prog, 2, [f"--gpu-architecture={arch}", "-default-device"])
        size = nvrtc.nvrtcGetPTXSize(prog)
        buf = ctypes.create_string_buffer(size)
        nvrtc.nvrtcGetPTX(prog, buf)
        return buf.raw  # NUL-terminated PTX: the driver JIT-compiles it for this exact GPU
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _build(device: torch.device) -> dict[str, Any]:
    from cpm_kernels.kernels.base import KernelFunction, LazyKernelCModule

    major, minor = torch.cuda.get_device_capability(device)
    ptx = _compile_ptx(f"compute_{major}{minor}")
    module = LazyKernelCModule(ptx)
    names = [f"qextract_int{b}_{s}" for b in (4, 8) for s in _DTYPE_SUFFIX.values()]
    return {name: KernelFunction(module, name) for name in names}


def _launch(fns: dict[str, Any], qweight: torch.Tensor, scale_f32: torch.Tensor, bits: int,
            dtype: torch.dtype) -> torch.Tensor:
    n, m = qweight.shape
    out = torch.empty(n, m * 8 // bits, dtype=dtype, device=qweight.device)
    fn = fns[f"qextract_int{bits}_{_DTYPE_SUFFIX[dtype]}"]
    with torch.cuda.device(qweight.device):
        stream = torch.cuda.current_stream().cuda_stream
        fn((n, 1, 1), (_THREADS, 1, 1), 0, stream, [
            ctypes.c_void_p(qweight.data_ptr()), ctypes.c_void_p(scale_f32.data_ptr()),
            ctypes.c_void_p(out.data_ptr()), ctypes.c_int32(n), ctypes.c_int32(m),
        ])
    return out


def _get(device: torch.device) -> dict[str, Any] | None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _kernels:
        return _kernels[index]
    with _lock:
        if index not in _kernels:
            try:
                with torch.cuda.device(index):
                    fns = _build(torch.device("cuda", index))
                    # Self-check on a small tensor with odd sizes before trusting the kernels with a model.
                    for bits in (4, 8):
                        q = torch.randint(-128, 128, (3, 10), dtype=torch.int8, device=f"cuda:{index}")
                        s = torch.rand(3, device=f"cuda:{index}")
                        for dt in _DTYPE_SUFFIX:
                            got = _launch(fns, q, s, bits, dt)
                            want = dequantize_weight(q, s, bits, dtype=dt)
                            if not torch.equal(got, want):
                                raise RuntimeError(f"self-check failed for int{bits} -> {dt}")
                _kernels[index] = fns
            except Exception as exc:  # noqa: BLE001 - any failure: use the PyTorch dequantization
                _kernels[index] = None
                _errors[index] = str(exc)
                warnings.warn(f"chatglm quantization: CUDA extraction kernels unavailable on cuda:{index}, "
                              f"dequantizing with PyTorch ops instead ({exc})", RuntimeWarning, stacklevel=4)
    return _kernels[index]


def dequantize_cuda(qweight: torch.Tensor, scale_f32: torch.Tensor, bits: int, dtype: torch.dtype,
                    use_kernels: bool = True) -> torch.Tensor:
    """Float [out, in] weight on the GPU; NVRTC kernels when usable, PyTorch ops otherwise."""
    fns = _get(qweight.device) if use_kernels else None
    if fns is None or dtype not in _DTYPE_SUFFIX:
        return dequantize_weight(qweight, scale_f32, bits, dtype=dtype)
    return _launch(fns, qweight.contiguous(), scale_f32.contiguous(), bits, dtype)


def status() -> dict[int, str]:
    """Per CUDA device tried so far: 'nvrtc' if the compiled kernels are in use, else the failure reason."""
    return {i: ("nvrtc" if k is not None else _errors.get(i, "unavailable")) for i, k in _kernels.items()}


def reset() -> None:
    with _lock:
        _kernels.clear()
        _errors.clear()
