#!/usr/bin/env python
"""Build the embedded demo model, chatglm/assets/tiny-chatglm2, from nothing but this repository.

Steps: train the tiny SentencePiece tokenizer (scripts/train_tiny_tokenizer.py), then create a small
ChatGLM2-architecture model whose vocabulary fits that tokenizer, with seeded weights, and save both in the
layout `chatglm.load_model` reads (config.json, model.safetensors, tokenizer.model, tokenizer_config.json).
Everything is seeded, so running it twice gives byte-identical files.

    python scripts/make_tiny_model.py [--out chatglm/assets/tiny-chatglm2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from train_tiny_tokenizer import DEFAULT_OUT, main as train_tokenizer  # noqa: E402

from chatglm import ChatGLMConfig, ChatGLMTokenizer, GLM2ForConditionalGeneration  # noqa: E402

# The ChatGLM2 architecture at a few MB: every structural switch as in chatglm2-6b (MQA with 2 groups,
# half-head RoPE, RMSNorm, SwiGLU, QKV bias only), just narrower and shallower.
TINY_SHAPE = dict(
    num_layers=4,
    hidden_size=256,
    ffn_hidden_size=688,
    kv_channels=32,
    num_attention_heads=8,
    multi_query_group_num=2,
    seq_length=2048,
)
SEED = 20231124


def build_model(vocab_size: int, seed: int = SEED) -> GLM2ForConditionalGeneration:
    # Pad the vocabulary to a multiple of 64, as chatglm2-6b pads 64794 tokens to 65024.
    padded = -(-vocab_size // 64) * 64
    config = ChatGLMConfig(padded_vocab_size=padded, **TINY_SHAPE)
    torch.manual_seed(seed)
    return GLM2ForConditionalGeneration(config).eval()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    train_tokenizer(["--out", str(args.out)])
    tokenizer = ChatGLMTokenizer.from_pretrained(str(args.out))
    # bf16 halves the file; the demo runs in bf16 on CPU (and fp16/bf16 on GPUs) anyway.
    model = build_model(len(tokenizer)).to(torch.bfloat16)
    model.save_pretrained(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir()) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB, vocabulary {len(tokenizer)}, {model.num_parameters() / 1e6:.2f}M parameters)")
    return args.out


if __name__ == "__main__":
    main()
