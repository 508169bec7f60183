"""P-tuning v2 checkpoints: add a prefix encoder to a loaded model, save only it, and load it back.

A P-tuning checkpoint (what `ptuning/main.py` writes with `--pre_seq_len`) holds nothing but the prefix
encoder, under the state-dict names of the original (`transformer.prefix_encoder.embedding.weight`, plus
`trans.0.*` / `trans.2.*` with `--prefix_projection`), in `model.safetensors` or the original's
`pytorch_model.bin`. Inference needs the base model it was trained on *and* the same `pre_seq_len` /
`prefix_projection`; a mismatch is the mistake users made most often, so it is reported with both values
and the file name instead of a bare shape error.

    model, tokenizer = load_ptuned_model("THUDM/chatglm2-6b", "output/adgen-chatglm2-6b-pt-128-2e-2/checkpoint-3000",
                                         pre_seq_len=128)

The prefix encoder itself is hand-written in the model core (chatglm.modeling_utils.PrefixEncoder) rather than
taken from peft: its parameter names and the per-layer key/value layout must match the original checkpoints
(ChatGLM2's two K/V groups, ChatGLM-6B's 32 heads), which peft's generic prefix tuning does not produce.
LoRA, which has no such legacy format, uses peft (`load_lora`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .loading import BIN_SINGLE, SAFE_SINGLE, CheckpointError, read_tensors
from .modeling_utils import PrefixEncoder

PREFIX_KEY = "transformer.prefix_encoder."

__all__ = [
    "PREFIX_KEY",
    "enable_prefix_tuning",
    "find_prefix_file",
    "load_lora",
    "load_prefix_encoder",
    "load_ptuned_model",
    "prefix_state_dict",
    "read_prefix_settings",
]


def enable_prefix_tuning(
    model: nn.Module,
    pre_seq_len: int,
    prefix_projection: bool = False,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Give a loaded ChatGLM / ChatGLM2 model a fresh P-tuning v2 prefix encoder and freeze everything else.

    This is what building the model with `config.pre_seq_len` does, for a model that was loaded without it
    (base checkpoints hold no prefix weights). The encoder is kept in `dtype` (fp32 by default, as the
    original's `prefix_encoder.float()`) whatever the base dtype; its output is cast to the base dtype.
    """
    if not pre_seq_len or pre_seq_len < 0:
        raise ValueError(f"pre_seq_len must be a positive integer, got {pre_seq_len!r}")
    config = model.config
    config.pre_seq_len = int(pre_seq_len)
    config.prefix_projection = bool(prefix_projection)
    device = model.get_input_embeddings().weight.device
    # PrefixEncoder keeps PyTorch's default initialisation, as a model built with pre_seq_len does.
    model.transformer.prefix_encoder = PrefixEncoder(config).to(device=device, dtype=dtype)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(PREFIX_KEY)
    return model


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prefix encoder's tensors under their full checkpoint names (what a P-tuning checkpoint stores)."""
    return {
        name: tensor.detach()
        for name, tensor in model.state_dict().items()
        if name.startswith(PREFIX_KEY)
    }


