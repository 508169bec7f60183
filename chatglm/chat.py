"""`model.chat` and `model.stream_chat`: the original public chat API, on top of `generation.generate_tokens`.

There is one streaming core. `chat` runs `stream_chat` to the end; `stream_chat` turns the token stream
into growing response text and never yields text that ends inside a UTF-8 character (the tokenizer
decodes a half-finished byte sequence as U+FFFD). Prompt formats and response clean-up live in
`chatglm.prompt`, so the servers and demos share them without going through a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache

from . import prompt as prompts
from .generation import InvalidScoreLogitsProcessor, SamplingParams, eos_ids_for, generate_tokens

History = list[tuple[str, str]]

# Per-version defaults of the original chat()/stream_chat() signatures (spec/chat.md).
CHAT_DEFAULTS = {
    1: {"max_length": 2048, "top_p": 0.7, "temperature": 0.95},
    2: {"max_length": 8192, "top_p": 0.8, "temperature": 0.8},
}

# Generation kwargs that mean something to the token loop; anything else is rejected by name.
_LOOP_KWARGS = {"top_k", "repetition_penalty", "max_new_tokens", "generator"}


def process_response(version: int, text: str) -> str:
    return prompts.process_response_v1(text) if version == 1 else prompts.process_response_v2(text)


def is_complete_text(text: str) -> bool:
    """False while the text ends in U+FFFD, i.e. a multi-byte character has only partly been generated."""
    return bool(text) and not text.endswith("\ufffd")


class IncrementalDecoder:
    """Token ids in, text deltas out, decoding only a short window per token instead of the whole answer.

    Each step decodes the tokens since the last emitted boundary twice, with and without the newest ones,
    and emits the difference once it no longer ends in a partial UTF-8 character. Decoding a window rather
    than a lone token keeps SentencePiece's word-initial spaces right.
    """

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        window = self.ids[self._prefix_offset :]
        before = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset]) if self._read_offset > self._prefix_offset else ""
        after = self.tokenizer.decode(window)
        if len(after) > len(before) and is_complete_text(after) and after.startswith(before):
            delta = after[len(before) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def final_text(self) -> str:
        """Everything decoded, minus a replacement char left by a character cut off at the end."""
        return self.tokenizer.decode(self.ids).rstrip("\ufffd")


class ChatMixin:
    """Adds the original `chat` / `stream_chat` API to a ChatGLM model class."""

    def _chat_defaults(self, max_length: int | None, top_p: float | None, temperature: float | None) -> dict[str, Any]:
        defaults = CHAT_DEFAULTS[self.config.version]
        return {
            "max_length": defaults["max_length"] if max_length is None else max_length,
            "top_p": defaults["top_p"] if top_p is None else top_p,
            "temperature": defaults["temperature"] if temperature is None else temperature,
        }

    @torch.inference_mode()
    def chat(
        self,
        tokenizer,  # noqa: ANN001 - a ChatGLMTokenizer
        query: str,
        history: History | None = None,
        max_length: int | None = None,
        num_beams: int = 1,
        do_sample: bool = True,
        top_p: float | None = None,
        temperature: float | None = None,
        logits_processor: list | None = None,
        **kwargs: Any,
    ) -> tuple[str, History]:
        """Answer `query` given `history`; returns (response, history + [(query, response)]).

        Defaults follow the original per version (ChatGLM2: max_length 8192, top_p 0.8, temperature 0.8;
        ChatGLM-6B: 2048, 0.7, 0.95). This is `stream_chat` run to its last item.
        """
        if num_beams != 1:
            raise ValueError("chat() samples or decodes greedily; use model.generate(num_beams=...) for beam search")
        response, new_history = "", list(history or []) + [(query, "")]
        for item in self.stream_chat(
            tokenizer, query, history, max_length=max_length, do_sample=do_sample, top_p=top_p,
            temperature=temperature, logits_processor=logits_processor, **kwargs,
        ):
            response, new_history = item[0], item[1]
        return response, new_history

    @torch.inference_mode()
    def stream_chat(
        self,
        tokenizer,  # noqa: ANN001 - a ChatGLMTokenizer
        query: str,
        history: History | None = None,
        past_key_values: DynamicCache | None = None,
        max_length: int | None = None,
        do_sample: bool = True,
        top_p: float | None = None,
        temperature: float | None = None,
        logits_processor: list | None = None,
        return_past_key_values: bool = False,
        **kwargs: Any,
    ) -> Iterator[tuple[str, History] | tuple[str, History, DynamicCache]]:
        """Yield (response_so_far, history_with_it) as the answer grows, or with the KV cache appended when
        `return_past_key_values` is set (ChatGLM2 only).

        Passing back the returned `past_key_values` together with the history continues the conversation
        without re-encoding it: only the new round's tokens are run through the model. The returned cache
        then holds the whole conversation, the answer's last token included.
        """
        history = list(history or [])
        unknown = set(kwargs) - _LOOP_KWARGS
        if unknown:
            raise TypeError(f"stream_chat() got unexpected generation arguments: {sorted(unknown)}")
        version = self.config.version
        if version == 1 and (past_key_values is not None or return_past_key_values):
            raise ValueError("KV-cache reuse across turns is a ChatGLM2 feature; ChatGLM-6B re-encodes the history")
        options = self._chat_defaults(max_length, top_p, temperature)
        params = SamplingParams(
            do_sample=do_sample,
            temperature=options["temperature"],
            top_p=options["top_p"],
            top_k=kwargs.get("top_k", 0),
            repetition_penalty=kwargs.get("repetition_penalty", 1.0),
        )
        # The guard looks at the model's own scores, before user processors that may mask with -inf on purpose.
        processors = [InvalidScoreLogitsProcessor()] + list(logits_processor or [])

        continuing = past_key_values is not None or return_past_key_values
        if version == 2 and continuing:
            inputs = tokenizer.build_stream_inputs(query, history)
        else:
            inputs = tokenizer.build_chat_input(query, history)
        input_ids = inputs["input_ids"].to(self.device)
        past = self.past_length(past_key_values)
        attention_mask = torch.ones(1, past + input_ids.shape[1], dtype=torch.long, device=self.device)

        eos_ids = eos_ids_for(self.config.eos_token_id)
        decoder = IncrementalDecoder(tokenizer)
        yielded = False
        cache = past_key_values
        ended_by_eos = False
        steps = generate_tokens(
            self, input_ids, attention_mask, cache=cache, params=params, eos_token_ids=eos_ids,
            max_length=options["max_length"], max_new_tokens=kwargs.get("max_new_tokens"),
            logits_processors=processors, generator=kwargs.get("generator"),
        )
        for step in steps:
            cache = step.cache
            token = int(step.tokens[0])
            if token in eos_ids:
                ended_by_eos = True
                break
            if decoder.push(token):
                response = process_response(version, decoder.text)
                new_history = history + [(query, response)]
                yielded = True
                yield (response, new_history, cache) if return_past_key_values else (response, new_history)
        steps.close()
        generated = decoder.ids
        if return_past_key_values and generated and not ended_by_eos:
            # The loop never feeds its last token; run it so the cache covers the whole answer.
            self(
                input_ids=torch.tensor([[generated[-1]]], device=self.device),
                position_ids=None if version == 1 else torch.tensor([[self.past_length(cache)]], device=self.device),
                past_key_values=cache,
                use_cache=True,
                return_last_logit=True,
            )
        final_text = decoder.final_text()
        response = process_response(version, final_text)
        # Always end on the final text, also when nothing printable was generated (chat() needs an item).
        if final_text != decoder.text or not yielded:
            new_history = history + [(query, response)]
            yield (response, new_history, cache) if return_past_key_values else (response, new_history)
