"""OpenAI-compatible API for ChatGLM: `GET /v1/models`, `POST /v1/chat/completions` (streaming or not).

    python openai_api.py                                   # the embedded demo model on 127.0.0.1:8000
    python openai_api.py --model THUDM/chatglm2-6b --api-key sk-local-1 --cors-origins http://localhost:3000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
    client.chat.completions.create(model="chatglm2-6b", messages=[{"role": "user", "content": "你好"}])

Every error is an OpenAI error body, `{"error": {"message", "type", "param", "code"}}`, with the status the
SDKs map to the right exception (400 bad request, 401 key, 404 route/model, 429 busy + Retry-After, 504
timeout); the README section "API servers" has the full table. Generation runs on one worker thread behind a bounded queue
(chatglm.server); a client that disconnects stops its generation within one decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from chatglm import ChatEngine
from chatglm.cli import engine_from_args
from chatglm.engine import CompletionChunk
from chatglm.server import (
    ApiKeys,
    AsyncJobStream,
    GenerationWorker,
    JobCancelled,
    QueueFull,
    RequestTimeout,
    Text,
    add_server_arguments,
    api_keys_from,
    consume,
    empty_cuda_cache,
    split_list,
    too_long_to_tokenize,
)

logger = logging.getLogger("chatglm.openai_api")

API_KEYS_ENV = "CHATGLM_API_KEYS"
# OpenAI's own documented bounds; a seed must fit a signed 64-bit integer.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_SEQUENCES = 16
# Holding back a possible stop-string prefix costs time per token that grows with the square of its length.
MAX_STOP_CHARS = 512
# Bodies larger than this are refused before they are read (a 1 MB prompt is far below it).
MAX_BODY_BYTES = 32 * 1024 * 1024


# -- errors -----------------------------------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def timeout_error(limit: float | None) -> OpenAIError:
    # Retrying the same request would most likely time out again, so tell the SDKs not to (they retry 5xx).
    within = f" within the server's limit of {limit:g} s" if limit else ""
    return OpenAIError(
        504, f"the request did not finish{within}", type="timeout_error",
        code="timeout", headers={"x-should-retry": "false"},
    )


# -- wire models ------------------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    # Clients send many fields a local server cannot honour (tools, logprobs, user, metadata, vendor extras):
    # they are accepted and ignored, never a validation error.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: Text
    text: Text | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' is treated as 'system'; tool and function messages are not supported (400)"
    )
    content: Text | list[ContentPart] | None = Field(None, description="text, or a list of text parts")
    name: Text | None = None


StopText = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class ChatCompletionRequest(_Lenient):
    model: Text
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="0 = greedy decoding")
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="0 = greedy decoding")
    n: int | None = Field(None, ge=1, description="only 1 is supported")
    max_tokens: int | None = Field(None, ge=1, description="cap on generated tokens (clamped to the context)")
    max_completion_tokens: int | None = Field(None, ge=1, description="as max_tokens; wins when both are set")
    stop: StopText | list[StopText] | None = Field(
        None, description=f"up to {MAX_STOP_SEQUENCES} strings of at most {MAX_STOP_CHARS} characters"
    )
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: Any | None = None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatglm"
    root: str | None = None
    parent: str | None = None
    context_length: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = []


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model or route"),
        (429, "queue full; see Retry-After"), (504, "the request timed out"),
    ]
}


# -- settings ---------------------------------------------------------------------------------------------------


@dataclass
class OpenAISettings:
    served_model_name: str | None = None
    # Names also accepted as `model`. The original server advertised gpt-3.5-turbo, and clients keep it.
    model_aliases: list[str] | None = None
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    cors_origins: list[str] = field(default_factory=list)
    max_queue: int = 64
    timeout: float | None = 600.0
    max_new_tokens: int | None = None
    max_length: int | None = None  # context cap in tokens (prompt + answer); default: the model's
    temperature: float | None = None  # used when a request has none; default: the model version's
    top_p: float | None = None


def default_served_name(engine: ChatEngine) -> str:
    """The last part of the model's path or hub id, e.g. THUDM/chatglm2-6b -> chatglm2-6b."""
    return Path(str(engine.name).rstrip("/\\")).name or engine.display_name.lower()


