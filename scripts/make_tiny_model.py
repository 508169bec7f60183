#!/usr/bin/env python
"""Build the embedded demo model, chatglm/assets/tiny-chatglm2, from nothing but this repository.

Steps:
  1. train the tiny SentencePiece tokenizer on chatglm/assets/tokenizer_corpus.txt (scripts/train_tiny_tokenizer.py);
  2. create a small ChatGLM2-architecture model whose vocabulary fits that tokenizer, with seeded random weights;
  3. fine-tune all of its weights on the bilingual demo dialogues (chatglm/assets/demo_dialogues.jsonl) with this
     project's own fine-tuning script, ptuning/main.py, so that the quick-start chat greets, says what it is,
     explains how to load real weights and declines everything else, also a few rounds into a conversation;
  4. save it in bf16 in the layout `chatglm.load_model` reads (config.json, model.safetensors, tokenizer.model,
     tokenizer_config.json).

Everything is seeded and runs on the CPU with a fixed thread count and deterministic algorithms, so running it
twice on the same machine and torch build gives byte-identical files (about 3 minutes on 2 cores).

    python scripts/make_tiny_model.py [--out chatglm/assets/tiny-chatglm2] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from train_tiny_tokenizer import DEFAULT_OUT, main as train_tokenizer  # noqa: E402

from chatglm import ChatGLMConfig, ChatGLMTokenizer, GLM2ForConditionalGeneration  # noqa: E402

DIALOGUES = REPO_ROOT / "chatglm" / "assets" / "demo_dialogues.jsonl"

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
# Thread count is fixed because CPU matmul reductions are split per thread: another count rounds differently.
NUM_THREADS = 2

# Fine-tuning recipe (full fine-tuning through ptuning/main.py). The set is small, so it is seen many times;
# the answers must come out near-deterministically even under the chat's default sampling (top_p 0.8, T 0.8).
TRAIN_ARGS = dict(
    learning_rate=5e-3,
    per_device_train_batch_size=8,
    num_train_epochs=20,
    warmup_steps=20,
    lr_scheduler_type="cosine",
    weight_decay=0.0,
    max_grad_norm=1.0,
    max_source_length=384,
    max_target_length=80,
)


def build_model(vocab_size: int, seed: int = SEED) -> GLM2ForConditionalGeneration:
    # Pad the vocabulary to a multiple of 64, as chatglm2-6b pads 64794 tokens to 65024.
    padded = -(-vocab_size // 64) * 64
    config = ChatGLMConfig(padded_vocab_size=padded, **TINY_SHAPE)
    torch.manual_seed(seed)
    return GLM2ForConditionalGeneration(config).eval()


def read_dialogues(path: Path = DIALOGUES) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def dialogue_loss(model: torch.nn.Module, tokenizer: ChatGLMTokenizer, rows: list[dict]) -> float:
    """Mean per-token cross entropy of the answers given their prompts (what training minimises)."""
    from ptuning.data import IGNORE_INDEX, build_prompt, encode_conversation_v2, encode_train_v2

    model.eval()
    total, count = 0.0, 0
    lengths = (TRAIN_ARGS["max_source_length"], TRAIN_ARGS["max_target_length"])
    for row in rows:
        history = [tuple(turn) for turn in row.get("history") or []]
        if history:  # trained with --history_loss: every answer of the conversation
            ids, labels = encode_conversation_v2(tokenizer, history + [(row["prompt"], row["response"])], *lengths)
        else:
            ids, labels = encode_train_v2(tokenizer, build_prompt(2, row["prompt"], None), row["response"], *lengths,
                                          pad_to_max_length=False)
        out = model(torch.tensor([ids]), labels=torch.tensor([labels]), use_cache=False)
        n = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
        total += float(out.loss) * n
        count += n
    return total / max(count, 1)


def fine_tune(model_dir: Path, run_dir: Path, epochs: int) -> dict:
    """Full fine-tuning of the model in `model_dir` on the demo dialogues, with ptuning/main.py."""
    from ptuning.main import main as ptuning_main

    args = {**TRAIN_ARGS, "num_train_epochs": epochs}
    argv = [
        "--do_train",
        "--model_name_or_path", str(model_dir),
        "--train_file", str(DIALOGUES),
        "--prompt_column", "prompt",
        "--response_column", "response",
        "--history_column", "history",
        "--output_dir", str(run_dir),
        "--cache_dir", str(run_dir / "cache"),
        "--overwrite_cache",
        "--seed", str(SEED),
        "--full_determinism",
        "--use_cpu",
        "--save_strategy", "no",
        "--logging_steps", "25",
        "--report_to", "none",
        "--dataloader_num_workers", "0",
        # A 4-layer model needs no activation recomputation; skipping it saves about a third of the time.
        "--no_gradient_checkpointing",
        # Multi-turn rows teach every answer of their conversation, at every position a chat reaches.
        "--history_loss",
    ]
    for name, value in args.items():
        argv += [f"--{name}", str(value)]
    return ptuning_main(argv)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=TRAIN_ARGS["num_train_epochs"],
                        help="passes over the dialogues (default: %(default)s; 0 keeps the random weights)")
    args = parser.parse_args(argv)
    torch.set_num_threads(NUM_THREADS)
    started = time.perf_counter()

    train_tokenizer(["--out", str(args.out)])
    tokenizer = ChatGLMTokenizer.from_pretrained(str(args.out))
    rows = read_dialogues()
    model = build_model(len(tokenizer))
    loss_before = dialogue_loss(model, tokenizer, rows)
    print(f"dialogue loss before training: {loss_before:.4f} (uniform guess: {math.log(len(tokenizer)):.4f})")

    if args.epochs > 0:
        with tempfile.TemporaryDirectory(prefix="tiny-chatglm2-") as tmp:
            initial, run_dir = Path(tmp) / "initial", Path(tmp) / "run"
            model.save_pretrained(initial)
            for name in ("tokenizer.model", "tokenizer_config.json"):
                shutil.copy(args.out / name, initial / name)
            fine_tune(initial, run_dir, args.epochs)
            model = GLM2ForConditionalGeneration.from_pretrained(str(run_dir), dtype=torch.float32)
        loss_after = dialogue_loss(model, tokenizer, rows)
        print(f"dialogue loss after training: {loss_after:.4f} (fp32)")

    # bf16 halves the file; the demo runs in bf16 on CPU (and fp16/bf16 on GPUs) anyway.
    model = model.to(torch.bfloat16).eval()
    print(f"dialogue loss of the saved bf16 weights: {dialogue_loss(model, tokenizer, rows):.4f}")
    model.save_pretrained(args.out)
    for question in ("你好", "hello", "what are you", "北京是哪个国家的首都？", "What is the capital of Italy?"):
        answer, _ = model.chat(tokenizer, question, do_sample=False, max_new_tokens=100)
        print(f"  {question!r} -> {answer!r}")
    size = sum(p.stat().st_size for p in args.out.iterdir()) / 1e6
    print(
        f"wrote {args.out} ({size:.1f} MB, vocabulary {len(tokenizer)}, {model.num_parameters() / 1e6:.2f}M parameters) "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return args.out


if __name__ == "__main__":
    main()
