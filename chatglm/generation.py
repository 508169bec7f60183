"""The one token loop every chat path runs on: prefill, then one token at a time through the KV cache.

Sampling is owned here (temperature → top-k → top-p → multinomial, or argmax) instead of borrowing
transformers' private helpers, which changed between releases and broke the original remote code.
`model.generate(...)` still works through transformers' GenerationMixin for callers who want it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """If any score is NaN or ±inf, replace the row set by a harmless forced token (the original's guard).

    Half-precision overflow used to crash `torch.multinomial`; forcing token 5 (`▁` in ChatGLM-6B's
    vocabulary) keeps generation alive, and the caller sees an odd token rather than an exception.
    """

    def __init__(self, token_id: int = 5) -> None:
        self.token_id = token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.isnan(scores).any() or torch.isinf(scores).any():
            scores.zero_()
            scores[..., self.token_id] = 5e4
        return scores


@dataclass
class SamplingParams:
    """How to pick each next token. temperature 0 or do_sample=False means greedy (argmax)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        # A temperature this small would overflow the scaled scores to inf; it means "take the best token".
        return not self.do_sample or self.temperature < 1e-4


def apply_repetition_penalty(scores: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the sequence: divide positive scores, multiply negative."""
    picked = scores.gather(-1, seen_ids)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return scores.scatter(-1, seen_ids, picked)


def filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every score outside the top k and outside the smallest set whose mass reaches top_p."""
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the best token always stays.
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def eos_ids_for(config_eos: int | Sequence[int] | None) -> list[int]:
    """The ids that end an answer, or none when CHATGLM_IGNORE_EOS=1 (benchmarks and tests that need an
    answer to run to its length limit, like vLLM's ignore_eos)."""
    if os.environ.get("CHATGLM_IGNORE_EOS") == "1" or config_eos is None:
        return []
    return list(config_eos) if isinstance(config_eos, (list, tuple)) else [config_eos]


def sample_next_token(
    scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row from fp32 scores [batch, vocab]."""
    if params.greedy:
        return scores.argmax(-1)
    scores = filter_top_k_top_p(scores / params.temperature, params.top_k, params.top_p)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@dataclass
class GenerationStep:
    """One decoding step: the token chosen per row, and which rows have finished (EOS or limit)."""

    tokens: torch.Tensor  # [batch]
    finished: torch.Tensor  # [batch] bool
    cache: DynamicCache


@torch.inference_mode()
def generate_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cache: DynamicCache | None = None,
    params: SamplingParams | None = None,
    eos_token_ids: Sequence[int] = (),
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    logits_processors: Sequence = (),
    generator: torch.Generator | None = None,
) -> Iterator[GenerationStep]:
    """Yield the next token of every row until all rows hit an EOS id or a length limit.

    input_ids [batch, n]: tokens the cache has not seen (the whole prompt on a fresh cache), left-padded.
    attention_mask [batch, past + n]: 1 for real tokens, covering what the cache holds too. max_length
    bounds the whole context (cache + prompt + new tokens), max_new_tokens the generated part; finished
    rows keep emitting their EOS id until every row is done. The last token is not run through the
    model (nothing would read its logits), so the cache ends one token short of the sequence.
    """
    params = params or SamplingParams()
    batch = input_ids.shape[0]
    device = input_ids.device
    past = model.past_length(cache)
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + input_ids.shape[1], dtype=torch.long, device=device)
    if attention_mask.shape[1] != past + input_ids.shape[1]:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[1]} columns; expected {past} cached + {input_ids.shape[1]} new"
        )
    limit = max_new_tokens if max_new_tokens is not None else float("inf")
    if max_length is not None:
        limit = min(limit, max_length - attention_mask.shape[1])
    if limit <= 0:
        return
    eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
    tracked_ids = input_ids  # everything the positions are derived from (the cache's own tokens are not needed)
    step_ids = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    produced = 0
    while True:
        positions = model._position_ids_for_generation(tracked_ids, attention_mask)
        outputs = model(
            input_ids=step_ids,
            position_ids=positions[..., -step_ids.shape[1] :],
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            return_last_logit=True,
        )
        cache = outputs.past_key_values
        scores = outputs.logits[:, -1, :].float()
        for processor in logits_processors:
            scores = processor(tracked_ids, scores)
        if params.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(scores, tracked_ids, params.repetition_penalty)
        tokens = sample_next_token(scores, params, generator)
        # Rows already done repeat their EOS so a batch stays rectangular.
        tokens = torch.where(finished, eos[0], tokens)
        finished = finished | torch.isin(tokens, eos)
        produced += 1
        if produced >= limit:
            finished = torch.ones_like(finished)
        yield GenerationStep(tokens=tokens, finished=finished, cache=cache)
        if bool(finished.all()):
            return
        step_ids = tokens.unsqueeze(1)
        tracked_ids = torch.cat([tracked_ids, step_ids], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Run `generate_tokens` to the end and return the new tokens [batch, produced] (EOS included)."""
    steps = [step.tokens for step in generate_tokens(model, input_ids, attention_mask, **kwargs)]
    if not steps:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.stack(steps, dim=1)