# -- middleware -------------------------------------------------------------------------------------------------


class OpenAIGate:
    """Pure ASGI middleware (so streaming and disconnect detection are untouched): tolerates a trailing slash,
    refuses oversized bodies and checks API keys on every /v1/* route, answering with OpenAI error bodies."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
            path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error: OpenAIError | None = None
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            error = OpenAIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
        elif (
            (path == "/v1" or path.startswith("/v1/"))
            and scope["method"] != "OPTIONS"  # CORS preflights carry no credentials by design
            and not self.keys.allows(headers.get("authorization"))
        ):
            error = OpenAIError(
                401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """FastAPI's 422 details -> one OpenAI 400 naming the offending field."""
    errors = exc.errors()
    # Of a union's failures, the deepest one explains best (["x" * 600] fails as "too long", not "not a string").
    chosen = max(errors, key=lambda e: len(e.get("loc", ())), default={})
    kind = chosen.get("type", "")
    if kind == "json_invalid":
        return OpenAIError(400, "the request body is not valid JSON", code="invalid_json")
    # Drop "body" and the union-member tags pydantic adds ("str", "function-after[...]", "list[ContentPart]").
    loc = [str(part) for part in chosen.get("loc", ()) if part != "body" and not _is_type_tag(part)]
    param = ".".join(loc) or None
    message = chosen.get("msg", "invalid request")
    if kind == "missing":
        return OpenAIError(400, f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    if param is None:
        return OpenAIError(400, f"the request body must be a JSON object ({message})", code="invalid_request_body")
    return OpenAIError(400, f"invalid value for '{param}': {message}", param=param, code="invalid_value")


# -- the app ----------------------------------------------------------------------------------------------------


def create_app(engine: ChatEngine, settings: OpenAISettings | None = None) -> FastAPI:
    """The FastAPI app over `engine`; the worker thread starts and stops with the app's lifespan."""
    settings = settings or OpenAISettings()
    served = settings.served_model_name or default_served_name(engine)
    aliases = settings.model_aliases
    if aliases is None:
        aliases = [engine.display_name.lower(), "gpt-3.5-turbo"]
    model_names = list(dict.fromkeys([served, *aliases]))
    # The full --model value (a hub id or folder) is also understood, without being advertised.
    accepted = set(model_names) | {str(engine.name)}
    context = min(engine.max_context, settings.max_length or engine.max_context)
    started = int(time.time())
    worker = GenerationWorker(max_queue=settings.max_queue, timeout=settings.timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            empty_cuda_cache()

    app = FastAPI(
        title="ChatGLM OpenAI-compatible API",
        description="Chat completions in the OpenAI wire format, served by a ChatGLM model.",
        version="1.0",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.worker = worker
    app.add_middleware(OpenAIGate, keys=settings.api_keys)
    if settings.cors_origins:
        # Added last, so it wraps the gate: preflights are answered, and 401s carry CORS headers too.
        wildcard = "*" in settings.cors_origins
        app.add_middleware(
            CORSMiddleware,
            allow_origins=["*"] if wildcard else settings.cors_origins,
            allow_credentials=not wildcard,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = OpenAIError(404, f"unknown route: {request.method} {request.url.path}", code="unknown_url")
        elif exc.status_code == 405:
            error = OpenAIError(405, f"method {request.method} is not allowed on {request.url.path}",
                                code="method_not_allowed")
        elif exc.status_code == 400:  # FastAPI could not even parse the body (bad UTF-8, nesting too deep)
            error = OpenAIError(400, f"the request body could not be parsed: {exc.detail}", code="invalid_json")
        else:
            error = OpenAIError(exc.status_code, str(exc.detail), code=None)
        error.headers = dict(exc.headers or {}) or None
        return error.response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=exc)
        return OpenAIError(500, "internal server error", type="server_error", headers={"x-should-retry": "false"}).response()

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, created=started, root=served, context_length=context)

    @app.get("/health", summary="Liveness and queue state (no API key needed)")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served, "queue": worker.stats()}

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[card(name) for name in model_names])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def retrieve_model(model_id: str) -> ModelCard:
        if model_id not in accepted:
            raise _unknown_model(model_id)
        return card(model_id)

    def _unknown_model(name: str) -> OpenAIError:
        return OpenAIError(
            404, f"The model '{name}' does not exist. This server serves: {', '.join(model_names)}.",
            param="model", code="model_not_found",
        )

    def sampling(req: ChatCompletionRequest) -> dict[str, Any]:
        temperature = req.temperature if req.temperature is not None else settings.temperature
        top_p = req.top_p if req.top_p is not None else settings.top_p
        if top_p == 0:
            # Only the single most likely token survives top_p 0: that is greedy decoding.
            temperature, top_p = 0.0, None
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP_SEQUENCES:
            raise OpenAIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences are supported", param="stop",
                              code="invalid_value")
        requested = req.max_completion_tokens or req.max_tokens
        caps = [n for n in (requested, settings.max_new_tokens) if n]
        return {
            "temperature": temperature, "top_p": top_p, "stop": stop, "seed": req.seed,
            "max_new_tokens": min(caps) if caps else None,
        }

    async def prompt_ids(messages: list[dict[str, Any]]) -> Any:
        texts = []
        for m in messages:
            content = m["content"]
            texts += [content] if isinstance(content, str) else [p.get("text") or "" for p in content or []]
        if too_long_to_tokenize(texts, context):
            raise _context_error(None)
        try:
            # Tokenizing a long prompt takes a while: off the event loop, but not on the generation worker.
            ids = await asyncio.to_thread(engine.build_messages_input, messages)
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="messages", code="invalid_value") from None
        if ids.shape[1] >= context:
            raise _context_error(int(ids.shape[1]))
        return ids

    def _context_error(tokens: int | None) -> OpenAIError:
        size = "far more than that" if tokens is None else f"{tokens} tokens"
        return OpenAIError(
            400, f"This model's maximum context length is {context} tokens; the messages are {size} "
            "(the answer needs at least one more). Shorten the messages.",
            param="messages", code="context_length_exceeded",
        )

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERROR_RESPONSES,
              summary="Create a chat completion (set stream: true for server-sent events)")
    async def create_chat_completion(req: ChatCompletionRequest, request: Request) -> Any:
        if req.model not in accepted:
            raise _unknown_model(req.model)
        if req.n not in (None, 1):
            raise OpenAIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        # 'developer' is the newer name of 'system'; chatglm.prompt folds every system text into the query.
        messages = [
            {"role": "system" if m.role == "developer" else m.role,
             "content": m.content if not isinstance(m.content, list) else [p.model_dump() for p in m.content]}
            for m in req.messages
        ]
        options = sampling(req)
        ids = await prompt_ids(messages)
        room = context - int(ids.shape[1])
        options["max_new_tokens"] = min(options["max_new_tokens"] or room, room)

        def run(should_stop: Any) -> Iterator[CompletionChunk]:
            return engine.stream_completion(messages, input_ids=ids, cancelled=should_stop, **options)

        try:
            stream = AsyncJobStream(worker, run)
        except QueueFull as exc:
            raise OpenAIError(
                429, "The server is busy: too many requests are waiting. Retry after a short wait.",
                type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except JobCancelled as exc:
            raise OpenAIError(503, str(exc), type="server_error", code="shutting_down") from None

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _sse_events(stream, completion_id, created, served, include_usage, settings.timeout)

            async def client_closed(_message: Any) -> None:
                stream.close()

            return EventSourceResponse(
                events, sep="\n", ping=15, headers={"Cache-Control": "no-cache"},
                client_close_handler_callable=client_closed,
            )

        parts: list[str] = []
        last: list[CompletionChunk] = []

        def collect(chunk: CompletionChunk) -> None:
            parts.append(chunk.text)
            if chunk.finish_reason:
                last.append(chunk)

        try:
            connected = await consume(stream, request.receive, collect)
        except RequestTimeout:
            raise timeout_error(settings.timeout) from None
        except JobCancelled as exc:
            raise OpenAIError(503, str(exc), type="server_error", code="cancelled") from None
        if not connected or not last:
            # The client is gone; nobody reads this.
            return JSONResponse({"error": {"message": "client disconnected", "type": "cancelled"}}, status_code=499)
        final = last[-1]
        return ChatCompletion(
            id=completion_id, created=created, model=served,
            choices=[Choice(index=0, message=ResponseMessage(content="".join(parts)), finish_reason=final.finish_reason)],
            usage=_usage(final),
        )

    return app


def _usage(chunk: CompletionChunk) -> Usage:
    return Usage(
        prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
        total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
    )


def _json(value: Any) -> str:
    # Compact, and UTF-8 as is: Chinese text stays readable on the wire (and is valid JSON either way).
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def _sse_events(
    stream: AsyncJobStream[CompletionChunk],
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    timeout: float | None,
) -> AsyncIterator[str]:
    """The chunk sequence clients parse: role, content deltas, finish_reason, [usage], [DONE].

    sse-starlette cancels this generator when the client disconnects; leaving it closes the stream, which
    withdraws the job, and the engine stops at its next decode step.
    """
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return _json(body)

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in stream:
            if piece.text:
                yield chunk({"content": piece.text})
            if piece.finish_reason in ("stop", "length"):
                yield chunk({}, piece.finish_reason)
                if include_usage:
                    yield _json({**base, "choices": [], "usage": _usage(piece).model_dump()})
        yield "[DONE]"
    except RequestTimeout:
        # The status line (200) is long sent: report the error as an event, which the SDKs raise as APIError.
        yield _json(timeout_error(timeout).body())
        yield "[DONE]"
    except JobCancelled as exc:
        yield _json(OpenAIError(503, str(exc), type="server_error", code="cancelled").body())
        yield "[DONE]"
    except Exception:
        logger.exception("generation failed mid-stream")
        yield _json(OpenAIError(500, "internal server error", type="server_error").body())
        yield "[DONE]"
    finally:
        stream.close()


# -- command line -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="OpenAI-compatible chat completions API for ChatGLM-6B / ChatGLM2-6B.",
        epilog=f"API keys: --api-key and/or ${API_KEYS_ENV} (comma-separated); without any, no key is required. "
        "--max-length caps prompt + answer tokens; --temperature/--top-p are used when a request has none.",
    )
    add_server_arguments(parser)
    group = parser.add_argument_group("OpenAI API")
    group.add_argument("--api-key", action="append", metavar="KEY",
                       help=f"accepted Bearer key; repeat or comma-separate for several (also ${API_KEYS_ENV})")
    group.add_argument("--cors-origins", action="append", metavar="ORIGIN",
                       help="browser origins allowed to call the API, comma-separated or repeated; '*' for any "
                       "(default: none, no CORS headers)")
    group.add_argument("--served-model-name", default=None,
                       help="the model id in /v1/models and responses (default: the last part of --model)")
    group.add_argument("--model-alias", nargs="*", default=None, metavar="NAME",
                       help="other names accepted as 'model' (default: the version's name, e.g. chatglm2-6b, "
                       "and gpt-3.5-turbo); give the option with no names to accept only the served name")
    return parser


def settings_from_args(args: argparse.Namespace) -> OpenAISettings:
    return OpenAISettings(
        served_model_name=args.served_model_name,
        model_aliases=split_list(args.model_alias) if args.model_alias is not None else None,
        api_keys=api_keys_from(args.api_key, API_KEYS_ENV),
        cors_origins=split_list(args.cors_origins),
        max_queue=args.max_queue,
        timeout=args.timeout or None,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        temperature=args.temperature,
        top_p=args.top_p,
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    engine = engine_from_args(args)
    if settings.api_keys.enabled:
        print(f"API keys required: {len(settings.api_keys)} configured", flush=True)
    app = create_app(engine, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
