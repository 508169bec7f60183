"""openai_api.py as a real server on a loopback port, driven by the `openai` SDK, LangChain, httpx and schemathesis.

The demo model's answers are noise, so nothing here depends on answer text: only on equalities such as
"the streamed answer equals the non-streamed one" or "a concurrent greedy answer equals the same request alone".
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from server_helpers import (
    IGNORE_EOS,
    REPO,
    ServerProcess,
    ThreadServer,
    fuzz_for_server_errors,
    load_script,
    running_servers,
    wait_until,
)

from chatglm import ChatEngine

oa = load_script("openai_api.py")
MODEL = "chatglm2-6b"  # an alias the server accepts by default (the version's name)
HI = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    return ChatEngine.from_pretrained()


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    """The real thing: `python openai_api.py --port N` with its default options."""
    with running_servers(ServerProcess("openai_api.py")) as (process,):
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    # No key is configured, so the placeholder the SDK insists on is ignored.
    with OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0, timeout=120) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as session:
        yield session


def greedy(client: OpenAI, messages: list[dict], max_tokens: int = 8, **extra) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **extra)


def streamed_text(client: OpenAI, messages: list[dict], **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# -- models ------------------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-chatglm2", "chatglm2-6b", "gpt-3.5-turbo"]
    assert client.models.retrieve("gpt-3.5-turbo").id == "gpt-3.5-turbo"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.body["code"] == "model_not_found"


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="llama-3", messages=HI, max_tokens=2)
    assert caught.value.body == {
        "message": caught.value.body["message"], "type": "invalid_request_error", "param": "model",
        "code": "model_not_found",
    }


# -- completions with the openai SDK ------------------------------------------------------------------------------


def test_non_streaming_completion(client: OpenAI, engine: ChatEngine) -> None:
    reply = greedy(client, HI, max_tokens=6)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "tiny-chatglm2" and isinstance(reply.created, int)
    (choice,) = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert reply.usage.prompt_tokens == engine.build_messages_input(HI).shape[1]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 6
    else:  # the model ended on its own
        assert choice.finish_reason == "stop" and reply.usage.completion_tokens < 6


def test_streaming_matches_non_streaming(client: OpenAI) -> None:
    expected = greedy(client, HI, max_tokens=8)
    text, chunks = streamed_text(client, HI, max_tokens=8, temperature=0, stream_options={"include_usage": True})
    assert text == expected.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    *content, final, usage = chunks
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in content)
    assert final.choices[0].finish_reason == expected.choices[0].finish_reason
    assert usage.choices == [] and usage.usage == expected.usage


def test_stream_without_include_usage_has_no_usage_chunk(client: OpenAI) -> None:
    _, chunks = streamed_text(client, HI, max_tokens=3, temperature=0)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices for c in chunks)


def test_stop_sequences_cut_the_answer_and_never_leak(client: OpenAI) -> None:
    full = greedy(client, HI, max_tokens=12).choices[0].message.content
    if len(full) < 4:
        pytest.skip(f"the demo model's greedy answer is too short to cut: {full!r}")
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    reply = greedy(client, HI, max_tokens=12, stop=stop)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    text, chunks = streamed_text(client, HI, max_tokens=12, temperature=0, stop=[stop, "never-seen-text"])
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client: OpenAI) -> None:
    def sample() -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=8, temperature=1.0, top_p=1.0, seed=1234
        )
        return reply.choices[0].message.content

    assert sample() == sample()


def test_system_developer_and_text_parts(client: OpenAI) -> None:
    """Every system/developer text is folded into the query by chatglm.prompt's rule: a `developer` message
    gives the same answer as a `system` one, and a list of text parts the same as the joined string."""
    as_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    as_developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    as_parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    answers = {greedy(client, m, max_tokens=5).choices[0].message.content for m in (as_system, as_developer, as_parts)}
    assert len(answers) == 1


def test_multi_turn_history_is_rebuilt_from_messages(client: OpenAI, engine: ChatEngine) -> None:
    messages = [
        {"role": "system", "content": "s1"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "system", "content": "s2"}, {"role": "user", "content": "q2"},
    ]
    reply = greedy(client, messages, max_tokens=3)
    assert reply.usage.prompt_tokens == engine.build_messages_input(messages).shape[1]


def test_unknown_fields_are_accepted_and_ignored(http: httpx.Client) -> None:
    body = {
        "model": MODEL, "messages": HI, "max_tokens": 2, "temperature": 0, "presence_penalty": 0.5,
        "frequency_penalty": 0.1, "logit_bias": {"5": 1}, "logprobs": True, "top_logprobs": 2, "user": "u-1",
        "metadata": {"k": "v"}, "store": False, "response_format": {"type": "text"}, "parallel_tool_calls": True,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
        "n": 1, "service_tier": "auto", "reasoning_effort": "low", "some_vendor_extra": [1, 2],
        "stream_options": {"include_usage": True},  # without stream: accepted, not an error
    }
    response = http.post("/v1/chat/completions", json=body, headers={"OpenAI-Organization": "org-x"})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_bearer_header_is_ignored_without_keys(server: ServerProcess) -> None:
    with OpenAI(base_url=f"{server.url}/v1", api_key="sk-anything-at-all", max_retries=0) as other:
        assert other.models.list().data


def test_trailing_slash_and_non_ascii_json(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions/", json={"model": MODEL, "messages": HI, "max_tokens": 4})
    assert response.status_code == 200
    # UTF-8 as is, not \\u escapes (what the original server did, and what humans reading logs prefer).
    content = response.json()["choices"][0]["message"]["content"]
    assert json.dumps(content, ensure_ascii=False).encode() in response.content


def test_langchain_chat_openai_invoke_and_stream(server: ServerProcess, client: OpenAI) -> None:
    from langchain_openai import ChatOpenAI

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好"}]
    expected = greedy(client, messages, max_tokens=6)
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", model=MODEL, temperature=0, max_tokens=6,
                     max_retries=0)
    lc_messages = [("system", "You are terse."), ("human", "你好")]
    reply = llm.invoke(lc_messages)
    assert reply.content == expected.choices[0].message.content
    assert reply.usage_metadata["total_tokens"] == expected.usage.total_tokens
    assert reply.response_metadata["finish_reason"] == expected.choices[0].finish_reason
    chunks = list(llm.stream(lc_messages, stream_usage=True))
    assert "".join(c.content for c in chunks) == expected.choices[0].message.content
    total = chunks[0]
    for piece in chunks[1:]:
        total = total + piece
    assert total.usage_metadata["input_tokens"] == expected.usage.prompt_tokens
    assert total.usage_metadata["output_tokens"] == expected.usage.completion_tokens


# -- load -------------------------------------------------------------------------------------------------------


def test_sixteen_concurrent_streams_equal_their_solo_answers(server: ServerProcess, client: OpenAI) -> None:
    """16 streaming clients at once, greedy: each answer equals the same request made alone (no cross-talk),
    and /health keeps answering quickly while they run (generation never blocks the event loop)."""
    prompts = [f"问题 {i}: {word}" for i, word in enumerate(
        ["apple", "river", "cloud", "engine", "stone", "violin", "tiger", "garden", "mirror", "rocket", "candle", "island", "coffee", "ladder", "forest", "piano"]
    )]
    options = {"max_tokens": 8, "temperature": 0}
    alone = {p: streamed_text(client, [{"role": "user", "content": p}], **options)[0] for p in prompts}
    # The demo model repeats itself a lot, but enough prompts differ for cross-talk to show.
    assert len(set(alone.values())) >= 4, "prompts should give different answers"

    async def one_stream(sdk: AsyncOpenAI, prompt: str) -> str:
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True, **options
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def watch_health(http: httpx.AsyncClient, done: asyncio.Event, seen: list) -> None:
        while not done.is_set():
            start = time.monotonic()
            state = (await http.get("/health")).json()["queue"]
            seen.append((time.monotonic() - start, state["running"] + state["waiting"]))
            await asyncio.sleep(0.05)

    async def scenario() -> tuple[list[str], list, float]:
        done, seen = asyncio.Event(), []
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0, timeout=120) as sdk, \
                httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            watcher = asyncio.create_task(watch_health(http, done, seen))
            start = time.monotonic()
            answers = await asyncio.gather(*(one_stream(sdk, p) for p in prompts))
            wall = time.monotonic() - start
            done.set()
            await watcher
        return answers, seen, wall

    answers, seen, wall = asyncio.run(scenario())
    print(f"\n16 concurrent streams x 8 tokens: {wall:.2f} s wall; /health max latency "
          f"{max(s[0] for s in seen) * 1000:.0f} ms over {len(seen)} probes")
    assert answers == [alone[p] for p in prompts]
    busy = [latency for latency, in_flight in seen if in_flight > 0]
    assert busy, "/health should have answered while requests were in flight"
    assert max(busy) < 2.0


# -- disconnects --------------------------------------------------------------------------------------------------


def test_disconnect_mid_stream_stops_generation(server: ServerProcess, http: httpx.Client, client: OpenAI) -> None:
    before = server.health()["queue"]
    body = {"model": MODEL, "messages": HI, "max_tokens": 1500, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 4:  # role chunk + 3 content chunks: generation is under way
                break
    closed = time.monotonic()
    # 1500 tokens would take many seconds; a cancelled job frees the worker at its next decode step.
    assert wait_until(lambda: server.health()["queue"]["running"] == 0, timeout=10)
    stopped_after = time.monotonic() - closed
    after = server.health()["queue"]
    print(f"\nworker free {stopped_after * 1000:.0f} ms after the client closed its stream")
    assert after["cancelled"] == before["cancelled"] + 1
    assert greedy(client, HI, max_tokens=3).choices[0].finish_reason in ("stop", "length")


def test_disconnect_while_waiting_for_a_non_streaming_answer(server: ServerProcess, client: OpenAI) -> None:
    before = server.health()["queue"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", timeout=httpx.Timeout(60, read=0.5),
                   json={"model": MODEL, "messages": HI, "max_tokens": 1500, "temperature": 0})
    assert wait_until(lambda: server.health()["queue"]["running"] == 0, timeout=10)
    assert server.health()["queue"]["cancelled"] == before["cancelled"] + 1
    assert greedy(client, HI, max_tokens=2).usage.completion_tokens >= 1


# -- bad input ----------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (id, raw body or JSON-able body, expected status, expected error param, expected code)
    ("malformed JSON", b'{"model": "chatglm2-6b", "messages": [{"role": "user", "con', 400, None, "invalid_json"),
    ("NaN literal", b'{"model": "chatglm2-6b", "messages": [{"role":"user","content":"x"}], "temperature": NaN}',
     400, "temperature", "invalid_value"),
    ("body is a list", [1, 2], 400, None, "invalid_request_body"),
    ("empty body", b"", 400, None, None),
    ("missing model", {"messages": HI}, 400, "model", "missing_required_parameter"),
    ("missing messages", {"model": MODEL}, 400, "messages", "missing_required_parameter"),
    ("messages not a list", {"model": MODEL, "messages": "hello"}, 400, "messages", "invalid_value"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "messages", "invalid_value"),
    ("content of wrong type", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content", "invalid_value"),
    ("last message not user", {"model": MODEL, "messages": HI + [{"role": "assistant", "content": "x"}]}, 400,
     "messages", "invalid_value"),
    ("only a system message", {"model": MODEL, "messages": [{"role": "system", "content": "x"}]}, 400,
     "messages", "invalid_value"),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", "invalid_value"),
    ("tool role", {"model": MODEL, "messages": HI + [{"role": "tool", "content": "x", "tool_call_id": "c"}]},
     400, "messages.1.role", "invalid_value"),
    ("image part", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages", "invalid_value"),
    ("negative temperature", {"model": MODEL, "messages": HI, "temperature": -0.5}, 400, "temperature",
     "invalid_value"),
    ("temperature above 2", {"model": MODEL, "messages": HI, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("temperature as text", {"model": MODEL, "messages": HI, "temperature": "hot"}, 400, "temperature",
     "invalid_value"),
    ("top_p above 1", {"model": MODEL, "messages": HI, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("max_tokens zero", {"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("max_tokens as text", {"model": MODEL, "messages": HI, "max_tokens": "many"}, 400, "max_tokens",
     "invalid_value"),
    ("n above 1", {"model": MODEL, "messages": HI, "n": 2}, 400, "n", "unsupported_value"),
    ("seed beyond int64", {"model": MODEL, "messages": HI, "seed": 2**70}, 400, "seed", "invalid_value"),
    ("stop of wrong type", {"model": MODEL, "messages": HI, "stop": 5}, 400, "stop", "invalid_value"),
    ("too many stops", {"model": MODEL, "messages": HI, "stop": [str(i) for i in range(17)]}, 400, "stop",
     "invalid_value"),
    ("lone surrogate", b'{"model": "chatglm2-6b", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages.0.content", "invalid_value"),
    ("stop too long", {"model": MODEL, "messages": HI, "stop": ["x" * 513]}, 400, "stop.0", "invalid_value"),
    ("stream not a bool", {"model": MODEL, "messages": HI, "stream": "maybe"}, 400, "stream", "invalid_value"),
    ("unknown model", {"model": "no-such-model", "messages": HI}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("body, status, param, code", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(http: httpx.Client, body, status: int, param, code) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_sdk_raises_bad_request_for_client_mistakes(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HI, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HI, n=3)


def test_megabyte_prompt_is_refused_fast(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "长" * (1 << 20)}]}
    start = time.monotonic()
    response = http.post("/v1/chat/completions", json=body)
    elapsed = time.monotonic() - start
    print(f"\n1 MiB-character prompt refused in {elapsed * 1000:.0f} ms")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert elapsed < 5.0


def test_prompt_just_over_the_context_is_refused_with_its_size(http: httpx.Client, engine: ChatEngine) -> None:
    text = "你好世界 " * 1200
    tokens = engine.build_messages_input([{"role": "user", "content": text}]).shape[1]
    assert tokens > engine.max_context
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": text}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"{tokens} tokens" in error["message"] and str(engine.max_context) in error["message"]


def test_huge_max_tokens_is_clamped_to_the_context(client: OpenAI, engine: ChatEngine) -> None:
    """max_tokens beyond the context is not an error (clients send big defaults): the answer stops when the
    context is full, with finish_reason 'length'."""
    def prompt(n: int) -> list[dict]:
        return [{"role": "user", "content": "天 " * n}]

    lo, hi = 1, engine.max_context
    while lo < hi:  # the longest prompt that leaves exactly 3 tokens of room or more
        mid = (lo + hi + 1) // 2
        if engine.build_messages_input(prompt(mid)).shape[1] <= engine.max_context - 3:
            lo = mid
        else:
            hi = mid - 1
    messages = prompt(lo)
    room = engine.max_context - engine.build_messages_input(messages).shape[1]
    reply = greedy(client, messages, max_tokens=10**9)
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= engine.max_context
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == room


def test_unknown_routes_and_methods(http: httpx.Client) -> None:
    response = http.get("/v1/engines")
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"
    response = http.get("/v1/chat/completions")
    assert response.status_code == 405 and "error" in response.json()


def test_server_still_serves_after_bad_input(client: OpenAI, server: ServerProcess) -> None:
    assert greedy(client, HI, max_tokens=2).choices
    assert server.health()["queue"]["failed"] == 0
    assert "Traceback" not in server.log()


# -- keys, CORS, queue limits and timeouts (an in-process server with those options) -------------------------------

KEYS = ["key-one", "key-two"]
ORIGIN = "http://chat-ui.example"


@pytest.fixture(scope="module")
def guarded(engine: ChatEngine) -> ThreadServer:
    args = oa.build_parser().parse_args(
        ["--api-key", KEYS[0], "--api-key", KEYS[1], "--cors-origins", ORIGIN, "--max-queue", "1", "--timeout", "1.5"]
    )
    # The trained demo model ends its answers quickly; the queue and timeout tests need one that runs long.
    with pytest.MonkeyPatch.context() as patch, ThreadServer(oa.create_app(engine, oa.settings_from_args(args))) as running:
        patch.setenv(IGNORE_EOS, "1")
        yield running


def test_api_keys_on_every_v1_route(guarded: ThreadServer) -> None:
    for path in ("/v1/models", "/v1/models/gpt-3.5-turbo", "/v1/anything"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"}):
            response = httpx.get(guarded.url + path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(guarded.url + "/v1/chat/completions", json={"model": MODEL, "messages": HI})
    assert response.status_code == 401
    assert httpx.get(guarded.url + "/health").status_code == 200  # health stays public
    for key in KEYS:
        with OpenAI(base_url=f"{guarded.url}/v1", api_key=key, max_retries=0) as sdk:
            assert sdk.models.list().data
    with OpenAI(base_url=f"{guarded.url}/v1", api_key="nope", max_retries=0) as sdk, \
            pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)


def test_cors_allow_list(guarded: ThreadServer) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = httpx.options(f"{guarded.url}/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{guarded.url}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # A browser must be able to read the 401 too.
    denied = httpx.get(f"{guarded.url}/v1/models", headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN


def test_full_queue_is_429_and_timeouts_are_504(guarded: ThreadServer) -> None:
    """max_queue 1, timeout 1.5 s: A generates, B waits, C is refused with 429 + Retry-After; A's stream ends
    with a timeout error event, B gets 504 at its deadline; then the server serves normally again."""
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    long_request = {"model": MODEL, "messages": HI, "max_tokens": 1500, "temperature": 0}

    async def scenario() -> tuple[list[str], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded.url, headers=auth, timeout=30) as http:
            async with http.stream("POST", "/v1/chat/completions", json={**long_request, "stream": True}) as a:
                lines = a.aiter_lines()
                seen = []
                async for line in lines:
                    seen.append(line)
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        break  # A is generating
                b = asyncio.create_task(http.post("/v1/chat/completions", json=long_request))
                for _ in range(100):
                    if (await http.get("/health")).json()["queue"]["waiting"] == 1:
                        break
                    await asyncio.sleep(0.02)
                c = await http.post("/v1/chat/completions", json=long_request)
                seen += [line async for line in lines]
            return seen, await b, c

    events, b, c = asyncio.run(scenario())
    assert c.status_code == 429, c.text
    assert c.json()["error"]["code"] == "rate_limit_exceeded" and c.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(c.headers["retry-after"]) <= 60
    payloads = [line[len("data: "):] for line in events if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == "timeout"
    assert b.status_code == 504 and b.json()["error"]["code"] == "timeout"
    assert b.headers["x-should-retry"] == "false"
    assert wait_until(lambda: guarded.health()["queue"]["running"] == 0, timeout=10)
    stats = guarded.health()["queue"]
    assert stats["timed_out"] >= 2 and stats["rejected"] >= 1
    with OpenAI(base_url=f"{guarded.url}/v1", api_key=KEYS[1], max_retries=0) as sdk:
        assert sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices
        # The SDK turns the mid-stream timeout event into an exception ...
        with pytest.raises(openai.APIError):
            for _ in sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=1500, temperature=0,
                                                 stream=True):
                pass
        # ... and a full queue into RateLimitError (no retries here; by default it would retry after Retry-After).
        # (greedy: this prompt's greedy answer never ends on its own, a sampled one might.)
        with sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=1500, temperature=0,
                                         stream=True) as first:
            next(iter(first))
            waiting = threading.Thread(target=httpx.post, args=(f"{guarded.url}/v1/chat/completions",),
                                       kwargs={"json": long_request, "headers": auth, "timeout": 30})
            waiting.start()
            assert wait_until(lambda: guarded.health()["queue"]["waiting"] == 1, timeout=5)
            with pytest.raises(openai.RateLimitError):
                sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
        waiting.join()


# -- fuzzing ------------------------------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error(engine: ChatEngine) -> None:
    """Valid and invalid requests generated from the OpenAPI schema: none may get a 5xx. Generation is
    capped at 3 tokens so that valid requests stay cheap."""
    app = oa.create_app(engine, oa.OpenAISettings(max_new_tokens=3, timeout=60))

    def known_model(case) -> None:
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL

    with ThreadServer(app) as running:
        failures = fuzz_for_server_errors(running.url, max_examples=20, prepare=known_model)
        stats = running.health()["queue"]
    assert not failures, "\n".join(failures)
    assert stats["completed"] > 0, "some fuzzed requests should have been valid"
    assert stats["failed"] == 0


# -- command line -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--port", "http"], ["--port", "70000"], ["--max-queue", "-1"],
                                  ["--timeout", "soon"], ["--top-p", "2"], ["--quantize", "3"], ["--bogus"]])
def test_bad_command_line_gives_usage(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:
        oa.build_parser().parse_args(argv)
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("usage: ")


def test_bad_command_line_in_a_real_process() -> None:
    result = subprocess.run([sys.executable, str(REPO / "openai_api.py"), "--port", "abc"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ") and "--port" in result.stderr
