"""Chat with ChatGLM in the terminal: streamed answers, `clear`, `stop`, Ctrl-C to interrupt an answer.

    python cli_demo.py                              # the small embedded demo model
    python cli_demo.py --model THUDM/chatglm2-6b    # real weights (hub id or local folder)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from chatglm import Conversation
from chatglm.cli import add_generation_arguments, add_model_arguments, engine_from_args, generation_kwargs

try:  # line editing and history at the prompt, where the platform has it
    import readline  # noqa: F401
except ImportError:
    pass


def welcome_text(name: str) -> str:
    return f"欢迎使用 {name} 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with ChatGLM-6B / ChatGLM2-6B in the terminal.")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    args = parser.parse_args(argv)
    engine = engine_from_args(args)
    options = generation_kwargs(args)
    conversation = Conversation()
    welcome = welcome_text(engine.display_name)
    print(welcome)
    while True:
        try:
            query = input("\n用户：").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query == "stop":
            return 0
        if query == "clear":
            conversation.clear()
            if sys.stdout.isatty():
                os.system("cls" if os.name == "nt" else "clear")
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
