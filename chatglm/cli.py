"""Command-line options every script shares (model, device, dtype, quantization, generation defaults)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .engine import DEMO_MODEL_NOTICE, ChatEngine, default_model_path


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=None,
        help="hub id (THUDM/chatglm2-6b, THUDM/chatglm-6b, ...) or local folder; default: $CHATGLM_MODEL, "
        "else the small embedded demo model",
    )
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weight dtype (default: fp16 on GPU, bf16 on CPU for fp16 checkpoints)")
    group.add_argument("--quantize", type=int, default=None, choices=[4, 8], help="quantize weights to int4/int8 while loading")
    group.add_argument("--ptuning_checkpoint", "--ptuning-checkpoint", default=None,
                       help="a P-tuning v2 checkpoint folder (ptuning/main.py output, e.g. output/<run>/checkpoint-3000) "
                       "whose prefix is loaded onto --model")
    group.add_argument("--pre_seq_len", "--pre-seq-len", type=positive_int, default=None,
                       help="prefix length the P-tuning checkpoint was trained with (default: read from the checkpoint)")
    group.add_argument("--prefix_projection", "--prefix-projection", action="store_true", default=None,
                       help="the P-tuning checkpoint was trained with --prefix_projection (default: read from it)")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (defaults: the model version's own)")
    group.add_argument("--max-length", type=positive_int, default=None, help="context limit in tokens")
    group.add_argument("--top-p", type=_probability, default=None)
    group.add_argument("--temperature", type=_non_negative_float, default=None, help="0 means greedy decoding")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    options = {"max_length": args.max_length, "top_p": args.top_p, "temperature": args.temperature}
    kwargs = {k: v for k, v in options.items() if v is not None}
    if kwargs.get("temperature") == 0:
        kwargs["do_sample"] = False
        kwargs.pop("temperature")
    return kwargs


def engine_from_args(args: argparse.Namespace, *, announce: bool = True) -> ChatEngine:
    """Load the engine the arguments name; say so on stderr when it is the embedded demo model."""
    name = args.model or default_model_path()
    ptuning_checkpoint = getattr(args, "ptuning_checkpoint", None)
    if ptuning_checkpoint:
        from .ptuning import load_ptuned_model

        model, tokenizer = load_ptuned_model(
            name, ptuning_checkpoint, getattr(args, "pre_seq_len", None), getattr(args, "prefix_projection", None),
            device=args.device, dtype=args.dtype, quantize=args.quantize,
        )
        engine = ChatEngine(model, tokenizer, name=name)
    elif getattr(args, "pre_seq_len", None):
        # A fresh, untrained prefix would only disturb the model; the flag means a checkpoint was forgotten.
        raise SystemExit("--pre_seq_len is the prefix length of a P-tuning checkpoint; pass --ptuning_checkpoint too")
    else:
        engine = ChatEngine.from_pretrained(name, device=args.device, dtype=args.dtype, quantize=args.quantize)
    if announce and engine.is_demo_model:
        print(DEMO_MODEL_NOTICE, file=sys.stderr)
    return engine