def find_prefix_file(checkpoint: str | os.PathLike) -> Path:
    """The weight file of a P-tuning checkpoint folder (model.safetensors, else pytorch_model.bin), or the
    file itself when a file is given."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"P-tuning checkpoint {path} does not exist")
    for name in (SAFE_SINGLE, BIN_SINGLE):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{path} holds no P-tuning weights: expected {SAFE_SINGLE} or {BIN_SINGLE} (the folders ptuning/main.py "
        "writes as output_dir/checkpoint-N)"
    )


def _read_prefix_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {key[len(PREFIX_KEY):]: tensor for key, tensor in read_tensors(path) if key.startswith(PREFIX_KEY)}
    if not tensors:
        raise CheckpointError(
            f"{path} holds no {PREFIX_KEY}* tensors: it is not a P-tuning v2 checkpoint (a full fine-tuned "
            "checkpoint is loaded as the model itself, with --model)"
        )
    return tensors


def _settings_from_tensors(tensors: dict[str, torch.Tensor]) -> tuple[int, bool]:
    embedding = tensors.get("embedding.weight")
    if embedding is None:
        raise CheckpointError(f"the prefix weights lack embedding.weight (found {sorted(tensors)})")
    return int(embedding.shape[0]), "trans.0.weight" in tensors


def read_prefix_settings(checkpoint: str | os.PathLike) -> tuple[int, bool]:
    """(pre_seq_len, prefix_projection) a P-tuning checkpoint was trained with, read from its tensors."""
    return _settings_from_tensors(_read_prefix_tensors(find_prefix_file(checkpoint)))


def _describe(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {tuple(t.shape)}" for name, t in sorted(tensors.items()))


def load_prefix_encoder(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a P-tuning checkpoint's prefix weights into `model.transformer.prefix_encoder`.

    Only tensors named `transformer.prefix_encoder.*` are read (the prefix is stripped); the model must have
    been given the checkpoint's pre_seq_len and prefix_projection. Raises CheckpointError naming the file and
    both settings when they differ, or when the shapes belong to another base model.
    """
    path = find_prefix_file(checkpoint)
    tensors = _read_prefix_tensors(path)
    saved_len, saved_projection = _settings_from_tensors(tensors)
    encoder = getattr(model.transformer, "prefix_encoder", None)
    if encoder is None:
        raise CheckpointError(
            f"{path} is a P-tuning checkpoint (pre_seq_len={saved_len}, prefix_projection={saved_projection}) but "
            f"the model has no prefix encoder: load it with pre_seq_len={saved_len}"
            f"{' and prefix_projection=True' if saved_projection else ''} (--pre_seq_len {saved_len})"
        )
    config = model.config
    if (config.pre_seq_len, bool(config.prefix_projection)) != (saved_len, saved_projection):
        raise CheckpointError(
            f"{path} was trained with pre_seq_len={saved_len}, prefix_projection={saved_projection}, but the model "
            f"was set up with pre_seq_len={config.pre_seq_len}, prefix_projection={bool(config.prefix_projection)}: "
            f"pass --pre_seq_len {saved_len}{' --prefix_projection' if saved_projection else ''} "
            "(the values used for training)"
        )
    expected = encoder.state_dict()
    if set(expected) != set(tensors) or any(tuple(expected[k].shape) != tuple(tensors[k].shape) for k in expected):
        raise CheckpointError(
            f"{path} holds prefix weights {_describe(tensors)}, but this base model "
            f"(ChatGLM{'' if config.version == 1 else '2'}, {config.num_layers} layers) needs {_describe(expected)}: "
            "the checkpoint was trained on a different base model"
        )
    reference = next(encoder.parameters())
    encoder.load_state_dict({k: t.to(device=reference.device, dtype=reference.dtype) for k, t in tensors.items()})
    return model


def _config_settings(checkpoint: str | os.PathLike) -> tuple[int | None, bool | None]:
    # ptuning/main.py saves config.json next to the prefix weights; an original checkpoint may lack it.
    folder = Path(checkpoint)
    config_path = (folder if folder.is_dir() else folder.parent) / "config.json"
    if not config_path.is_file():
        return None, None
    try:
        fields = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None, None
    return fields.get("pre_seq_len"), fields.get("prefix_projection")


def load_ptuned_model(
    base: str | os.PathLike | None,
    checkpoint_dir: str | os.PathLike,
    pre_seq_len: int | None = None,
    prefix_projection: bool | None = None,
    **load_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer): the base model (folder or hub id; None = the default model) plus a P-tuning prefix.

    `pre_seq_len` / `prefix_projection` are the values the checkpoint was trained with; when left out they
    are read from the checkpoint. `load_kwargs` go to `chatglm.load_model` (device, dtype, quantize=4|8).
    As the original README does, the base may be quantized and in fp16/bf16 while the prefix stays fp32.
    """
    from .engine import load_model

    path = find_prefix_file(checkpoint_dir)
    if pre_seq_len is None or prefix_projection is None:
        saved_len, saved_projection = _config_settings(checkpoint_dir)
        if saved_len is None:
            saved_len, saved_projection = read_prefix_settings(path)
        pre_seq_len = saved_len if pre_seq_len is None else pre_seq_len
        prefix_projection = bool(saved_projection) if prefix_projection is None else prefix_projection
    model, tokenizer = load_model(base, **load_kwargs)
    enable_prefix_tuning(model, pre_seq_len, bool(prefix_projection))
    load_prefix_encoder(model, path)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def load_lora(model: nn.Module, checkpoint_dir: str | os.PathLike, merge: bool = True) -> nn.Module:
    """Apply a LoRA adapter saved by `ptuning/main.py --lora_rank` (peft format) to a loaded model.

    With `merge` the low-rank update is folded into the weights and the plain model is returned, so chat,
    generation and saving work exactly as without an adapter (needs float weights, not int4/int8).
    """
    from peft import PeftModel

    folder = Path(checkpoint_dir)
    if not (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"{folder} is not a LoRA checkpoint: it has no adapter_config.json")
    peft_model = PeftModel.from_pretrained(model, str(folder))
    return peft_model.merge_and_unload() if merge else peft_model
