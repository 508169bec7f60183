"""ROUGE-1/2/L (rouge_chinese on jieba words) and BLEU-4 (nltk, on characters), as the original reported them.

All scores are F-measures / BLEU × 100, averaged over the examples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100
METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _quiet_jieba() -> None:
    import jieba

    # jieba prints its dictionary-loading banner through logging at DEBUG/INFO on first use.
    jieba.setLogLevel(logging.WARNING)


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """The four scores of one prediction against one reference.

    An empty prediction or reference scores 0 on ROUGE (rouge_chinese raises on empty text).
    """
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    _quiet_jieba()
    hypothesis = " ".join(jieba.cut(prediction)).strip()
    ref = " ".join(jieba.cut(reference)).strip()
    scores: dict[str, float] = {}
    if hypothesis and ref:
        result = Rouge().get_scores(hypothesis, ref)[0]
        for name in ("rouge-1", "rouge-2", "rouge-l"):
            scores[name] = round(result[name]["f"] * 100, 4)
    else:
        scores.update({"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0})
    if prediction and reference:
        bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    else:
        bleu = 0.0
    scores["bleu-4"] = round(bleu * 100, 4)
    return scores


def score_texts(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean of `score_pair` over aligned predictions and references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    totals = {name: [] for name in METRIC_NAMES}
    for prediction, reference in zip(predictions, references):
        for name, value in score_pair(prediction, reference).items():
            totals[name].append(value)
    return {name: float(np.mean(values)) if values else 0.0 for name, values in totals.items()}


def decode_ids(tokenizer: Any, rows: Any) -> list[str]:
    """Decode a [n, len] array of token ids in which -100 marks padding; special tokens are dropped."""
    rows = np.asarray(rows)
    rows = np.where(rows == IGNORE_INDEX, tokenizer.pad_token_id, rows)
    return [text.strip() for text in tokenizer.batch_decode(rows.tolist(), skip_special_tokens=True)]


def make_compute_metrics(tokenizer: Any) -> Callable[[Any], dict[str, float]]:
    """A `compute_metrics` for the transformers Trainer: EvalPrediction(predictions=ids, label_ids=ids)."""

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        return score_texts(decode_ids(tokenizer, predictions), decode_ids(tokenizer, labels))

    return compute_metrics
