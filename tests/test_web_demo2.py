"""web_demo2.py (Streamlit) started with `streamlit run` and used from headless Chromium."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from demo_helpers import ARTIFACTS, FAST_MODEL_FLAGS, REPO, DemoServer, browser, free_port, save_screenshot, wait_until

from web_demo2 import display_markdown  # after demo_helpers, which puts the repo root on sys.path

__all__ = ["browser"]  # the fixture, imported to be found by pytest

# The limit counts the history too, and the demo model talks until it reaches it: with 160 tokens a
# second question in the same conversation gets no room, which is how the tests see that Clear emptied it.
MAX_LENGTH = 160


def streamlit_command(port: int, *script_args: str) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(REPO / "web_demo2.py"),
        "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--", *script_args,
    ]


@pytest.fixture(scope="module")
def server() -> Iterator[DemoServer]:
    port = free_port()
    demo = DemoServer(
        streamlit_command(port, *FAST_MODEL_FLAGS, "--max-length", str(MAX_LENGTH)), port,
        ARTIFACTS / "logs" / "web_demo2.log",
    )
    demo.start(timeout=120)
    try:
        yield demo
    finally:
        demo.stop()


class ChatPage:
    """One browser tab (its own Streamlit session) with the actions a person takes."""

    def __init__(self, browser: Any, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.goto(url)
        # The first visit also waits for the model to load.
        self.page.wait_for_selector('[data-testid="stChatInputTextArea"]', timeout=120_000)
        wait_until(self.idle, 120, "the page never finished its first run")

    def close(self) -> None:
        self.context.close()

    def texts(self, role: str) -> list[str]:
        messages = self.page.locator('[data-testid="stChatMessage"]')
        avatar = f'[data-testid="stChatMessageAvatar{role.capitalize()}"]'
        contents = messages.filter(has=self.page.locator(avatar)).locator('[data-testid="stChatMessageContent"]')
        return [text.strip() for text in contents.all_inner_texts()]

    def idle(self) -> bool:
        # While the script runs, the chat input's send button is a stop button (submit_mode="stop").
        return self.page.locator('[data-testid="stChatInputStopButton"]').count() == 0 and self.page.locator(
            '[data-testid="stStatusWidget"]'
        ).count() == 0

    def submit(self, question: str) -> None:
        box = self.page.locator('[data-testid="stChatInputTextArea"]')
        wait_until(box.is_enabled, 30, "the chat input stayed disabled")
        box.fill(question)
        box.press("Enter")
        first_line = question.splitlines()[0]
        wait_until(lambda: any(t.startswith(first_line) for t in self.texts("user")), 30,
                   f"question {question!r} did not appear")

    def answer(self, turn: int, timeout: float = 90) -> str:
        """Wait for the `turn`-th answer to have text and the run to end; that answer."""
        wait_until(lambda: len(self.texts("assistant")) >= turn and self.texts("assistant")[turn - 1].strip("…▌ "),
                   timeout, f"answer {turn} did not appear")
        wait_until(self.idle, timeout, f"answer {turn} did not finish")
        return self.texts("assistant")[turn - 1]

    def stop(self) -> None:
        """The chat input's stop button, or the toolbar's Stop when a run began before the input was used."""
        in_input = self.page.locator('[data-testid="stChatInputStopButton"]')
        if in_input.count():
            in_input.click()
        else:
            self.page.locator('[data-testid="stStatusWidget"]').get_by_role("button", name="Stop").click()

    def slider(self, label: str) -> Any:
        return self.page.locator(f'[data-testid="stSlider"] input[type=range][aria-label="{label}"]')


@pytest.mark.browser
def test_ask_streams_an_answer_and_clear_empties(browser: Any, server: DemoServer) -> None:
    tab = ChatPage(browser, server.url)
    try:
        page = tab.page
        assert page.title() == "ChatGLM2-6B 演示"
        assert tab.slider("max_length").input_value() == str(MAX_LENGTH)
        assert float(tab.slider("top_p").input_value()) == 0.8  # ChatGLM2's defaults
        assert float(tab.slider("temperature").input_value()) == 0.8

        tab.submit("这段代码有什么问题？\n```python\ndef add(a, b):\n    return a - b\n```")
        assert tab.answer(1)
        # Messages are rendered as Markdown: the fenced block became a code block.
        code = page.locator('[data-testid="stChatMessage"] pre code')
        assert code.count() == 1 and "return a - b" in code.inner_text()
        assert "```" not in tab.texts("user")[0]
        shot = save_screenshot(page, "web_demo2.png")
        assert shot.stat().st_size > 10_000

        page.get_by_role("button", name="Clear history").click()
        wait_until(lambda: not tab.texts("user") and not tab.texts("assistant"), 30, "Clear left messages")
        wait_until(tab.idle, 30, "the page did not settle after Clear")
        # With the history gone the same small limit leaves room for an answer again.
        tab.submit("你好")
        assert tab.answer(1)
        assert tab.texts("user") == ["你好"]
    finally:
        tab.close()


@pytest.mark.browser
def test_sessions_keep_separate_conversations(browser: Any, server: DemoServer) -> None:
    first, second = ChatPage(browser, server.url), ChatPage(browser, server.url)
    try:
        first.submit("第一个窗口的问题")
        first.answer(1)
        assert second.texts("user") == []
        second.submit("第二个窗口的问题")
        assert second.answer(1), "the second session has its own (empty) history, so there is room to answer"
        assert second.texts("user") == ["第二个窗口的问题"]
        first.page.reload()
        first.page.wait_for_selector('[data-testid="stChatInputTextArea"]')
        wait_until(first.idle, 30, "the reloaded page did not settle")
    finally:
        first.close()
        second.close()


@pytest.mark.browser
def test_stop_ends_the_answer_and_keeps_it(browser: Any, server: DemoServer) -> None:
    tab = ChatPage(browser, server.url)
    try:
        tab.slider("max_length").focus()
        tab.page.keyboard.press("End")  # the slider's maximum: the demo model then talks for a long time
        tab.slider("temperature").focus()
        tab.page.keyboard.press("Home")  # greedy: a sampled answer could end early by chance
        wait_until(lambda: tab.slider("max_length").input_value() != str(MAX_LENGTH), 10,
                   "the slider did not move")
        time.sleep(1.0)  # let the rerun the slider asked for start, then end
        wait_until(tab.idle, 30, "the page did not settle after moving the slider")

        tab.submit("写一篇很长的文章，介绍中国的历史")
        first = wait_until(lambda: (tab.texts("assistant") or [""])[0].strip("…▌ "), 60, "no answer appeared")
        time.sleep(0.8)
        assert len(tab.texts("assistant")[0].strip("…▌ ")) > len(first), "the answer did not grow while streaming"

        tab.stop()
        wait_until(tab.idle, 15, "Stop did not end the answer")
        stopped = tab.texts("assistant")[0].strip("…▌ ")
        time.sleep(1.0)
        assert tab.texts("assistant")[0].strip("…▌ ") == stopped, "the answer kept growing after Stop"

        # The model is free at once, and the stopped answer is still in the conversation.
        tab.submit("你好")
        wait_until(lambda: len(tab.texts("assistant")) == 2 and tab.texts("assistant")[1].strip("…▌ "), 30,
                   "the next answer did not start")
        tab.stop()
        wait_until(tab.idle, 15, "Stop did not end the second answer")
        assert tab.texts("user") == ["写一篇很长的文章，介绍中国的历史", "你好"]
        assert tab.texts("assistant")[0][:20] == stopped[:20]
    finally:
        tab.close()


def test_line_breaks_show_outside_code_blocks() -> None:
    text = "床前明月光\n疑是地上霜\n```python\nx = 1\ny = 2\n```\n完"
    assert display_markdown(text) == "床前明月光  \n疑是地上霜\n```python\nx = 1\ny = 2\n```\n完"
    assert display_markdown("一\n\n二") == "一\n\n二"
