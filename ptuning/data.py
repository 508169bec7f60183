"""Turn prompt/response(/history) rows into model inputs, the way the original P-tuning script did.

Training rows become one fixed-length sequence `prompt + response + end` whose labels are -100 over the prompt
and the padding, so only the response is learned. Evaluation rows become a left-padded prompt (what `generate`
continues) and the response tokens as labels for the metrics. ChatGLM2 and ChatGLM-6B differ in the prompt
format and where the special tokens go (spec: ptuning_eval.md, "Example tokenisation for training").

With `--history_loss` (ChatGLM2 only, an addition) a row with history is instead one whole conversation whose
every answer is learned, each round tokenised the way a chat continuing from its KV cache feeds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chatglm.prompt import build_incremental_prompt_v2, build_prompt_v1, build_prompt_v2

IGNORE_INDEX = -100


def _history(value: Any) -> list[tuple[str, str]]:
    # JSON null, a missing column and [] all mean "no earlier turns".
    if not value:
        return []
    return [(str(q), str(r)) for q, r in value]


def build_prompt(version: int, query: str, history: Sequence[Sequence[str]] | None, source_prefix: str = "") -> str:
    """The chat prompt for one row: ChatGLM2 always uses `[Round N]` blocks, ChatGLM-6B the bare query when there
    is no history (as its chat() does)."""
    build = build_prompt_v2 if version == 2 else build_prompt_v1
    return (source_prefix or "") + build(query, _history(history))


def iter_rows(
    examples: dict[str, list[Any]], prompt_column: str, response_column: str, history_column: str | None
) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(query, response, history) for every row of a batch whose prompt and response are both non-empty."""
    rows = []
    for i in range(len(examples[prompt_column])):
        query, response = examples[prompt_column][i], examples[response_column][i]
        if not query or not response:
            continue
        history = _history(examples[history_column][i]) if history_column else []
        rows.append((str(query), str(response), history))
    return rows


def _ignore_or_pad(labels: list[int], pad_id: int, ignore_pad: bool) -> list[int]:
    return labels if ignore_pad else [pad_id if t == IGNORE_INDEX else t for t in labels]


def encode_train_v2(
    tokenizer: Any,
    prompt: str,
    answer: str,
    max_source_length: int,
    max_target_length: int,
    ignore_pad: bool = True,
    pad_to_max_length: bool = True,
) -> tuple[list[int], list[int]]:
    """ChatGLM2: `[gMASK] sop prompt` + answer + `</s>`, right-padded to max_source + max_target + 1.

    Labels are -100 wherever the original used the pad id and then replaced it, built directly so that a real
    token with id 0 inside the answer is still learned.
    """
    a_ids = tokenizer.encode(prompt, add_special_tokens=True, truncation=True, max_length=max_source_length)
    b_ids = tokenizer.encode(answer, add_special_tokens=False, truncation=True, max_length=max_target_length)
    eos = tokenizer.eos_token_id
    input_ids = a_ids + b_ids + [eos]
    labels = [IGNORE_INDEX] * len(a_ids) + b_ids + [eos]
    if pad_to_max_length:
        pad = max_source_length + max_target_length + 1 - len(input_ids)
        input_ids += [tokenizer.pad_token_id] * pad
        labels += [IGNORE_INDEX] * pad
    return input_ids, _ignore_or_pad(labels, tokenizer.pad_token_id, ignore_pad)


def encode_train_v1(
    tokenizer: Any,
    prompt: str,
    answer: str,
    max_source_length: int,
    max_target_length: int,
    ignore_pad: bool = True,
    pad_to_max_length: bool = True,
) -> tuple[list[int], list[int]]:
    """ChatGLM-6B: prompt + `[gMASK] <sop>` + answer + `<eop>`, right-padded to max_source + max_target.

    The loss starts at `<sop>` (the answer's first input position), as in the original.
    """
    a_ids = tokenizer.encode(prompt, add_special_tokens=False)[: max_source_length - 1]
    b_ids = tokenizer.encode(answer, add_special_tokens=False)[: max_target_length - 2]
    input_ids = tokenizer.build_inputs_with_special_tokens(a_ids, b_ids)
    context_length = input_ids.index(tokenizer.bos_token_id)
    labels = [IGNORE_INDEX] * context_length + input_ids[context_length:]
    if pad_to_max_length:
        pad = max_source_length + max_target_length - len(input_ids)
        input_ids = input_ids + [tokenizer.pad_token_id] * pad
        labels = labels + [IGNORE_INDEX] * pad
    return input_ids, _ignore_or_pad(labels, tokenizer.pad_token_id, ignore_pad)


