"""Build, cache and call the C CPU kernel (csrc/qlinear_cpu.c) through ctypes.

The shared library is compiled on first use and cached per user under
``$CHATGLM_KERNEL_CACHE`` or ``~/.cache/chatglm/kernels/<key>/`` where the key hashes the source, the compiler's
version line and the flags, so a compiler upgrade or an edited kernel rebuilds and two versions never clash.
No ``-march`` flag is used: the vector paths are selected at run time inside the library, so a cache shared
by machines with different CPUs stays valid.

Anything that goes wrong (no compiler, compile error, unwritable cache, load error) produces ONE warning and
``load()`` returns None; callers then use the PyTorch path. Nothing here runs at import time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["load", "available", "reset", "compiler", "qlinear", "dequantize_rows", "quantize", "set_num_threads",
           "get_num_threads", "activation_block"]

SOURCE = Path(__file__).with_name("csrc") / "qlinear_cpu.c"
_LIB_NAME = "libchatglm_qlinear.so"
# -O3 for the scalar paths, -fopenmp for the row-parallel loops; vector ISAs come from target attributes.
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c11", "-fno-math-errno"]
_OPENMP_FLAGS = ["-fopenmp"]

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "lib": None, "error": None}
_num_threads: int | None = None


def compiler() -> str | None:
    """The C compiler to use: $CHATGLM_KERNEL_CC, else $CC, else gcc / cc on PATH."""
    for name in (os.environ.get("CHATGLM_KERNEL_CC"), os.environ.get("CC")):
        if name:
            return name  # honour an explicit choice even if it does not exist: the build then fails loudly once
    for name in ("gcc", "cc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cache_root() -> Path:
    env = os.environ.get("CHATGLM_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chatglm" / "kernels"


def _compiler_version(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"`{cc} --version` failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0] if out.stdout else ""


def _compile(cc: str, flags: list[str], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: concurrent processes never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, str(SOURCE), "-o", tmp, "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()[-2000:]}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CHATGLM_KERNEL_CC)")
    version = _compiler_version(cc)
    source = SOURCE.read_bytes()
    errors = []
    # OpenMP first; a compiler without it (e.g. Apple clang) still gets a single-threaded kernel.
    for flags in (_FLAGS + _OPENMP_FLAGS, _FLAGS):
        key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(), sys.platform.encode()]))
        path = _cache_root() / key.hexdigest()[:20] / _LIB_NAME
        try:
            if not path.exists():
                try:
                    _compile(cc, flags, path)
                except OSError:
                    # Cache directory not writable: build into a private temporary directory instead.
                    path = Path(tempfile.mkdtemp(prefix="chatglm-kernels-")) / _LIB_NAME
                    _compile(cc, flags, path)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if flags is _FLAGS:
                warnings.warn("chatglm quantization: C kernel built without OpenMP; it will run single-threaded",
                              RuntimeWarning, stacklevel=4)
            return lib
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next flags, then fall back
            errors.append(str(exc))
    raise RuntimeError("\n".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.cglm_qlinear.argtypes = [p, i32, i64, i64, p, i32, p, p, p, i32, i64, i32]
    lib.cglm_qlinear.restype = i32
    lib.cglm_dequant.argtypes = [p, i32, p, i64, i64, i64, p, i32, i32]
    lib.cglm_dequant.restype = i32
    lib.cglm_quantize.argtypes = [p, i32, i64, i64, i32, p, p, i32]
    lib.cglm_quantize.restype = i32
    lib.cglm_isa.restype = i32
    lib.cglm_force_isa.argtypes = [i32]
    lib.cglm_openmp.restype = i32
    lib.cglm_activation_block.restype = i32


def load() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; None (after one warning) if that is impossible."""
    if _state["tried"]:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if not _state["tried"]:
            try:
                _state["lib"] = _build()
            except Exception as exc:  # noqa: BLE001
                _state["error"] = str(exc)
                warnings.warn(
                    "chatglm quantization: could not build the C CPU kernel, using the slower PyTorch path "
                    f"instead.\n{exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _state["tried"] = True
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """True if the C kernel can be used (builds it if needed)."""
    return load() is not None


def reset() -> None:
    """Forget the loaded library so the next call rebuilds/reloads (tests use it to exercise failures)."""
    with _lock:
        _state.update(tried=False, lib=None, error=None)


def activation_block() -> int:
    """Columns per int8 activation block of the fused (decode) path: its scale is the block's max |x| / 127."""
    lib = load()
    assert lib is not None
    return int(lib.cglm_activation_block())


def set_num_threads(n: int | None) -> None:
    """Threads used by the C kernel; None (default) follows torch.get_num_threads()."""
    global _num_threads
    if n is not None and n < 1:
        raise ValueError("thread count must be >= 1")
    _num_threads = n


def get_num_threads() -> int:
    return _num_threads if _num_threads is not None else torch.get_num_threads()


def qlinear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale_f32: torch.Tensor,
    bias_f32: torch.Tensor | None,
    bits: int,
    out_features: int,
) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias for a contiguous 2-D CPU x in fp32/bf16/fp16; y has x's dtype."""
    lib = load()
    assert lib is not None
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=x.dtype)
    code = _DTYPE_CODE[x.dtype]
    rc = lib.cglm_qlinear(
        x.data_ptr(), code, m, k, qweight.data_ptr(), bits, scale_f32.data_ptr(),
        None if bias_f32 is None else bias_f32.data_ptr(), y.data_ptr(), code, out_features, get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"cglm_qlinear failed with code {rc}")
    return y


def dequantize_rows(
    qweight: torch.Tensor, scale_f32: torch.Tensor, bits: int, in_features: int, start: int, stop: int,
    dtype: torch.dtype, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows [start, stop) of the dequantized weight as a [stop-start, in_features] tensor of ``dtype``."""
    lib = load()
    assert lib is not None
    if out is None:
        out = torch.empty(stop - start, in_features, dtype=dtype)
    rc = lib.cglm_dequant(qweight.data_ptr(), bits, scale_f32.data_ptr(), start, stop, in_features, out.data_ptr(),
                          _DTYPE_CODE[dtype], get_num_threads())
    if rc != 0:
        raise RuntimeError(f"cglm_dequant failed with code {rc}")
    return out


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C version of format.quantize_weight for a contiguous 2-D CPU fp32/bf16/fp16 weight (same bits)."""
    lib = load()
    assert lib is not None
    n, k = weight.shape
    q = torch.empty(n, k * bits // 8, dtype=torch.int8)
    scale = torch.empty(n, dtype=weight.dtype)
    rc = lib.cglm_quantize(weight.data_ptr(), _DTYPE_CODE[weight.dtype], n, k, bits, scale.data_ptr(),
                           q.data_ptr(), get_num_threads())
    if rc != 0:
        raise RuntimeError(f"cglm_quantize failed with code {rc}")
    return q, scale
