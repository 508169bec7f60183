"""Helpers the demos share: splitting a model over several GPUs, and the web demos' sampling options.

    from utils import load_model_on_gpus
    model = load_model_on_gpus("THUDM/chatglm2-6b", num_gpus=2)   # layers 0-12 on cuda:0, 13-27 on cuda:1

Every demo also takes `--num-gpus N`, which does the same and wraps the model in a `chatglm.ChatEngine`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from chatglm import ChatEngine, ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer
from chatglm.cli import engine_from_args
from chatglm.engine import DEMO_MODEL_NOTICE, default_model_path
from chatglm.loading import resolve_device, resolve_model_dir

DeviceMap = dict[str, int | str]

# Embeddings, final norm and output layer cost about as much memory as two transformer blocks; they are
# counted as two "units" so that GPU 0, which holds them, takes two blocks fewer than the others.
_SHARED_UNITS = 2


def auto_configure_device_map(
    num_gpus: int, version: int = 2, num_layers: int = 28, *, prefix_encoder: bool = False
) -> DeviceMap:
    """Module name -> GPU index, spreading the transformer blocks over `num_gpus` GPUs.

    GPU 0 holds the word embeddings, the final layer norm and the output layer (and the P-tuning prefix
    encoder when `prefix_encoder` is set): input ids, embeddings and logits then live on the device the
    model reports as its own, which is where generation puts its tensors. Module names differ by version:
    ChatGLM2 `transformer.encoder.layers.{i}`, ChatGLM-6B `transformer.layers.{i}`.
    """
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    if version == 2:
        block = "transformer.encoder.layers"
        device_map: DeviceMap = {
            "transformer.embedding.word_embeddings": 0,
            "transformer.rotary_pos_emb": 0,
            "transformer.encoder.final_layernorm": 0,
            "transformer.output_layer": 0,
        }
    elif version == 1:
        block = "transformer.layers"
        device_map = {"transformer.word_embeddings": 0, "transformer.final_layernorm": 0, "lm_head": 0}
    else:
        raise ValueError(f"version must be 1 (ChatGLM-6B) or 2 (ChatGLM2-6B), got {version}")
    if prefix_encoder:
        device_map["transformer.prefix_encoder"] = 0

    per_gpu = (num_layers + _SHARED_UNITS) / num_gpus
    gpu, used = 0, _SHARED_UNITS
    for i in range(num_layers):
        if used >= per_gpu:
            gpu, used = gpu + 1, 0
        if gpu >= num_gpus:  # cannot happen for valid inputs: each GPU takes at least per_gpu units
            raise AssertionError(f"layer {i} would go to GPU {gpu} of {num_gpus}")
        device_map[f"{block}.{i}"] = gpu
        used += 1
    return device_map


def _targets_gpu(device_map: DeviceMap) -> bool:
    return any(isinstance(d, int) or str(d).startswith(("cuda", "mps")) for d in device_map.values())


def load_model_on_gpus(
    checkpoint_path: str | os.PathLike,
    num_gpus: int = 2,
    device_map: DeviceMap | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a ChatGLM-6B or ChatGLM2-6B checkpoint with its layers split over `num_gpus` GPUs.

    With fewer than two GPUs and no `device_map`, the whole model goes to the best device (fp16 on a GPU).
    Otherwise the weights are read on the CPU and `accelerate` dispatches them by `device_map`, by default
    `auto_configure_device_map(num_gpus, <version>, <num_layers>)` for the checkpoint's own version.
    Other keyword arguments go to `from_pretrained` (dtype=, quantize=, pre_seq_len=, ...).
    Returns the model; load the tokenizer from the same path with `ChatGLMTokenizer.from_pretrained`.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    folder = resolve_model_dir(checkpoint_path)
    if num_gpus < 2 and device_map is None:
        kwargs.setdefault("device", resolve_device(None))
        if kwargs["device"] is not None and torch.device(kwargs["device"]).type == "cuda":
            kwargs.setdefault("dtype", torch.float16)
        return ChatGLMForConditionalGeneration.from_pretrained(str(folder), **kwargs)

    if device_map is None:
        visible = torch.cuda.device_count()
        if num_gpus > visible:
            raise ValueError(f"asked to split the model over {num_gpus} GPUs, but {visible} CUDA GPU(s) are visible")
        config = ChatGLMConfig.from_pretrained(str(folder))
        pre_seq_len = kwargs.get("pre_seq_len", config.pre_seq_len)
        device_map = auto_configure_device_map(
            num_gpus, config.version, config.num_layers, prefix_encoder=bool(pre_seq_len)
        )
    if _targets_gpu(device_map):
        kwargs.setdefault("dtype", torch.float16)
    # Read onto the CPU first: loading the whole fp16 model onto GPU 0 before splitting would not fit there.
    kwargs.pop("device", None)
    return ChatGLMForConditionalGeneration.from_pretrained(str(folder), device_map=device_map, **kwargs)


# -- command-line glue for the demos ----------------------------------------------------------------------------


def add_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-gpus", type=int, default=1, metavar="N",
        help="split the model's layers over N CUDA GPUs (default 1: the whole model on --device)",
    )


def engine_from_demo_args(args: argparse.Namespace) -> ChatEngine:
    """`chatglm.cli.engine_from_args`, or the model split over `--num-gpus` GPUs when that is 2 or more."""
    if getattr(args, "num_gpus", 1) < 2:
        return engine_from_args(args)
    if getattr(args, "ptuning_checkpoint", None) or getattr(args, "pre_seq_len", None):
        raise SystemExit("--num-gpus does not combine with a P-tuning checkpoint yet; load it on one device")
    name = args.model or default_model_path()
    model = load_model_on_gpus(name, num_gpus=args.num_gpus, dtype=args.dtype, quantize=args.quantize)
    tokenizer = ChatGLMTokenizer.from_pretrained(str(resolve_model_dir(name)))
    engine = ChatEngine(model, tokenizer, name=str(name))
    if engine.is_demo_model:
        print(DEMO_MODEL_NOTICE, file=sys.stderr)
    return engine


# -- the web demos' controls --------------------------------------------------------------------------------------


def sampling_options(max_length: float, top_p: float, temperature: float) -> dict[str, Any]:
    """`stream_reply` keyword arguments from the sliders' values.

    Sliders hand back floats, and can reach the ends of their range: temperature 0 means greedy decoding
    (sampling at temperature 0 is undefined), and top_p 0 would exclude every token, so it is raised to the
    smallest value that keeps the best one.
    """
    options: dict[str, Any] = {"max_length": max(1, int(max_length)), "top_p": min(max(float(top_p), 0.01), 1.0)}
    if float(temperature) <= 0:
        options["do_sample"] = False
    else:
        options["temperature"] = float(temperature)
    return options