def encode_conversation_v2(
    tokenizer: Any,
    turns: Sequence[tuple[str, str]],
    max_source_length: int,
    max_target_length: int,
    source_prefix: str = "",
) -> tuple[list[int], list[int]]:
    """ChatGLM2 conversation with every answer labelled: `[gMASK] sop` round 1, answer 1, round 2, answer 2, ...,
    `</s>`; prompts are -100.

    Round n > 1 is tokenised on its own (`\n\n[Round n]\n\n问：…\n\n答：` without its leading `▁`), exactly as
    `stream_chat` appends it to the KV cache, so training sees the token boundaries a multi-turn chat produces.
    The oldest rounds are dropped while the whole exceeds max_source_length + max_target_length + 1 tokens.
    """
    budget = max_source_length + max_target_length + 1
    turns = list(turns)
    while True:
        ids: list[int] = []
        labels: list[int] = []
        for i, (query, answer) in enumerate(turns):
            if i == 0:
                prompt_ids = tokenizer.encode((source_prefix or "") + build_prompt_v2(query), add_special_tokens=True)
            else:
                text = build_incremental_prompt_v2(query, turns[:i])
                prompt_ids = tokenizer.encode(text, add_special_tokens=False)[1:]
            answer_ids = tokenizer.encode(answer, add_special_tokens=False)[:max_target_length]
            ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
        if len(ids) <= budget or len(turns) == 1:
            return ids[:budget], labels[:budget]
        turns = turns[1:]


def preprocess_train(
    examples: dict[str, list[Any]], tokenizer: Any, data_args: Any, version: int
) -> dict[str, list[list[int]]]:
    """datasets.map function (batched) for training rows."""
    encode = encode_train_v2 if version == 2 else encode_train_v1
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for query, response, history in iter_rows(
        examples, data_args.prompt_column, data_args.response_column, data_args.history_column
    ):
        if getattr(data_args, "history_loss", False) and history:
            if version != 2:
                raise ValueError("--history_loss is implemented for ChatGLM2 models only")
            input_ids, labels = encode_conversation_v2(
                tokenizer, history + [(query, response)], data_args.max_source_length, data_args.max_target_length,
                data_args.source_prefix,
            )
            if data_args.pad_to_max_length:
                pad = data_args.max_source_length + data_args.max_target_length + 1 - len(input_ids)
                input_ids, labels = input_ids + [tokenizer.pad_token_id] * pad, labels + [IGNORE_INDEX] * pad
            out["input_ids"].append(input_ids)
            out["labels"].append(_ignore_or_pad(labels, tokenizer.pad_token_id, data_args.ignore_pad_token_for_loss))
            continue
        prompt = build_prompt(version, query, history, data_args.source_prefix)
        input_ids, labels = encode(
            tokenizer, prompt, response, data_args.max_source_length, data_args.max_target_length,
            data_args.ignore_pad_token_for_loss, data_args.pad_to_max_length,
        )
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
    return out


def preprocess_eval(
    examples: dict[str, list[Any]], tokenizer: Any, data_args: Any, version: int
) -> dict[str, list[list[int]]]:
    """datasets.map function (batched) for evaluation / prediction rows: left-padded prompts, response labels."""
    prompts, targets = [], []
    for query, response, history in iter_rows(
        examples, data_args.prompt_column, data_args.response_column, data_args.history_column
    ):
        prompts.append(build_prompt(version, query, history, data_args.source_prefix))
        targets.append(response)
    if not prompts:
        return {"input_ids": [], "attention_mask": [], "labels": []}
    inputs = tokenizer(prompts, max_length=data_args.max_source_length, truncation=True, padding=True)
    labels = tokenizer(targets, max_length=data_args.val_max_target_length, truncation=True)["input_ids"]
    pad = tokenizer.pad_token_id
    if data_args.ignore_pad_token_for_loss:
        labels = [[t if t != pad else IGNORE_INDEX for t in row] for row in labels]
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}


@dataclass
class Seq2SeqCollator:
    """Stack a batch, padding rows of unequal length.

    Training rows (input_ids + labels, no attention mask) are right-padded: the padding then follows the
    answer, where causal attention keeps it from influencing any learned position, and positions need no
    correction. Generation rows (with an attention mask) are left-padded like the tokenizer pads, so every
    prompt ends at the last column. Labels are padded with -100, masks with 0.

    transformers' DataCollatorForSeq2Seq would route training rows through the tokenizer's pad (which adds
    position ids and masks) and, since 4.3x, leaves ragged labels unpadded.
    """

    pad_token_id: int
    label_pad_token_id: int = IGNORE_INDEX

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        left = "attention_mask" in features[0]
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            rows = [list(f[key]) for f in features]
            width = max(len(r) for r in rows)
            fill = {"input_ids": self.pad_token_id, "labels": self.label_pad_token_id}.get(key, 0)
            padded = [([fill] * (width - len(r)) + r) if left else (r + [fill] * (width - len(r))) for r in rows]
            batch[key] = torch.tensor(padded, dtype=torch.long)
        return batch
