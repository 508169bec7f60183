"""HTTP API for ChatGLM: the original `POST /` chat call and the ChatGLM-6B stream API (`/chat` + `/get_response`).

    python api.py                                          # the embedded demo model on 127.0.0.1:8000
    python api.py --model THUDM/chatglm2-6b --host 0.0.0.0 # a real model, reachable from other machines
    curl -X POST http://127.0.0.1:8000 -H 'Content-Type: application/json' -d '{"prompt": "你好", "history": []}'

Generation runs on one worker thread behind a bounded queue (chatglm.server), never on the event loop, so
the server answers other clients (GET /health, queued requests, polling) while a model call runs.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from chatglm import ChatEngine
from chatglm.cli import engine_from_args
from chatglm.server import (
    AsyncJobStream,
    GenerationWorker,
    JobCancelled,
    QueueFull,
    RequestTimeout,
    Text,
    add_server_arguments,
    consume,
    empty_cuda_cache,
    too_long_to_tokenize,
)

# The original api.py's values for a missing or falsy field (the same for ChatGLM-6B and ChatGLM2-6B).
ORIGINAL_DEFAULTS = {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}
# Finished stream-API answers stay readable this long (the original meant one hour but wrote 1000 hours).
STREAM_RESULT_TTL_S = 3600.0
MAX_STREAM_RESULTS = 10_000


# -- wire models ------------------------------------------------------------------------------------------------


class ChatRequest(BaseModel):
    """`POST /`. As in the original, a falsy max_length / top_p / temperature (missing, null, 0) means the
    default, so temperature 0 does NOT mean greedy here: send `do_sample: false` for greedy decoding."""

    prompt: Text
    history: list[tuple[Text, Text]] | None = Field(None, description="earlier turns as [query, response] pairs")
    max_length: int | None = Field(None, ge=0, description="prompt + answer tokens; falsy: 2048")
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="falsy: 0.7")
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False, description="falsy: 0.95")
    do_sample: bool | None = Field(None, description="extension: false = greedy decoding (default: sample)")


class ChatResponse(BaseModel):
    response: str
    history: list[tuple[str, str]]
    status: int = 200
    time: str = Field(description="local time the answer was finished, YYYY-MM-DD HH:MM:SS")


class StreamStartRequest(BaseModel):
    """`POST /chat`: start answering `query` in the background under a client-chosen id."""

    request_id: Text = Field(min_length=1)
    query: Text
    history: list[tuple[Text, Text]] | None = None
    max_length: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    do_sample: bool | None = None


class StreamPollRequest(BaseModel):
    request_id: Text


class StreamState(BaseModel):
    timestamp: int = Field(description="when /chat accepted the request, Unix time in milliseconds")
    response: str = Field(description="the answer so far")
    is_finished: bool
    is_handled: bool = Field(description="generation has started (false while the request waits in the queue)")
    error: str | None = Field(None, description="only when the request failed or timed out")


class StreamReply(BaseModel):
    """Codes: 0 ok, 100 busy (queue full), 101 request_id already exists, 102 request_id not exists."""

    code: int
    msg: str
    response: StreamState | None = None


class Health(BaseModel):
    status: str
    model: str
    queue: dict[str, Any]


# -- server -----------------------------------------------------------------------------------------------------


@dataclass
class ApiSettings:
    """Defaults for falsy request fields, and the operator's limits."""

    max_length: int = ORIGINAL_DEFAULTS["max_length"]
    top_p: float = ORIGINAL_DEFAULTS["top_p"]
    temperature: float = ORIGINAL_DEFAULTS["temperature"]
    do_sample: bool = True
    max_new_tokens: int | None = None
    max_queue: int = 64
    timeout: float | None = 600.0
    log_requests: bool = True


@dataclass
class _StreamEntry:
    timestamp: int
    response: str = ""
    is_finished: bool = False
    is_handled: bool = False
    error: str | None = None
    finished_at: float | None = None

    def state(self) -> StreamState:
        return StreamState(
            timestamp=self.timestamp, response=self.response, is_finished=self.is_finished,
            is_handled=self.is_handled, error=self.error,
        )


@dataclass
class _StreamRegistry:
    entries: dict[str, _StreamEntry] = field(default_factory=dict)

    def purge(self) -> None:
        now = time.monotonic()
        for key in [k for k, e in self.entries.items() if e.finished_at and now - e.finished_at > STREAM_RESULT_TTL_S]:
            del self.entries[key]
        if len(self.entries) > MAX_STREAM_RESULTS:
            finished = sorted((e.finished_at, k) for k, e in self.entries.items() if e.finished_at)
            for _, key in finished[: len(self.entries) - MAX_STREAM_RESULTS]:
                del self.entries[key]


def _now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())


