"""cli_demo.py driven in a pseudo-terminal, the way a person uses it: type, read, Ctrl-C, clear, stop."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from demo_helpers import ARTIFACTS, FAST_MODEL_FLAGS, REPO, demo_env

pexpect = pytest.importorskip("pexpect")

WELCOME = "欢迎使用 ChatGLM2-6B 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"
ANSWER = "ChatGLM："
PROMPT = "用户："
# Terminal control sequences (screen clearing, readline's bracketed-paste switches) around the text.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def spawn(*args: str, transcript: str, timeout: float = 90) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable, [str(REPO / "cli_demo.py"), *args], cwd=str(REPO), env=demo_env(), encoding="utf-8",
        timeout=timeout, dimensions=(50, 200),
    )
    # What the terminal showed, kept with the other test artifacts.
    (ARTIFACTS / "transcripts").mkdir(parents=True, exist_ok=True)
    child.logfile_read = open(ARTIFACTS / "transcripts" / transcript, "w", encoding="utf-8")  # noqa: SIM115
    child.expect_exact(WELCOME)
    child.expect_exact(PROMPT)
    return child


def ask(child: pexpect.spawn, question: str) -> str:
    """Type a question, wait for the whole answer and the next prompt; the answer as printed."""
    child.sendline(question)
    child.expect_exact(ANSWER)
    child.expect_exact(PROMPT)
    return _CONTROL.sub("", child.before).strip()


def finish(child: pexpect.spawn) -> int:
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    child.logfile_read.close()
    return child.exitstatus


def test_answers_clear_and_stop() -> None:
    # Greedy decoding makes an answer a function of the prompt alone, so the same question in an emptied
    # conversation must get the very same answer, whatever the model says.
    child = spawn(*FAST_MODEL_FLAGS, "--temperature", "0", "--max-length", "96", transcript="cli_clear_stop.txt")
    try:
        first = ask(child, "你好")
        assert first, "no answer text was printed"
        ask(child, "请再介绍一下你自己")
        child.sendline("clear")
        child.expect_exact(WELCOME)
        assert "\x1b[2J" in child.before, "the screen was not cleared before the welcome line"
        child.expect_exact(PROMPT)
        again = ask(child, "你好")
        assert again == first, "after clear, the same question got a different greedy answer: history was kept"
        assert finish(child) == 0
    finally:
        child.close(force=True)


def test_ctrl_c_stops_the_answer_and_keeps_the_session() -> None:
    # The stored bf16 weights answer slowly enough on a CPU to watch the text grow and interrupt it;
    # greedy decoding, because a sampled answer could end early by chance.
    child = spawn("--max-length", "2048", "--temperature", "0", transcript="cli_ctrl_c.txt")
    try:
        child.sendline("写一篇很长的文章，介绍中国的历史")
        child.expect_exact(ANSWER)
        child.expect(r"\S")  # the first piece of the answer
        time.sleep(0.7)
        more = child.read_nonblocking(size=10_000, timeout=5)
        assert _CONTROL.sub("", more).strip(), "the answer did not keep growing while being streamed"
        child.sendintr()
        child.expect_exact("[answer stopped]", timeout=30)
        child.expect_exact(PROMPT, timeout=30)
        # Ctrl-C at the prompt only drops the line being typed.
        child.send("half a question")
        # Wait for readline's echo, as a person would see the text: a Ctrl-C sent in the instant before
        # readline has set up the terminal makes the tty flush the line and readline wait for more input.
        child.expect_exact("half a question")
        child.sendintr()
        child.expect_exact("Ctrl-C again")
        child.expect_exact(PROMPT)
        # The session goes on: the model is free again and starts the next answer at once.
        child.sendline("你好")
        child.expect_exact(ANSWER, timeout=30)
        child.expect(r"\S", timeout=30)
        child.sendintr()  # stops this answer, or lands on the prompt if it has already ended
        child.expect_exact(PROMPT, timeout=30)
        assert finish(child) == 0
    finally:
        child.close(force=True)


def test_bad_flag_prints_usage_and_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "cli_demo.py"), "--no-such-flag"], cwd=REPO, env=demo_env(),
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("usage: cli_demo.py")
    assert "--no-such-flag" in result.stderr
