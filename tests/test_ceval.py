"""evaluation/evaluate_ceval.py on the shipped sample, checked against predictions computed here from raw logits."""

from __future__ import annotations

import json

import pytest
import torch
from finetune_helpers import CEVAL_SAMPLE, embedded_model, embedded_tokenizer, tiny_model

from evaluation.evaluate_ceval import (
    EXTRACTION_PROMPT,
    choice_token_ids,
    data_files,
    evaluate_ceval,
)
from evaluation.evaluate_ceval import (
    main as ceval_main,
)

# Written out here rather than taken from chatglm.prompt: the test states the procedure independently.
ROUND_1 = "[Round 1]\n\n问：{}\n\n答："


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return embedded_model(torch.float32), embedded_tokenizer()


def _sample() -> dict[str, list[dict]]:
    files = sorted((CEVAL_SAMPLE / "val").glob("**/*.jsonl"))
    return {str(path): [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            for path in files}


def _letter_ids(tokenizer) -> list[int]:
    ids = []
    for letter in "ABCD":
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        # A bare word-start piece (SentencePiece's "▁") carries no letter; the letter is the next token.
        if len(encoded) > 1 and tokenizer.convert_ids_to_tokens(encoded[0]) == "▁":
            encoded = encoded[1:]
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation by re-running the whole sequence each step (no cache, no padding)."""
    ids = tokenizer.encode(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids + new]), use_cache=False).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new)


@torch.no_grad()
def _expected(model, tokenizer, cot_tokens: int | None) -> dict[str, list[int]]:
    letters = _letter_ids(tokenizer)
    predictions = {}
    for path, rows in _sample().items():
        predictions[path] = []
        for row in rows:
            question = row["inputs_pretokenized"]
            thought = _greedy(model, tokenizer, ROUND_1.format(question), cot_tokens) if cot_tokens else ""
            prompt = ROUND_1.format(question + thought + "\n" + "综上所述，ABCD中正确的选项是：")
            logits = model(torch.tensor([tokenizer.encode(prompt)]), use_cache=False).logits[0, -1]
            predictions[path].append(int(logits[letters].argmax()))
    return predictions


def _accuracy(predictions: dict[str, list[int]]) -> tuple[dict[str, float], float]:
    rows = _sample()
    per_file = {p: sum(int(a == r["label"]) for a, r in zip(preds, rows[p])) / len(preds) for p, preds in predictions.items()}
    correct = sum(sum(int(a == r["label"]) for a, r in zip(preds, rows[p])) for p, preds in predictions.items())
    return per_file, correct / sum(len(preds) for preds in predictions.values())


def test_sample_is_in_the_official_layout() -> None:
    files = data_files(CEVAL_SAMPLE, "val")
    assert len(files) == 3 and all(f.suffix == ".jsonl" for f in files)
    for rows in _sample().values():
        for row in rows:
            assert set(row) >= {"inputs_pretokenized", "label"} and row["label"] in (0, 1, 2, 3)
            assert "\nA. " in row["inputs_pretokenized"] and "\nD. " in row["inputs_pretokenized"]
    assert EXTRACTION_PROMPT == "综上所述，ABCD中正确的选项是："


def test_choice_ids_come_from_the_tokenizer(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    ids = choice_token_ids(tokenizer)
    assert ids == _letter_ids(tokenizer)
    assert [tokenizer.decode([i]).strip() for i in ids] == list("ABCD")


def test_no_cot_accuracy_matches_a_hand_computation(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    expected = _expected(model, tokenizer, cot_tokens=None)
    per_file, overall = _accuracy(expected)
    # Batches of 8 with left padding must give what each question gives alone.
    summary = evaluate_ceval(model, tokenizer, CEVAL_SAMPLE, cot=False, batch_size=8, show_progress=False)
    assert {str(r.path): r.predictions for r in summary["subjects"]} == expected
    assert {str(r.path): r.accuracy for r in summary["subjects"]} == pytest.approx(per_file)
    assert summary["accuracy"] == pytest.approx(overall)
    assert summary["count"] == 12


def test_cot_accuracy_matches_a_hand_computation(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    expected = _expected(model, tokenizer, cot_tokens=6)
    _, overall = _accuracy(expected)
    summary = evaluate_ceval(model, tokenizer, CEVAL_SAMPLE, cot=True, max_new_tokens=6, batch_size=4,
                             show_progress=False)
    assert {str(r.path): r.predictions for r in summary["subjects"]} == expected
    assert summary["accuracy"] == pytest.approx(overall)


def test_command_line_prints_subjects_and_the_weighted_average(model_and_tokenizer, capsys) -> None:
    model, tokenizer = model_and_tokenizer
    _, overall = _accuracy(_expected(model, tokenizer, cot_tokens=None))
    summary = ceval_main(["--data-dir", str(CEVAL_SAMPLE), "--no-cot", "--dtype", "float32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "STEM/computer_network: " in out and "Humanities/chinese_language_and_literature: " in out
    assert f"Average accuracy: {overall:.4f}" in out
    assert summary["accuracy"] == pytest.approx(overall)


def test_a_random_model_with_left_padding_still_matches(tmp_path) -> None:
    # A random ChatGLM2 model has no preference at all, so padding mistakes would show up as different argmaxes.
    tokenizer = embedded_tokenizer()
    model = tiny_model(2, padded_vocab_size=2048)
    summary = evaluate_ceval(model, tokenizer, CEVAL_SAMPLE, cot=False, batch_size=5, show_progress=False)
    assert {str(r.path): r.predictions for r in summary["subjects"]} == _expected(model, tokenizer, cot_tokens=None)
