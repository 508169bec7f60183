"""Reading and writing checkpoints in the official layout, one shard at a time.

The model is built on the meta device (no memory), then each shard is opened memory-mapped, its
tensors are checked against the model's own names and shapes, cast and moved into place, and the
shard is released before the next one is opened. Peak memory is therefore the model plus one shard,
never two copies of the model. Quantization hooks in here too: a float checkpoint loaded with
`quantize=4|8` is quantized tensor by tensor as it streams in.

Real-checkpoint quirks handled here (spec/checkpoints.md): ChatGLM-6B stores LayerNorm tensors in fp32
and an index whose `total_size` is stale; both generations store `inv_freq` buffers that are recomputed
instead of trusted; ChatGLM-6B stores `lm_head.weight` although it is the word embedding matrix.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configuration_chatglm import ChatGLMConfig

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

_PREFIX_ENCODER = "transformer.prefix_encoder."

# Recomputed at load time; the stored copies are rounded (fp16) and carry no information.
_RECOMPUTED_SUFFIXES = (".inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the tensor at fault."""


# -- locating files -------------------------------------------------------------------------------------------


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder as is; otherwise a Hugging Face Hub repo id downloaded (or found in the hub cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name} is not a local folder, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=["*.json", "*.model", "*.safetensors", "*.bin", "*.txt"],
        )
    except Exception as exc:  # the hub client raises many types; the message says which
        raise CheckpointError(
            f"{name} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Download it first (e.g. `git clone https://huggingface.co/{name}`) "
            "and pass the folder."
        ) from exc
    return Path(folder)


