"""web_demo.py (Gradio) started as a real server and used from headless Chromium, tab by tab."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pytest
from conftest import ICE_TEXT_MODEL
from demo_helpers import (
    ARTIFACTS,
    FAST_MODEL_FLAGS,
    DemoServer,
    browser,
    free_port,
    make_tiny_v1_checkpoint,
    python_script,
    save_screenshot,
    wait_until,
)

import web_demo  # found through demo_helpers, which puts the repo root on sys.path
from chatglm import ChatEngine

__all__ = ["browser"]  # the fixture, imported to be found by pytest

# Short answers keep the tests quick. The limit counts the history too and the demo model talks until it
# hits it, so each later turn gets MAX_LENGTH more through the slider, as a person would do.
MAX_LENGTH = 160
CODE_QUESTION = "这段代码有什么问题？\n```python\ndef add(a, b):\n    return a - b\n```"


@pytest.fixture(scope="module")
def server() -> Iterator[DemoServer]:
    port = free_port()
    demo = DemoServer(
        python_script("web_demo.py", *FAST_MODEL_FLAGS, "--max-length", str(MAX_LENGTH), "--port", str(port)),
        port, ARTIFACTS / "logs" / "web_demo.log",
    )
    demo.start(timeout=180)
    try:
        yield demo
    finally:
        demo.stop()


class ChatPage:
    """One browser tab on the Gradio demo, with the actions a person takes."""

    def __init__(self, browser: Any, url: str) -> None:
        # A context of its own per tab: its own cookies and session, as a second window would have.
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.goto(url)
        self.page.wait_for_selector("#query textarea", timeout=60_000)

    def close(self) -> None:
        self.context.close()

    def texts(self, role: str) -> list[str]:
        return [t.strip() for t in self.page.locator(f'#chatbot [data-testid="{role}"]').all_inner_texts()]

    def idle(self) -> bool:
        tracker = self.page.locator('#chatbot [data-testid="status-tracker"]').first
        return "hide" in (tracker.get_attribute("class") or "")

    def submit(self, question: str, *, keyboard: bool = False) -> None:
        self.page.fill("#query textarea", question)
        if keyboard:
            self.page.keyboard.press("Shift+Enter")  # Enter alone adds a line in a multi-line box
        else:
            self.page.click("#submit")
        first_line = question.splitlines()[0]
        wait_until(lambda: any(t.startswith(first_line) for t in self.texts("user")), 30,
                   f"question {question!r} did not appear")

    def wait_for_answer(self, turns: int, timeout: float = 90) -> str:
        """Wait until the `turns`-th answer has text and the event is over; that answer."""
        wait_until(lambda: len(self.texts("bot")) >= turns and self.texts("bot")[turns - 1], timeout,
                   f"answer {turns} did not appear")
        wait_until(self.idle, timeout, f"answer {turns} did not finish")
        return self.texts("bot")[turns - 1]

    def ask(self, question: str, turns: int, **kwargs: Any) -> str:
        if turns > 1:
            self.set_slider("max-length", MAX_LENGTH * turns)
        self.submit(question, **kwargs)
        return self.wait_for_answer(turns)

    def set_slider(self, elem_id: str, value: float) -> None:
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
        box.blur()


@pytest.mark.browser
def test_ask_streams_an_answer_and_clear_empties(browser: Any, server: DemoServer) -> None:
    tab = ChatPage(browser, server.url)
    try:
        page = tab.page
        assert page.title() == "ChatGLM2-6B"
        assert page.locator("#max-length input[type=number]").input_value() == str(MAX_LENGTH)
        assert float(page.locator("#top-p input[type=number]").input_value()) == 0.8  # ChatGLM2's default
        assert float(page.locator("#temperature input[type=number]").input_value()) == 0.8

        answer = tab.ask("你好，请用 Python 写一个快速排序", turns=1)
        assert answer
        assert page.locator("#query textarea").input_value() == "", "the question box was not emptied"
        tab.ask(CODE_QUESTION, turns=2, keyboard=True)
        # Messages are rendered as Markdown: the fenced block became a code block.
        code = page.locator('#chatbot [data-testid="user"] pre code')
        assert code.count() == 1 and "return a - b" in code.inner_text()
        assert "```" not in tab.texts("user")[1]
        shot = save_screenshot(page, "web_demo.png")
        assert shot.stat().st_size > 10_000

        page.click("#clear")
        wait_until(lambda: not tab.texts("user") and not tab.texts("bot"), 15, "Clear History left messages")
        # The conversation behind the display is new too: the next answer is the first of a new history.
        tab.set_slider("max-length", MAX_LENGTH)
        tab.ask("你好", turns=1)
        assert tab.texts("user") == ["你好"]
    finally:
        tab.close()


@pytest.mark.browser
def test_tabs_keep_separate_conversations(browser: Any, server: DemoServer) -> None:
    first, second = ChatPage(browser, server.url), ChatPage(browser, server.url)
    try:
        first.ask("第一个窗口的问题", turns=1)
        second.ask("第二个窗口的问题", turns=1)
        first.ask("第一个窗口的第二个问题", turns=2)
        assert first.texts("user") == ["第一个窗口的问题", "第一个窗口的第二个问题"]
        assert second.texts("user") == ["第二个窗口的问题"]
        # A reload starts a new session with an empty conversation; the other tab keeps its own.
        second.page.reload()
        second.page.wait_for_selector("#query textarea")
        assert second.texts("user") == []
        second.ask("重新开始", turns=1)
        assert second.texts("user") == ["重新开始"]
        assert first.texts("user") == ["第一个窗口的问题", "第一个窗口的第二个问题"]
    finally:
        first.close()
        second.close()


@pytest.mark.browser
def test_stop_ends_the_answer_and_keeps_it(browser: Any, server: DemoServer) -> None:
    tab = ChatPage(browser, server.url)
    try:
        tab.set_slider("max-length", 2048)
        tab.set_slider("temperature", 0)  # greedy: a sampled answer could end early by chance
        tab.submit("写一篇很长的文章，介绍中国的历史")
        lengths = [len(wait_until(lambda: (tab.texts("bot") or [""])[0], 60, "no answer appeared"))]
        time.sleep(0.6)
        lengths.append(len(tab.texts("bot")[0]))
        assert lengths[1] > lengths[0], "the answer did not grow while streaming"
        assert not tab.idle()

        tab.page.click("#stop")
        wait_until(tab.idle, 15, "Stop did not end the answer")
        stopped = tab.texts("bot")[0]
        time.sleep(1.0)
        assert tab.texts("bot")[0] == stopped, "the answer kept growing after Stop"

        # The model is free at once (the next answer starts streaming), and the stopped answer stays.
        tab.submit("你好", keyboard=True)
        wait_until(lambda: len(tab.texts("bot")) == 2 and tab.texts("bot")[1], 30, "the next answer did not start")
        tab.page.click("#stop")
        wait_until(tab.idle, 15, "Stop did not end the second answer")
        assert tab.texts("user") == ["写一篇很长的文章，介绍中国的历史", "你好"]
        assert tab.texts("bot")[0][:20] == stopped[:20]
    finally:
        tab.close()


# -- the chat handler itself, in-process: what each tab's state holds ---------------------------------------------


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    return ChatEngine.from_pretrained(device="cpu", dtype="float32")


def test_each_conversation_keeps_its_own_history_and_kv_cache(engine: ChatEngine) -> None:
    mine, other = web_demo.new_conversation(), web_demo.new_conversation()
    steps = list(web_demo.respond(engine, "你好", mine, 64, 0.8, 0))
    # The question shows at once with an empty answer; the textbox is emptied.
    assert steps[0] == ("", [{"role": "user", "content": "你好"}, {"role": "assistant", "content": ""}])
    assert steps[-1] == ("", web_demo.to_messages(mine.history))
    assert [query for query, _ in mine.history] == ["你好"]
    assert mine.past_key_values is not None, "ChatGLM2 keeps the KV cache for the next turn"
    assert other.history == [] and other.past_key_values is None
    cached = engine.model.past_length(mine.past_key_values)

    list(web_demo.respond(engine, "再见", mine, 160, 0.8, 0))
    assert [query for query, _ in mine.history] == ["你好", "再见"]
    assert engine.model.past_length(mine.past_key_values) > cached, "the next turn continued the same cache"


def test_closing_the_handler_stops_the_answer_and_frees_the_model(engine: ChatEngine) -> None:
    conversation = web_demo.new_conversation()
    stream = web_demo.respond(engine, "写一篇很长的文章", conversation, 2048, 0.8, 0.8)
    for _ in range(4):
        next(stream)
    assert engine.lock.locked(), "an answer is being generated"
    stream.close()  # what Gradio does to the event's generator when Stop cancels it
    assert not engine.lock.locked()
    assert conversation.history[0][0] == "写一篇很长的文章" and conversation.history[0][1]
    assert conversation.past_key_values is None, "a stopped answer's cache is dropped; the next turn re-encodes"


def test_empty_question_changes_nothing(engine: ChatEngine) -> None:
    conversation = web_demo.new_conversation()
    assert list(web_demo.respond(engine, "   ", conversation, 64, 0.8, 0.8)) == [("", [])]
    assert conversation.history == []


def test_chatglm_6b_gets_its_own_defaults_and_no_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not ICE_TEXT_MODEL.is_file():
        pytest.skip(f"the real chatglm-6b tokenizer is not at {ICE_TEXT_MODEL}")
    folder = make_tiny_v1_checkpoint(tmp_path_factory.mktemp("tiny-v1"), ICE_TEXT_MODEL)
    engine = ChatEngine.from_pretrained(folder, device="cpu", dtype="float32")
    demo = web_demo.build_demo(engine)
    sliders = {block.elem_id: block.value for block in demo.blocks.values() if isinstance(block, gr.Slider)}
    assert sliders == {"max-length": 2048, "top-p": 0.7, "temperature": 0.95}
    conversation = web_demo.new_conversation()
    list(web_demo.respond(engine, "你好", conversation, 64, 0.7, 0.95))
    list(web_demo.respond(engine, "再见", conversation, 128, 0.7, 0.95))
    assert [query for query, _ in conversation.history] == ["你好", "再见"]
    assert conversation.past_key_values is None, "ChatGLM-6B re-encodes the history instead"
