#!/usr/bin/env python
"""Train the tiny ChatGLM2-style SentencePiece model used by the embedded demo model and the tests.

The real chatglm2-6b `tokenizer.model` is not redistributable here, so the demo ships a small stand-in with the
same layout: unk 0 `<unk>`, bos 1 `<s>`, eos 2 `</s>`, no pad piece, byte fallback right after them (so `\\n` is the
byte piece 13, as in the real file), identity normalisation (full-width `：` survives), digits split, whitespace kept.
The five GLM specials ([MASK], [gMASK], [sMASK], sop, eop) are not in the file: the tokenizer class appends them
after the SentencePiece vocabulary, exactly as for the real model.

Training is reproducible: fixed seed, one thread, no input sampling or shuffling, and the corpus is fed from
memory so no file path ends up inside the model. Runs in about a second.

    python scripts/train_tiny_tokenizer.py [--out chatglm/assets/tiny-chatglm2]
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "chatglm" / "assets" / "tokenizer_corpus.txt"
DEFAULT_OUT = REPO_ROOT / "chatglm" / "assets" / "tiny-chatglm2"
DEFAULT_VOCAB_SIZE = 2000
DEFAULT_SEED = 1234

# What the tokenizer class needs besides the vocab file; the values of the real chatglm2-6b tokenizer_config.json
# (minus its remote-code auto_map).
TOKENIZER_CONFIG = {
    "tokenizer_class": "ChatGLMTokenizer",
    "padding_side": "left",
    "clean_up_tokenization_spaces": False,
    "remove_space": False,
    "do_lower_case": False,
}


def read_corpus(path: Path) -> list[str]:
    """Non-empty lines of the corpus (SentencePiece trains on lines; newlines are covered by byte fallback)."""
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_sentencepiece(lines: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = DEFAULT_SEED) -> bytes:
    """Serialized SentencePiece BPE model trained on `lines`."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # A small corpus cannot always fill the requested size; take what it yields rather than fail.
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def train_tiny_tokenizer(
    out_dir: Path = DEFAULT_OUT,
    corpus: Path = DEFAULT_CORPUS,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write `tokenizer.model` and `tokenizer_config.json` into `out_dir` (other files there are left alone)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "tokenizer.model"
    model_path.write_bytes(train_sentencepiece(read_corpus(Path(corpus)), vocab_size=vocab_size, seed=seed))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(TOKENIZER_CONFIG, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return model_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="training text, one sentence a line")
    parser.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="requested piece count (an upper bound)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)

    model_path = train_tiny_tokenizer(args.out, args.corpus, args.vocab_size, args.seed)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n = sp.get_piece_size()
    print(
        f"wrote {model_path}: {n} SentencePiece pieces; tokenizer vocab_size {n + 5} "
        f"([MASK]={n}, [gMASK]={n + 1}, [sMASK]={n + 2}, sop={n + 3}, eop={n + 4})"
    )


if __name__ == "__main__":
    main()
