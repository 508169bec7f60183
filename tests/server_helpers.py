"""Running api.py / openai_api.py as real server processes on free loopback ports, for the server tests."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
IGNORE_EOS = "CHATGLM_IGNORE_EOS"
# Importing torch + transformers and loading the demo model takes a few seconds, more on a busy machine.
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python <script> --port N ...` in the repository, logging to a temporary file."""

    def __init__(self, script: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.script = script
        self.args = list(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - open for the server's whole life, closed in stop()
            "w+", prefix=f"{Path(script).stem}-", suffix=".log", delete=False
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("CHATGLM_MODEL", "CHATGLM_API_KEYS")}
        # Answers run to their length limit: the trained demo model would otherwise end them after a few words,
        # and the queueing, cancellation and disconnect tests need generations that take a while.
        env[IGNORE_EOS] = "1"
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        command = [sys.executable, str(REPO / self.script), "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "warning", *self.args]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.script} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.script} did not answer /health within {timeout} s:\n{self.log()}")

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=5.0).json()

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


def load_script(name: str) -> ModuleType:
    """Import api.py / openai_api.py from the repository root as a module (to build apps in-process)."""
    path = REPO / name
    spec = importlib.util.spec_from_file_location(f"_{path.stem}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class ThreadServer:
    """An app served by uvicorn on a loopback port from a thread of the test process.

    For configurations only a test or two need (a 1-request queue, a 1 s timeout): no second interpreter
    start-up (torch + transformers cost seconds on a busy 2-core machine), yet real HTTP on a real socket.
    """

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    def __enter__(self) -> ThreadServer:  # noqa: PYI034 - Self needs Python 3.11; the project supports 3.10
        self.thread.start()
        if not wait_until(lambda: self.server.started, timeout=30):
            raise RuntimeError("the in-process server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=5.0).json()


@contextmanager
def running_servers(*servers: ServerProcess) -> Iterator[Sequence[ServerProcess]]:
    """Start every server at once (their start-ups overlap), wait until all answer, stop them all at the end."""
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def fuzz_for_server_errors(
    base_url: str,
    max_examples: int,
    headers: dict[str, str] | None = None,
    prepare: Callable[[Any], None] | None = None,
) -> list[str]:
    """Run schemathesis over the server's OpenAPI schema (valid and invalid requests); return every 5xx found.

    `prepare(case)` may adjust a generated case before it is sent (e.g. to use a model name the server knows,
    so that valid requests reach generation instead of all stopping at 404).
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def probe(case: Any) -> None:
                if prepare is not None:
                    prepare(case)
                response = case.call(base_url=base_url, headers=headers, timeout=60)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r:.300} -> {response.status_code} "
                                    f"{response.text[:300]}")

            try:
                probe()
            except Unsatisfiable:  # nothing to vary, e.g. invalid inputs for a route without parameters
                pass
    return failures
