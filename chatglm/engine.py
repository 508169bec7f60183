"""The engine every script and server calls: one loaded model + tokenizer, chat turns and completions.

Scripts never build prompts, sample or stream on their own; they hold a `Conversation` (history and,
for ChatGLM2, the KV cache) per user and call `ChatEngine.stream_reply`, or `stream_completion` for
OpenAI-style message lists. The engine itself keeps no per-user state, so one engine serves many sessions;
its lock lets one generation use the model at a time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from . import prompt as prompts
from .chat import CHAT_DEFAULTS, History, IncrementalDecoder, process_response
from .generation import InvalidScoreLogitsProcessor, SamplingParams, eos_ids_for, generate_tokens

EMBEDDED_MODEL_DIR = Path(__file__).parent / "assets" / "tiny-chatglm2"
DEMO_MODEL_NOTICE = (
    "Using the small embedded demo model (a few MB, it only knows a few phrases). For real answers pass "
    "--model THUDM/chatglm2-6b (or a local folder), or set CHATGLM_MODEL."
)


def default_model_path() -> str:
    """$CHATGLM_MODEL if set, else the tiny demo checkpoint shipped inside the package."""
    return os.environ.get("CHATGLM_MODEL") or str(EMBEDDED_MODEL_DIR)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: int | None = None,
    **kwargs: Any,
) -> tuple[torch.nn.Module, Any]:
    """Load (model, tokenizer) from a folder or hub id; None means `default_model_path()`.

    device: "cpu", "cuda", "cuda:1", "mps"; default: CUDA if present, else MPS, else CPU.
    dtype: default fp16 on GPUs (the checkpoint's), bf16 for fp16 checkpoints on CPU.
    quantize: 4 or 8 to quantize a float checkpoint while loading.
    """
    from .loading import load_pretrained, resolve_device, resolve_model_dir
    from .tokenization_chatglm import ChatGLMTokenizer

    name_or_path = name_or_path or default_model_path()
    folder = resolve_model_dir(name_or_path)
    model = load_pretrained(folder, device=resolve_device(device), dtype=dtype, quantize=quantize, **kwargs)
    tokenizer = ChatGLMTokenizer.from_pretrained(str(folder))
    return model, tokenizer


@dataclass
class Conversation:
    """One user's chat state: the (query, response) history and, for ChatGLM2, the KV cache that holds it."""

    history: History = field(default_factory=list)
    past_key_values: DynamicCache | None = None

    def clear(self) -> None:
        self.history = []
        self.past_key_values = None


@dataclass
class CompletionChunk:
    """A piece of a streamed completion. The last chunk has `finish_reason` ("stop" or "length")."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatEngine:
    """A loaded ChatGLM model with the chat operations the front ends need."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str = "chatglm") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        quantize: int | None = None,
        **kwargs: Any,
    ) -> "ChatEngine":
        """Load a model (default: `default_model_path()`) and wrap it. See `load_model` for the arguments."""
        name_or_path = str(name_or_path or default_model_path())
        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype, quantize=quantize, **kwargs)
        return cls(model, tokenizer, name=name_or_path)

    @property
    def is_demo_model(self) -> bool:
        return Path(self.name).resolve() == EMBEDDED_MODEL_DIR.resolve()

    @property
    def version(self) -> int:
        return self.model.config.version

    @property
    def display_name(self) -> str:
        return "ChatGLM2-6B" if self.version == 2 else "ChatGLM-6B"

    @property
    def defaults(self) -> dict[str, float]:
        """This version's chat defaults: max_length, top_p, temperature."""
        return dict(CHAT_DEFAULTS[self.version])

    @property
    def max_context(self) -> int:
        return self.model.config.max_positions

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    # -- the original chat API ---------------------------------------------------------------------------------

    def stream_chat(self, query: str, history: History | None = None, **kwargs: Any) -> Iterator[tuple]:
        """`model.stream_chat` under the engine lock; same arguments and yields."""
        with self.lock:
            yield from self.model.stream_chat(self.tokenizer, query, history, **kwargs)

    def chat(self, query: str, history: History | None = None, **kwargs: Any) -> tuple[str, History]:
        """`model.chat` under the engine lock: (response, new_history)."""
        with self.lock:
            return self.model.chat(self.tokenizer, query, history, **kwargs)

    def stream_reply(self, conversation: Conversation, query: str, **kwargs: Any) -> Iterator[str]:
        """Answer `query` in `conversation`, yielding the text added at each step.

        The conversation is updated as the answer grows (history always holds the latest text), so an
        answer stopped early (closing this generator, Ctrl-C) keeps what was said. ChatGLM2 continues from
        the conversation's KV cache; a stopped answer drops the cache, because the cache and the text can
        disagree by the tokens not yet decoded, and the next turn re-encodes the history instead.
        """
        use_cache = self.version == 2
        history = list(conversation.history)
        shown = ""
        finished = False
        try:
            if use_cache:
                stream = self.stream_chat(
                    query, history, past_key_values=conversation.past_key_values, return_past_key_values=True, **kwargs
                )
            else:
                stream = self.stream_chat(query, history, **kwargs)
            for item in stream:
                response, new_history = item[0], item[1]
                conversation.history = new_history
                if use_cache:
                    conversation.past_key_values = item[2]
                # Post-processing (strip, punctuation) can rewrite earlier text; only whole extensions stream.
                if response.startswith(shown):
                    delta, shown = response[len(shown) :], response
                    if delta:
                        yield delta
            finished = True
        finally:
            if not finished:
                conversation.past_key_values = None
            elif not conversation.history or conversation.history[-1][0] != query:
                conversation.history = history + [(query, shown)]

    # -- OpenAI-style completions ------------------------------------------------------------------------------

    def build_messages_input(self, messages: list[dict]) -> torch.Tensor:
        """Token ids [1, n] of the prompt for OpenAI-style messages (see prompt.messages_to_query_history)."""
        query, history = prompts.messages_to_query_history(messages)
        return self.tokenizer.build_chat_input(query, history)["input_ids"]

    def stream_completion(
        self,
        messages: list[dict],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        cancelled: Callable[[], bool] | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> Iterator[CompletionChunk]:
        """Stream the assistant's answer to `messages` as text deltas; the last chunk carries the finish
        reason and token counts. `stop` strings end the answer and are never emitted, not even in part;
        `cancelled()` is polled every token so a disconnected client stops generation within one step.
        """
        stop = [s for s in (stop or []) if s]
        defaults = self.defaults
        params = SamplingParams(
            do_sample=True,
            temperature=defaults["temperature"] if temperature is None else temperature,
            top_p=defaults["top_p"] if top_p is None else top_p,
        )
        if input_ids is None:
            input_ids = self.build_messages_input(messages)
        input_ids = input_ids.to(self.model.device)
        prompt_tokens = int(input_ids.shape[1])
        room = self.max_context - prompt_tokens
        max_new_tokens = room if max_new_tokens is None else min(max_new_tokens, room)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        eos_ids = eos_ids_for(self.model.config.eos_token_id)
        decoder = IncrementalDecoder(self.tokenizer)
        emitted = ""
        finish_reason = "length"
        with self.lock:
            steps = generate_tokens(
                self.model, input_ids, params=params, eos_token_ids=eos_ids, max_new_tokens=max_new_tokens,
                logits_processors=[InvalidScoreLogitsProcessor()], generator=generator,
            )
            try:
                for step in steps:
                    token = int(step.tokens[0])
                    if token in eos_ids:
                        finish_reason = "stop"
                        break
                    if cancelled is not None and cancelled():
                        finish_reason = "cancelled"
                        break
                    if not decoder.push(token):
                        continue
                    text = decoder.text
                    cut = min((text.find(s) for s in stop if s in text), default=-1)
                    if cut >= 0:
                        finish_reason = "stop"
                        text = text[:cut]
                    else:
                        # Hold back a tail that could still grow into a stop string.
                        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                        text = text[: len(text) - hold]
                    if len(text) > len(emitted) and text.startswith(emitted):
                        yield CompletionChunk(text[len(emitted) :])
                        emitted = text
                    if cut >= 0:
                        break
                    if cancelled is not None and cancelled():
                        finish_reason = "cancelled"
                        break
            finally:
                steps.close()
        if finish_reason == "length":
            # Flush what was held back for a stop string that never came.
            text = decoder.final_text()
            if len(text) > len(emitted) and text.startswith(emitted):
                yield CompletionChunk(text[len(emitted) :])
        yield CompletionChunk("", finish_reason, prompt_tokens, len(decoder.ids))

    def complete(self, messages: list[dict], **kwargs: Any) -> CompletionChunk:
        """The whole answer at once: `stream_completion` joined."""
        parts, last = [], CompletionChunk("")
        for chunk in self.stream_completion(messages, **kwargs):
            parts.append(chunk.text)
            last = chunk
        return CompletionChunk("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens)

    def postprocess(self, text: str) -> str:
        """The version's response clean-up (the original's process_response)."""
        return process_response(self.version, text)