def create_app(engine: ChatEngine, settings: ApiSettings | None = None) -> FastAPI:
    """The FastAPI app over `engine`; the worker thread starts and stops with the app's lifespan."""
    settings = settings or ApiSettings()
    on_gpu = engine.model.device.type == "cuda"
    worker = GenerationWorker(
        max_queue=settings.max_queue, timeout=settings.timeout, after_job=empty_cuda_cache if on_gpu else None
    )
    streams = _StreamRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(
        title="ChatGLM API",
        description="The original ChatGLM api.py (`POST /`) and the ChatGLM-6B stream API (`/chat`, `/get_response`).",
        version="1.0",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422, minus the echoed input: echoing a NaN would make the error itself fail (a 500).
        details = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse({"detail": details}, status_code=422)

    def options(req: ChatRequest | StreamStartRequest) -> dict[str, Any]:
        # Falsy -> default, exactly as the original; the model cannot read past its context, so cap there.
        kwargs: dict[str, Any] = {
            "max_length": min(req.max_length or settings.max_length, engine.max_context),
            "top_p": req.top_p or settings.top_p,
            "temperature": req.temperature or settings.temperature,
            "do_sample": settings.do_sample if req.do_sample is None else req.do_sample,
        }
        if settings.max_new_tokens:
            kwargs["max_new_tokens"] = settings.max_new_tokens
        return kwargs

    async def check_prompt(query: str, history: list[tuple[str, str]]) -> None:
        """400 when the prompt cannot fit the model's context (the model would otherwise fail on it)."""
        texts = [query] + [text for turn in history for text in turn]
        context = engine.max_context
        if too_long_to_tokenize(texts, context):
            raise HTTPException(400, f"the prompt is longer than the model's context of {context} tokens")
        messages: list[dict[str, str]] = []
        for q, r in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        messages.append({"role": "user", "content": query})
        try:
            # Tokenizing a long prompt takes a while: off the event loop, but not on the generation worker.
            ids = await asyncio.to_thread(engine.build_messages_input, messages)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        if ids.shape[1] >= context:
            raise HTTPException(
                400, f"the prompt is {ids.shape[1]} tokens; the model's context is {context} tokens"
            )

    def busy(exc: QueueFull) -> HTTPException:
        return HTTPException(429, "busy now: too many requests are waiting", headers={"Retry-After": str(exc.retry_after)})

    @app.post("/", response_model=ChatResponse, summary="Answer one chat turn (the original api.py)")
    async def chat(req: ChatRequest, request: Request) -> ChatResponse | JSONResponse:
        history = list(req.history or [])
        await check_prompt(req.prompt, history)
        kwargs = options(req)
        answer: list[Any] = [("", history + [(req.prompt, "")])]

        def run(_should_stop: Any) -> Iterator[tuple]:
            return engine.stream_chat(req.prompt, history, **kwargs)

        try:
            stream = AsyncJobStream(worker, run)
        except QueueFull as exc:
            raise busy(exc) from None
        try:
            connected = await consume(stream, request.receive, lambda item: answer.__setitem__(0, item))
        except RequestTimeout as exc:
            raise HTTPException(504, f"{exc} (limit {settings.timeout:g} s)") from None
        except JobCancelled as exc:
            raise HTTPException(503, str(exc)) from None
        except ValueError as exc:  # arguments the model rejects
            raise HTTPException(400, str(exc)) from None
        if not connected:
            return JSONResponse({"detail": "client disconnected"}, status_code=499)
        response, new_history = answer[0][0], answer[0][1]
        now = _now_text()
        if settings.log_requests:
            print(f'[{now}] ", prompt:"{req.prompt}", response:"{response!r}"', flush=True)
        return ChatResponse(response=response, history=new_history, status=200, time=now)

    @app.post("/chat", response_model=StreamReply, response_model_exclude_none=True,
              summary="Stream API: start answering in the background (poll /get_response)")
    async def start_stream(req: StreamStartRequest) -> StreamReply:
        streams.purge()
        if worker.is_full():
            return StreamReply(code=100, msg="busy now")
        if req.request_id in streams.entries:
            return StreamReply(code=101, msg="request_id already exists")
        entry = _StreamEntry(timestamp=int(time.time() * 1000))
        # Registered before the first await, so a concurrent duplicate id is caught by the check above.
        streams.entries[req.request_id] = entry
        history = list(req.history or [])
        try:
            await check_prompt(req.query, history)
        except HTTPException:
            del streams.entries[req.request_id]
            raise
        kwargs = options(req)

        def run(_should_stop: Any) -> Iterator[tuple]:
            entry.is_handled = True
            return engine.stream_chat(req.query, history, **kwargs)

        def on_item(item: tuple) -> None:
            entry.response = item[0]

        def on_end(error: BaseException | None) -> None:
            if error is not None:
                entry.error = str(error) or type(error).__name__
            entry.is_finished = True
            entry.finished_at = time.monotonic()

        try:
            worker.submit(run, on_item, on_end)
        except (QueueFull, JobCancelled):
            del streams.entries[req.request_id]
            return StreamReply(code=100, msg="busy now")
        return StreamReply(code=0, msg="start process")

    @app.post("/get_response", response_model=StreamReply, response_model_exclude_none=True,
              summary="Stream API: the answer so far for a request_id")
    async def get_response(req: StreamPollRequest) -> StreamReply:
        entry = streams.entries.get(req.request_id)
        if entry is None:
            return StreamReply(code=102, msg="request_id not exists")
        return StreamReply(code=0, msg="success", response=entry.state())

    @app.get("/health", response_model=Health, summary="Liveness and queue state (answers while generating)")
    @app.get("/", response_model=Health, include_in_schema=False)
    async def health() -> Health:
        return Health(status="ok", model=Path(engine.name).name, queue=worker.stats())

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="ChatGLM HTTP API: POST / (the original api.py) and the /chat + /get_response stream API.",
        epilog="--max-length/--top-p/--temperature set what a falsy request field means "
        "(defaults 2048 / 0.7 / 0.95, as the original; --temperature 0 makes greedy decoding the default).",
    )
    add_server_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="do not print each prompt and response")
    return parser


def settings_from_args(args: argparse.Namespace) -> ApiSettings:
    return ApiSettings(
        max_length=args.max_length or ORIGINAL_DEFAULTS["max_length"],
        top_p=args.top_p or ORIGINAL_DEFAULTS["top_p"],
        temperature=args.temperature or ORIGINAL_DEFAULTS["temperature"],
        do_sample=args.temperature != 0,
        max_new_tokens=args.max_new_tokens,
        max_queue=args.max_queue,
        timeout=args.timeout or None,
        log_requests=not args.quiet,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    engine = engine_from_args(args)
    app = create_app(engine, settings_from_args(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
