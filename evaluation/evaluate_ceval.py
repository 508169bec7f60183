#!/usr/bin/env python
"""C-Eval accuracy of a ChatGLM model, with the procedure of the ChatGLM2-6B evaluation script.

Data: the processed C-Eval release unpacked so that `<data-dir>/val/**/*.jsonl` exist (one JSON object per line
with `inputs_pretokenized`, the question followed by its four options, and `label`, 0-3). A small sample in that
layout ships in evaluation/CEval (for tests; its questions are not C-Eval's).

For every batch of questions:
  1. chain of thought: the question is asked in the chat prompt (`[Round 1]\\n\\n问：{question}\\n\\n答：` for
     ChatGLM2) and the model answers greedily (up to --max-new-tokens);
  2. extraction: question + that answer + `\\n综上所述，ABCD中正确的选项是：` is asked again as a new prompt, and the
     option whose letter has the highest next-token logit is the prediction.
`--no-cot` skips step 1 (the extraction prompt follows the question directly): much faster, usually less accurate.
The letter token ids come from the tokenizer in use, never from a fixed table.

    python evaluation/evaluate_ceval.py --model THUDM/chatglm2-6b --data-dir evaluation/CEval
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatglm.generation import SamplingParams, generate  # noqa: E402
from chatglm.prompt import get_prompt_format  # noqa: E402

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "CEval"
CHOICES = "ABCD"
EXTRACTION_PROMPT = "综上所述，ABCD中正确的选项是："
MAX_PROMPT_TOKENS = 2048


@dataclass
class SubjectResult:
    """Predictions for one data file; `correct`/`accuracy` only when the file has labels."""

    path: Path
    predictions: list[int] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.predictions)

    @property
    def correct(self) -> int:
        return sum(int(p == y) for p, y in zip(self.predictions, self.labels) if y is not None)

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else 0.0


def data_files(data_dir: str | Path, split: str = "val") -> list[Path]:
    """`<data_dir>/<split>/**/*.jsonl`, sorted so that runs print subjects in a stable order."""
    root = Path(data_dir) / split
    files = sorted(root.glob("**/*.jsonl"))
    if not files:
        raise FileNotFoundError(
            f"no C-Eval files under {root}: download the processed C-Eval data and unpack it so that "
            f"{root}/**/*.jsonl exist"
        )
    return files


def read_questions(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "inputs_pretokenized" not in row:
            raise ValueError(f"{path}:{number}: no inputs_pretokenized field (not the processed C-Eval layout)")
        rows.append(row)
    return rows


def choice_token_ids(tokenizer: Any) -> list[int]:
    """Token id of each option letter: the first id of `encode(letter)` without special tokens.

    A SentencePiece vocabulary without a `▁A` piece encodes "A" as `▁`, `A`; the first id would then be the same
    bare word-start piece for all four letters, so such a piece is skipped.
    """
    ids = []
    for letter in CHOICES:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) > 1 and not tokenizer.decode(encoded[:1]).strip():
            encoded = encoded[1:]
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer gives the option letters {CHOICES} the token ids {ids}, which are not distinct")
    return ids


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def encode_prompts(tokenizer: Any, texts: Sequence[str], version: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat prompts for `texts`, tokenised with special tokens and left-padded: (input_ids, attention_mask).

    Each prompt keeps its last MAX_PROMPT_TOKENS tokens at most, so the question's end and the answer cue survive.
    """
    build = get_prompt_format(version).build_prompt
    rows = [tokenizer.encode(build(text, []), add_special_tokens=True)[-MAX_PROMPT_TOKENS:] for text in texts]
    ids, mask = _left_pad(rows, tokenizer.pad_token_id)
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def chain_of_thought(model: Any, tokenizer: Any, texts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to the questions (step 1), decoded without the prompt."""
    ids, mask = encode_prompts(tokenizer, texts, model.config.version, model.device)
    eos = model.config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    new_tokens = generate(model, ids, mask, params=SamplingParams(do_sample=False), eos_token_ids=eos_ids,
                          max_new_tokens=max_new_tokens)
    answers = []
    for row in new_tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        answers.append(tokenizer.decode(row[:cut]))
    return answers


@torch.inference_mode()
def choice_logits(model: Any, tokenizer: Any, texts: Sequence[str], choice_ids: Sequence[int]) -> torch.Tensor:
    """Next-token logits of the option letters after each text's chat prompt: [batch, 4] (step 2)."""
    ids, mask = encode_prompts(tokenizer, texts, model.config.version, model.device)
    # prepare_inputs_for_generation gives the positions a left-padded row needs (and GLM's 2-D positions).
    inputs = model.prepare_inputs_for_generation(ids, attention_mask=mask, use_cache=False)
    inputs["return_last_logit"] = True
    logits = model(**inputs).logits[:, -1]
    return logits[:, list(choice_ids)].float()


def extraction_texts(questions: Sequence[str], answers: Sequence[str] | None) -> list[str]:
    """Question + chain-of-thought answer (if any) + newline + the extraction cue."""
    answers = answers if answers is not None else [""] * len(questions)
    return [f"{q}{a}\n{EXTRACTION_PROMPT}" for q, a in zip(questions, answers)]


def evaluate_file(
    model: Any,
    tokenizer: Any,
    path: Path,
    *,
    batch_size: int = 8,
    cot: bool = True,
    max_new_tokens: int = 512,
    choice_ids: Sequence[int] | None = None,
    progress: Any = None,
) -> SubjectResult:
    choice_ids = list(choice_ids) if choice_ids is not None else choice_token_ids(tokenizer)
    rows = read_questions(path)
    result = SubjectResult(path)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        questions = [row["inputs_pretokenized"] for row in batch]
        answers = chain_of_thought(model, tokenizer, questions, max_new_tokens) if cot else None
        scores = choice_logits(model, tokenizer, extraction_texts(questions, answers), choice_ids)
        result.predictions += scores.argmax(dim=-1).tolist()
        result.labels += [row.get("label") for row in batch]
        if progress is not None:
            progress.update(len(batch))
    return result


def evaluate_ceval(
    model: Any,
    tokenizer: Any,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    *,
    split: str = "val",
    batch_size: int = 8,
    cot: bool = True,
    max_new_tokens: int = 512,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every file of a split. Returns {"subjects": [SubjectResult, ...], "accuracy": sample-weighted
    accuracy, "correct": n, "count": n}."""
    from tqdm.auto import tqdm

    files = data_files(data_dir, split)
    choice_ids = choice_token_ids(tokenizer)
    total = sum(len(read_questions(path)) for path in files)
    results = []
    with tqdm(total=total, desc=f"C-Eval {split}", unit="q", disable=not show_progress) as progress:
        for path in files:
            results.append(evaluate_file(model, tokenizer, path, batch_size=batch_size, cot=cot,
                                         max_new_tokens=max_new_tokens, choice_ids=choice_ids, progress=progress))
    correct = sum(r.correct for r in results)
    count = sum(r.count for r in results)
    return {"subjects": results, "correct": correct, "count": count, "accuracy": correct / count if count else 0.0}


def _subject_name(path: Path, data_dir: Path, split: str) -> str:
    return str(path.relative_to(Path(data_dir) / split).with_suffix(""))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from chatglm.cli import add_model_arguments, engine_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    # The original evaluated chatglm2-6b in bfloat16.
    parser.set_defaults(dtype="bfloat16")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding val/ (and test/)")
    parser.add_argument("--split", default="val", help="subfolder to evaluate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=512, help="length of the chain-of-thought answer")
    parser.add_argument("--no-cot", action="store_true", help="skip the chain-of-thought pass (fast, less accurate)")
    parser.add_argument("--output", type=Path, default=None,
                        help="write predictions as JSON {subject: {index: letter}} (e.g. for a test-split submission)")
    args = parser.parse_args(argv)

    engine = engine_from_args(args)
    model, tokenizer = engine.model, engine.tokenizer
    model.eval()
    summary = evaluate_ceval(model, tokenizer, args.data_dir, split=args.split, batch_size=args.batch_size,
                             cot=not args.no_cot, max_new_tokens=args.max_new_tokens)
    for result in summary["subjects"]:
        name = _subject_name(result.path, args.data_dir, args.split)
        labelled = any(y is not None for y in result.labels)
        shown = f"{result.accuracy:.4f} ({result.correct}/{result.count})" if labelled else f"{result.count} predicted"
        print(f"{name}: {shown}")
    print(f"Average accuracy: {summary['accuracy']:.4f} ({summary['correct']}/{summary['count']}, weighted by questions)")
    if args.output is not None:
        predictions = {
            _subject_name(r.path, args.data_dir, args.split): {str(i): CHOICES[p] for i, p in enumerate(r.predictions)}
            for r in summary["subjects"]
        }
        args.output.write_text(json.dumps(predictions, ensure_ascii=False, indent=2), encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
