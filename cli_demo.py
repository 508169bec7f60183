"""Chat with ChatGLM in the terminal: streamed answers, `clear`, `stop`, Ctrl-C to interrupt an answer.

    python cli_demo.py                              # the small embedded demo model
    python cli_demo.py --model THUDM/chatglm2-6b    # real weights (hub id or local folder)
    python cli_demo.py --model THUDM/chatglm2-6b --quantize 4 --max-length 4096 --temperature 0

Ctrl-C while an answer streams stops that answer and keeps the conversation; at the prompt it drops the
line being typed, and a second Ctrl-C in a row (or Ctrl-D, or `stop`) quits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from chatglm import Conversation
from chatglm.cli import add_generation_arguments, add_model_arguments, generation_kwargs
from utils import add_gpu_arguments, engine_from_demo_args

try:  # line editing and history at the prompt, where the platform has it
    import readline  # noqa: F401
except ImportError:
    pass


QUIT_HINT = "(Ctrl-C again, Ctrl-D or stop to quit)"


def welcome_text(name: str) -> str:
    return f"欢迎使用 {name} 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"


def clear_screen() -> None:
    if not sys.stdout.isatty():
        return
    if os.name == "nt":
        os.system("cls")
    else:
        # The escape sequence rather than the `clear` program, which needs ncurses and a known $TERM.
        print("\033[H\033[2J\033[3J", end="", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Chat with ChatGLM-6B / ChatGLM2-6B in the terminal.")
    add_model_arguments(parser)
    add_gpu_arguments(parser)
    add_generation_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        engine = engine_from_demo_args(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    options = generation_kwargs(args)
    conversation = Conversation()
    welcome = welcome_text(engine.display_name)
    print(welcome)
    interrupted_at_prompt = False
    while True:
        try:
            query = input("\n用户：").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            # A Ctrl-C meant for an answer that has just ended must not end the session too; a second one does.
            if interrupted_at_prompt:
                print()
                return 0
            interrupted_at_prompt = True
            print(f"\n{QUIT_HINT}", end="")
            continue
        interrupted_at_prompt = False
        if query == "stop":
            return 0
        if query == "clear":
            conversation.clear()
            clear_screen()
            print(welcome)
            continue
        if not query:
            continue
        print("\nChatGLM：", end="", flush=True)
        # Ctrl-C ends this answer only: the reply so far stays in the history and the session goes on.
        try:
            with contextlib.closing(engine.stream_reply(conversation, query, **options)) as reply:
                for delta in reply:
                    print(delta, end="", flush=True)
        except KeyboardInterrupt:
            print(" [answer stopped]", end="")
        print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