def checkpoint_files(folder: Path) -> list[tuple[Path, set[str] | None]]:
    """The weight files to read, in order, each with the tensor names its index says it holds (or None)."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid shard index ({exc})") from exc
            by_file: dict[str, set[str]] = {}
            for key, file_name in weight_map.items():
                by_file.setdefault(file_name, set()).add(key)
            files = []
            for file_name in sorted(by_file):
                shard = folder / file_name
                if not shard.is_file():
                    raise CheckpointError(
                        f"{shard} is listed in {index_path.name} (for {len(by_file[file_name])} tensors, e.g. "
                        f"{sorted(by_file[file_name])[0]}) but does not exist; the download is incomplete"
                    )
                files.append((shard, by_file[file_name]))
            return files
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (folder / single).is_file():
            return [(folder / single, None)]
    raise CheckpointError(
        f"{folder} holds no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
    )


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one weight file, memory-mapped; errors name the file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
            return
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot be read ({type(exc).__name__}: {exc}); the file is truncated or corrupt, download it again"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    try:
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{path}: entry {key} is a {type(tensor).__name__}, not a tensor")
            yield key, tensor
    finally:
        del state


def release_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel a memory-mapped, contiguous source tensor will not be read again, so its file pages
    leave our RSS.

    A .bin checkpoint is one mapping; without this, every page read stays counted until the whole file is
    closed, and loading a 3.9 GB int4 file would peak at the file plus the model (≈ 8 GB instead of ≈ 4).
    """
    if _libc is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    first = -(-start // _PAGE) * _PAGE  # only whole pages inside the tensor; neighbours may still be needed
    last = (start + tensor.numel() * tensor.element_size()) // _PAGE * _PAGE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def copy_releasing_source(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Copy (and cast) a memory-mapped tensor block by block, dropping each source block once copied, so a
    large matrix never exists twice in memory (the 0.5 GB embedding of a 6B model, say)."""
    out = torch.empty(tensor.shape, dtype=dtype, device=device)
    if tensor.dim() == 0 or not tensor.is_contiguous():
        out.copy_(tensor)
        return out
    rows_per_block = max(1, (64 << 20) // max(1, tensor[0].numel() * tensor.element_size()))
    for begin in range(0, tensor.shape[0], rows_per_block):
        block = tensor[begin : begin + rows_per_block]
        out[begin : begin + rows_per_block].copy_(block)
        release_pages(block)
    return out


def _load_libc():  # noqa: ANN202
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4


# -- choosing classes, dtypes and devices -------------------------------------------------------------------


def model_class_for(config: ChatGLMConfig) -> type:
    from .modeling_glm import GLMForConditionalGeneration
    from .modeling_glm2 import GLM2ForConditionalGeneration

    return GLMForConditionalGeneration if config.version == 1 else GLM2ForConditionalGeneration


def resolve_dtype(dtype: Any, config: ChatGLMConfig, device: torch.device) -> torch.dtype:
    """An explicit dtype wins. "auto"/None: the checkpoint's dtype, except fp16 on CPU becomes bf16
    (CPU fp16 matmuls are slow and the model is 12 GB either way; fp32 would need 25 GB)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        return resolved
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(stored, str):
        stored = getattr(torch, stored)
    if device.type == "cpu" and stored == torch.float16:
        return torch.bfloat16
    return stored


def resolve_device(device: Any) -> torch.device:
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


# -- loading ----------------------------------------------------------------------------------------------------


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if name in module._parameters:
        old = module._parameters[name]
        requires_grad = bool(old.requires_grad) and tensor.is_floating_point()
        module._parameters[name] = nn.Parameter(tensor, requires_grad=requires_grad)
    else:
        module._buffers[name] = tensor


def _materialize_remaining(model: nn.Module, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Build buffers that are recomputed rather than loaded; return the names of tensors still missing."""
    missing = []
    for module_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if hasattr(module, "reset_buffers"):
                    module.reset_buffers(device)
                else:
                    missing.append(f"{module_name}.{name}")
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                missing.append(f"{module_name}.{name}" if module_name else name)
    return missing


def load_state_into(
    model: nn.Module,
    files: list[tuple[Path, set[str] | None]],
    *,
    dtype: torch.dtype,
    device: torch.device,
    skip: set[str] = frozenset(),
) -> None:
    """Stream every file's tensors into the meta-built `model`, checking names and shapes as they come."""
    expected = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
    seen: dict[str, Path] = {}
    for path, listed in files:
        found_in_file = set()
        for key, tensor in read_tensors(path):
            found_in_file.add(key)
            if key.endswith(_RECOMPUTED_SUFFIXES) and key in expected:
                continue
            if key in skip:
                continue
            if key not in expected:
                raise CheckpointError(
                    f"{path}: unexpected tensor {key} {tuple(tensor.shape)}; this checkpoint does not match the "
                    f"config (version {model.config.version}, {model.config.num_layers} layers)"
                )
            if key in seen:
                raise CheckpointError(f"{path}: tensor {key} was already loaded from {seen[key]}")
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            target = expected[key]
            loads_float = getattr(module, "load_float_weight", None)
            if loads_float is not None and attr == "weight" and tensor.is_floating_point():
                # Quantize while loading: the float matrix only lives for the duration of this call.
                if tuple(tensor.shape) != (module.out_features, module.in_features):
                    raise CheckpointError(
                        f"{path}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                        f"{(module.out_features, module.in_features)} for this config"
                    )
                # In the checkpoint's own dtype: quantizing the fp16 values reproduces the official int tensors.
                loads_float(tensor.to(device=device))
            else:
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"{path}: tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)} "
                        "for this config"
                    )
                if not tensor.is_floating_point() and target.dtype != tensor.dtype:
                    raise CheckpointError(
                        f"{path}: tensor {key} is {tensor.dtype}, expected {target.dtype} (a quantized checkpoint "
                        "must be loaded with the quantization_bit it was saved with)"
                    )
                value_dtype = dtype if tensor.is_floating_point() else tensor.dtype
                if path.suffix == ".bin":  # file-backed (torch.load mmap): copy in blocks, releasing the source
                    value = copy_releasing_source(tensor, value_dtype, device)
                else:
                    value = tensor.to(device=device, dtype=value_dtype, copy=True)
                _set_tensor(module, attr, value)
            if path.suffix == ".bin":  # torch.load(mmap=True) tensors are file-backed; re-reads stay correct
                release_pages(tensor)
            seen[key] = path
        if listed is not None:
            absent = listed - found_in_file
            if absent:
                raise CheckpointError(
                    f"{path}: the index lists {len(absent)} tensors that the file does not hold, e.g. {sorted(absent)[0]}"
                )
    if hasattr(model, "tie_lm_head"):
        model.tie_lm_head()
    missing = _materialize_remaining(model, device, dtype)
    if missing and all(name.startswith(_PREFIX_ENCODER) for name in missing):
        # A base checkpoint loaded with pre_seq_len: the P-tuning prefix starts fresh (fp32, trainable).
        from .modeling_utils import PrefixEncoder

        model.transformer.prefix_encoder = PrefixEncoder(model.config).to(device=device, dtype=torch.float32)
        missing = []
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(
            f"checkpoint ({', '.join(p.name for p, _ in files)}) lacks {len(missing)} tensors the model needs: {shown}"
        )


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    model_class: type | None = None,
    config: ChatGLMConfig | None = None,
    dtype: Any = None,
    torch_dtype: Any = None,
    device: Any = None,
    device_map: Any = None,
    quantize: int | None = None,
    quantization_bit: int | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a ChatGLM / ChatGLM2 model from a checkpoint folder or hub id.

    Args:
        name_or_path: folder with config.json and weights (sharded or not, .bin or .safetensors), or a hub id.
        model_class: the class asked for; the generic entry points pick the right version from the config.
        dtype: torch dtype or name; default: the checkpoint's (fp16 → bf16 on CPU).
        device: where the weights go as they are read ("cpu", "cuda", "cuda:1", "mps"); default CPU,
            or the single device of a string `device_map`. A dict `device_map` spreads layers over devices
            with accelerate after loading.
        quantize: 4 or 8 to quantize a float checkpoint while it loads (weight-only, the official format).
    Config fields can be overridden by keyword (e.g. pre_seq_len=128), as with transformers.
    """
    # Arguments transformers' Auto classes and callers of the original pass along; none changes how we load.
    for ignored in ("trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "_from_auto", "_from_pipeline",
                    "_commit_hash", "attn_implementation", "resume_download", "force_download", "proxies",
                    "subfolder", "adapter_kwargs", "adapter_name", "code_revision", "empty_init"):
        kwargs.pop(ignored, None)
    folder = resolve_model_dir(
        name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
    )
    if config is None:
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder} has no config.json")
        try:
            config = ChatGLMConfig.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{config_path}: {exc}") from exc
    config_overrides = {k: kwargs.pop(k) for k in list(kwargs) if hasattr(config, k)}
    if kwargs:
        raise TypeError(f"from_pretrained() got unexpected arguments: {sorted(kwargs)}")
    for key, value in config_overrides.items():
        setattr(config, key, value)

    quantize = quantize or quantization_bit or None
    stored_bits = config.quantization_bit or 0
    if quantize and stored_bits and quantize != stored_bits:
        raise CheckpointError(
            f"{folder} holds int{stored_bits} weights; they cannot be re-quantized to int{quantize}"
        )
    if quantize not in (None, 4, 8):
        raise ValueError(f"quantize must be 4 or 8, got {quantize!r}")

    dispatch_map = device_map if isinstance(device_map, dict) else None
    if isinstance(device_map, (str, torch.device)) and device is None and device_map != "auto":
        device = device_map
    target_device = resolve_device(device) if device is not None or device_map == "auto" else torch.device("cpu")
    target_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config, target_device)

    cls = model_class if model_class is not None and model_class.__name__ != "ChatGLMForConditionalGeneration" else None
    cls = cls or model_class_for(config)
    files = checkpoint_files(folder)
    with torch.device("meta"):
        model = cls(config)
    bits = stored_bits or quantize
    if bits:
        from .quantization import quantize_model

        # Empty quantized modules: int8 tensors load into them directly, float ones are quantized on arrival.
        quantize_model(model, bits, empty_init=True)
        model.config.quantization_bit = bits
    skip = {"lm_head.weight"} if config.version == 1 and config.tie_word_embeddings else set()
    load_state_into(model, files, dtype=target_dtype, device=target_device, skip=skip)
    for module in model.modules():
        post_load = getattr(module, "post_load", None)
        if callable(post_load) and module is not model:
            post_load()
    model.config.dtype = target_dtype
    model.eval()
    if dispatch_map is not None:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=dispatch_map)
    logger.info("loaded %s (ChatGLM%s, %s, %s)", folder, "" if config.version == 1 else "2", target_dtype, target_device)
    return model


# -- saving -----------------------------------------------------------------------------------------------------


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    is_main_process: bool = True,
    **_: Any,
) -> None:
    """Write config.json and the weights (safetensors by default), sharded with an index above `max_shard_size`.

    Tied tensors (ChatGLM-6B's lm_head) are written under both names, as in the official checkpoint.
    """
    if not is_main_process:
        return
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    first_float = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config.dtype = first_float
    config.architectures = ["ChatGLMModel"]
    config.save_pretrained(str(folder))
    tensors = state_dict if state_dict is not None else model.state_dict()
    stored: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        pointer = tensor.untyped_storage().data_ptr()
        # safetensors refuses shared storage; a tied tensor is written as its own copy.
        stored[key] = tensor.clone().contiguous() if pointer in seen_storage else tensor.contiguous()
        seen_storage.add(pointer)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in stored.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    for stale in list(folder.glob("model*.safetensors")) + list(folder.glob("pytorch_model*.bin")):
        stale.unlink()
    for stale_index in (SAFE_INDEX, BIN_INDEX):
        (folder / stale_index).unlink(missing_ok=True)
    suffix = "safetensors" if safe_serialization else "bin"
    stem = "model" if safe_serialization else "pytorch_model"
    names = (
        [f"{stem}.{suffix}"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{suffix}" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(shard, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in stored.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        (folder / (SAFE_INDEX if safe_serialization else BIN_INDEX)).write_text(json.dumps(index, indent=2))


def official_storage_dtype(key: str, tensor_dtype: torch.dtype, version: int) -> torch.dtype:
    """The dtype the published checkpoints store a tensor in: fp16, except ChatGLM-6B's LayerNorms (fp32)
    and quantized int8 tensors."""
    if not tensor_dtype.is_floating_point:
        return tensor_dtype
    if version == 1 and "layernorm" in key:
        return torch.float32
    return torch.float16


def write_official_layout(
    folder: str | os.PathLike,
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
    make_tensor: Any,
    *,
    num_shards: int,
    index_total_size: int | None = None,
) -> None:
    """Write `pytorch_model-0000i-of-0000N.bin` shards plus `pytorch_model.bin.index.json`, as THUDM did.

    shapes: tensor name -> (shape, stored dtype), in checkpoint order; make_tensor(name) builds each tensor
    when its shard is written, so a 6B-shaped checkpoint never sits in memory whole. Shards are balanced
    by bytes and a layer may straddle two shards, like the real ones. index_total_size lets a caller
    reproduce a stale total (ChatGLM-6B's index still counts its pre-2023-04 vocabulary).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {key: math.prod(shape) * torch.empty((), dtype=dtype).element_size() for key, (shape, dtype) in shapes.items()}
    total = sum(sizes.values())
    target = total / num_shards
    groups: list[list[str]] = [[]]
    acc = 0
    for key in shapes:
        if groups[-1] and acc >= target * len(groups) and len(groups) < num_shards:
            groups.append([])
        groups[-1].append(key)
        acc += sizes[key]
    while len(groups) < num_shards:
        # Too few tensors to fill every shard by size: split the largest group.
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        half = max(1, len(groups[largest]) // 2)
        groups.insert(largest + 1, groups[largest][half:])
        groups[largest] = groups[largest][:half]
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        shard = {}
        for key in keys:
            shape, dtype = shapes[key]
            tensor = make_tensor(key)
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"make_tensor({key}) returned shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            shard[key] = tensor.to(dtype).contiguous()
            weight_map[key] = name
        torch.save(shard, folder / name)
        del shard
    index = {"metadata": {"total_size": index_total_size or total}, "weight_map": weight_map}
    (folder / BIN_INDEX).write_text(json.dumps(index, indent=2))
