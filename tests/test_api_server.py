"""api.py as a real server on a loopback port: the original `POST /` contract (curl and httpx, as in the README),
the /chat + /get_response stream API, queueing, bad input, and a schemathesis pass.

The demo model's answers are noise; tests compare answers only with other answers (greedy decoding via the
`do_sample: false` extension makes them reproducible).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from server_helpers import REPO, ServerProcess, ThreadServer, fuzz_for_server_errors, load_script, running_servers

from chatglm import ChatEngine

api = load_script("api.py")
TIME_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    # --max-length 48 makes the README request (no max_length: "falsy -> default") quick on the demo model;
    # --max-queue 2 lets the busy answers be provoked with a handful of requests.
    process = ServerProcess("api.py", "--max-length", "48", "--max-new-tokens", "16", "--max-queue", "2")
    with running_servers(process):
        yield process


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as session:
        yield session


def ask(http: httpx.Client, prompt: str, **fields) -> dict:
    response = http.post("/", json={"prompt": prompt, "history": [], **fields})
    assert response.status_code == 200, response.text
    return response.json()


def check_reply(reply: dict, prompt: str, history: list | None = None) -> None:
    assert set(reply) == {"response", "history", "status", "time"}
    assert isinstance(reply["response"], str)
    assert reply["history"] == (history or []) + [[prompt, reply["response"]]]
    assert reply["status"] == 200
    assert TIME_FORMAT.match(reply["time"])


# -- the original contract ----------------------------------------------------------------------------------------


def test_readme_example_with_curl(server: ServerProcess) -> None:
    result = subprocess.run(
        ["curl", "-sS", "-X", "POST", server.url, "-H", "Content-Type: application/json",
         "-d", '{"prompt": "你好", "history": []}'],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    check_reply(reply, "你好")
    # The original's log line: [time] ", prompt:"...", response:"'...'"
    assert f'[{reply["time"]}] ", prompt:"你好", response:"{reply["response"]!r}"' in server.log()


def test_readme_example_with_httpx_and_a_second_turn(http: httpx.Client) -> None:
    first = ask(http, "你好")
    check_reply(first, "你好")
    second = http.post("/", json={"prompt": "再说一遍", "history": first["history"]}).json()
    check_reply(second, "再说一遍", first["history"])


def test_null_history_and_falsy_numbers_mean_defaults(http: httpx.Client) -> None:
    """As in the original, 0 / null / missing max_length, top_p and temperature all mean the default."""
    reply = http.post("/", json={"prompt": "hi", "history": None, "max_length": 0, "top_p": 0, "temperature": 0})
    assert reply.status_code == 200
    check_reply(reply.json(), "hi")


def test_greedy_extension_and_max_length_is_total_length(http: httpx.Client) -> None:
    greedy = {"do_sample": False}
    first = ask(http, "你好", **greedy)["response"]
    assert ask(http, "你好", **greedy)["response"] == first
    prompt_tokens = ChatEngine.from_pretrained().build_messages_input([{"role": "user", "content": "你好"}]).shape[1]
    short = ask(http, "你好", max_length=prompt_tokens + 3, **greedy)["response"]
    longer = ask(http, "你好", max_length=prompt_tokens + 10, **greedy)["response"]
    assert longer.startswith(short)


def test_a_second_client_is_answered_while_the_first_generates(server: ServerProcess) -> None:
    prompts = ["first question", "second question", "third question"]
    with httpx.Client(base_url=server.url, timeout=120) as http:
        alone = [ask(http, p, do_sample=False)["response"] for p in prompts]

    async def scenario() -> tuple[list[str], list[tuple[float, int]]]:
        seen: list[tuple[float, int]] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async def post(prompt: str) -> str:
                reply = await http.post("/", json={"prompt": prompt, "history": [], "do_sample": False})
                assert reply.status_code == 200, reply.text
                return reply.json()["response"]

            tasks = [asyncio.create_task(post(p)) for p in prompts]
            while not all(t.done() for t in tasks):
                start = time.monotonic()
                queue = (await http.get("/health")).json()["queue"]
                seen.append((time.monotonic() - start, queue["running"] + queue["waiting"]))
                await asyncio.sleep(0.02)
            return [t.result() for t in tasks], seen

    answers, seen = asyncio.run(scenario())
    assert answers == alone
    busy = [latency for latency, in_flight in seen if in_flight]
    assert busy, "GET /health should answer while a generation runs"
    assert max(busy) < 2.0


# -- the stream API -----------------------------------------------------------------------------------------------


def poll_until_finished(http: httpx.Client, request_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = http.post("/get_response", json={"request_id": request_id}).json()
        assert reply["code"] == 0 and reply["msg"] == "success"
        if reply["response"]["is_finished"]:
            return reply["response"]
        time.sleep(0.05)
    raise AssertionError(f"{request_id} did not finish in {timeout} s")


def test_stream_api_start_poll_and_codes(http: httpx.Client) -> None:
    request_id = uuid.uuid4().hex
    start = {"request_id": request_id, "query": "你好", "history": [], "do_sample": False}
    accepted_at = time.time() * 1000
    assert http.post("/chat", json=start).json() == {"code": 0, "msg": "start process"}
    assert http.post("/chat", json=start).json() == {"code": 101, "msg": "request_id already exists"}
    state = poll_until_finished(http, request_id)
    assert set(state) == {"timestamp", "response", "is_finished", "is_handled"}
    assert state["is_handled"] and abs(state["timestamp"] - accepted_at) < 60_000
    assert state["response"] == ask(http, "你好", do_sample=False)["response"]
    assert http.post("/get_response", json={"request_id": "nobody"}).json() == {
        "code": 102, "msg": "request_id not exists"
    }


def test_full_queue_answers_busy_and_429(server: ServerProcess) -> None:
    async def scenario() -> tuple[list[dict], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            starts = await asyncio.gather(*(
                http.post("/chat", json={"request_id": uuid.uuid4().hex, "query": f"q{i}"}) for i in range(8)
            ))
            while True:  # let the background answers finish before the next wave
                queue = (await http.get("/health")).json()["queue"]
                if not queue["running"] and not queue["waiting"]:
                    break
                await asyncio.sleep(0.05)
            posts = await asyncio.gather(*(http.post("/", json={"prompt": f"p{i}"}) for i in range(8)))
        return [r.json() for r in starts], posts

    starts, posts = asyncio.run(scenario())
    codes = [s["code"] for s in starts]
    assert set(codes) <= {0, 100} and 0 in codes and 100 in codes, codes
    assert all(s["msg"] == "busy now" for s in starts if s["code"] == 100)
    statuses = [r.status_code for r in posts]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for refused in (r for r in posts if r.status_code == 429):
        assert 1 <= int(refused.headers["retry-after"]) <= 60 and "busy" in refused.json()["detail"]


# -- bad input ----------------------------------------------------------------------------------------------------

BAD_BODIES = [
    ("malformed JSON", b'{"prompt": "hi", "hist', 422),
    ("not an object", b"[1, 2]", 422),
    ("missing prompt", b'{"history": []}', 422),
    ("prompt of wrong type", b'{"prompt": 5}', 422),
    ("history not a list", b'{"prompt": "hi", "history": "old"}', 422),
    ("history turn not a pair", b'{"prompt": "hi", "history": [["only the question"]]}', 422),
    ("top_p above 1", b'{"prompt": "hi", "top_p": 2}', 422),
    ("negative temperature", b'{"prompt": "hi", "temperature": -1}', 422),
    ("NaN temperature", b'{"prompt": "hi", "temperature": NaN}', 422),
    ("negative max_length", b'{"prompt": "hi", "max_length": -5}', 422),
    ("lone surrogate", b'{"prompt": "\\ud800"}', 422),
]


@pytest.mark.parametrize("body, status", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_are_client_errors(http: httpx.Client, body: bytes, status: int) -> None:
    response = http.post("/", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert "detail" in response.json()


def test_oversize_prompts_are_400(http: httpx.Client) -> None:
    start = time.monotonic()
    response = http.post("/", json={"prompt": "长" * (1 << 20), "history": []})
    elapsed = time.monotonic() - start
    assert response.status_code == 400 and "context" in response.json()["detail"]
    assert elapsed < 5.0
    history = [["问题 " * 300, "回答 " * 300]] * 3  # fits the character pre-check, not the 2048-token context
    response = http.post("/", json={"prompt": "hi", "history": history})
    assert response.status_code == 400 and "tokens" in response.json()["detail"]
    response = http.post("/chat", json={"request_id": uuid.uuid4().hex, "query": "长" * (1 << 20)})
    assert response.status_code == 400


def test_unknown_route_and_still_serving(server: ServerProcess, http: httpx.Client) -> None:
    assert http.get("/nothing-here").status_code == 404
    check_reply(ask(http, "after the bad input"), "after the bad input")
    assert server.health()["queue"]["failed"] == 0
    assert "Traceback" not in server.log()


# -- fuzzing and the command line ----------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error() -> None:
    app = api.create_app(ChatEngine.from_pretrained(), api.ApiSettings(max_new_tokens=2, log_requests=False))
    with ThreadServer(app) as running:
        failures = fuzz_for_server_errors(running.url, max_examples=20)
        stats = running.health()["queue"]
    assert not failures, "\n".join(failures)
    assert stats["completed"] > 0 and stats["failed"] == 0


@pytest.mark.parametrize("argv", [["--port", "http"], ["--port", "0"], ["--max-queue", "x"], ["--timeout", "-1"],
                                  ["--temperature", "-1"], ["--dtype", "int3"], ["--bogus"]])
def test_bad_command_line_gives_usage(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:
        api.build_parser().parse_args(argv)
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("usage: ")


def test_bad_command_line_in_a_real_process() -> None:
    result = subprocess.run([sys.executable, str(REPO / "api.py"), "--max-new-tokens", "none"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ") and "--max-new-tokens" in result.stderr
