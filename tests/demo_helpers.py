"""Running the demo scripts as a person does: real processes, real servers, a real headless Chromium.

Screenshots go to $CHATGLM_TEST_ARTIFACTS/screenshots (default: test-artifacts/screenshots in the repo);
with CHATGLM_UPDATE_DOCS_IMAGES=1 they are also copied to docs/images/, where the README shows them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# The demo scripts and utils.py live in the repo root, which plain `pytest` (unlike `python -m pytest`)
# does not put on sys.path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("CHATGLM_TEST_ARTIFACTS") or REPO / "test-artifacts")
DOCS_IMAGES = REPO / "docs" / "images"

# The embedded model in fp32 answers about ten times faster on a CPU than in its stored bf16.
FAST_MODEL_FLAGS = ["--dtype", "float32"]


def demo_env() -> dict[str, str]:
    """The environment a demo runs in under test: the embedded model, one thread, nothing from the network."""
    env = dict(os.environ)
    env.pop("CHATGLM_MODEL", None)
    env.update(
        OMP_NUM_THREADS="1",  # other test processes share the two cores; more threads only contend
        PYTHONUNBUFFERED="1",
        PYTHONIOENCODING="utf-8",
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        TERM="xterm",
        # Answers run to their length limit, so Stop / Ctrl-C have a growing answer to interrupt (the trained
        # demo model would end after a few words).
        CHATGLM_IGNORE_EOS="1",
    )
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DemoServer:
    """A demo started as a subprocess (own process group) and stopped again; its output goes to a log file."""

    def __init__(self, args: list[str], port: int, log_path: Path) -> None:
        self.args = args
        self.port = port
        self.url = f"http://127.0.0.1:{port}/"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 120.0) -> DemoServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.args, cwd=REPO, env=demo_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.args} did not answer on {self.url} within {timeout:.0f}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # The whole group: `streamlit run` and Gradio may have started helpers of their own.
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def python_script(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / script), *args]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (never a browser Playwright downloads itself)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) to run browser tests")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def save_screenshot(page: Any, name: str) -> Path:
    """Save a screenshot of `page` under the test artifacts (and in docs/images when asked to)."""
    path = ARTIFACTS / "screenshots" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("CHATGLM_UPDATE_DOCS_IMAGES") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGES / name)
    return path


def wait_until(condition: Callable[[], Any], timeout: float, message: str, interval: float = 0.2) -> Any:
    """Poll `condition` until it returns something truthy; fail with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s: {message}")
        time.sleep(interval)


def make_tiny_v1_checkpoint(folder: Path, ice_text_model: Path) -> Path:
    """A random ChatGLM-6B of two small layers with the real ChatGLM-6B tokenizer, saved as a model folder."""
    from conftest import randomize, tiny_v1_config

    from chatglm import ChatGLMTokenizer, GLMForConditionalGeneration

    tokenizer = ChatGLMTokenizer(str(ice_text_model), num_image_tokens=0)
    special = {"mask_token_id": "[MASK]", "gmask_token_id": "[gMASK]", "bos_token_id": "<sop>",
               "eos_token_id": "<eop>", "pad_token_id": "<pad>"}
    config = tiny_v1_config(
        vocab_size=tokenizer.vocab_size, **{key: tokenizer.convert_tokens_to_ids(t) for key, t in special.items()}
    )
    randomize(GLMForConditionalGeneration(config)).eval().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
