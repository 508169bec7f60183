"""Chat with ChatGLM in the browser (Streamlit): streamed markdown answers, sidebar sliders, clear, stop.

    streamlit run web_demo2.py                                   # embedded demo model
    streamlit run web_demo2.py -- --model THUDM/chatglm2-6b      # model flags go after `--`
    streamlit run web_demo2.py --server.port 8502 -- --model THUDM/chatglm-6b --quantize 4

The model is loaded once per server process (`st.cache_resource`) and shared by every visitor; each browser
tab keeps its own `chatglm.Conversation` (history and, for ChatGLM2, the KV cache) in `st.session_state`.
While an answer streams, the send button becomes a stop button: stopping the script run raises inside the
streaming loop, which closes the engine's stream, so the partial answer stays in the history.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from typing import Any

import streamlit as st

from chatglm import ChatEngine, Conversation
from chatglm.cli import add_generation_arguments, add_model_arguments
from utils import add_gpu_arguments, engine_from_demo_args, sampling_options

_FENCE = re.compile(r"^\s*(```|~~~)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamlit run web_demo2.py --",
        description="Chat with ChatGLM-6B / ChatGLM2-6B in the browser (Streamlit).",
    )
    add_model_arguments(parser)
    add_gpu_arguments(parser)
    add_generation_arguments(parser)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The script's own flags (those after `--`); bad flags stop the page with argparse's message."""
    parser = build_parser()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            return parser.parse_args(argv)
    except SystemExit as exc:
        # Also on the terminal, where the person who typed the command is looking.
        print(captured.getvalue(), file=sys.stderr, end="")
        (st.error if exc.code else st.info)(f"```\n{captured.getvalue()}\n```")
        st.stop()
        raise  # st.stop() raises; this keeps type checkers sure the function never falls through


@st.cache_resource(show_spinner="Loading the model…")
def load_engine(flags: tuple[tuple[str, Any], ...]) -> ChatEngine:
    """One engine per server process and set of flags (`sorted(vars(args).items())`), shared by every session."""
    return engine_from_demo_args(argparse.Namespace(**dict(flags)))


def display_markdown(text: str) -> str:
    """Markdown in which each line break the model wrote is shown as one.

    Markdown joins consecutive lines into one paragraph; chat answers (poems, steps, addresses) mean their
    single newlines. Lines inside code blocks are left alone.
    """
    lines = text.split("\n")
    in_code = False
    for i, line in enumerate(lines[:-1]):
        if _FENCE.match(line):
            in_code = not in_code
            continue
        following = lines[i + 1]
        if not in_code and line.strip() and following.strip() and not _FENCE.match(following):
            lines[i] = line + "  "
    return "\n".join(lines)


def main() -> None:
    args = parse_args(sys.argv[1:])
    engine = load_engine(tuple(sorted(vars(args).items())))
    st.set_page_config(page_title=f"{engine.display_name} 演示", page_icon=":robot:", layout="wide")

    if "conversation" not in st.session_state:
        st.session_state.conversation = Conversation()

    values = {**engine.defaults}
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    longest = max(engine.max_context, int(engine.defaults["max_length"]), int(values["max_length"]))
    with st.sidebar:
        st.header(engine.display_name)
        max_length = st.slider("max_length", 1, longest, int(values["max_length"]), step=1,
                               help="prompt + answer, in tokens")
        top_p = st.slider("top_p", 0.01, 1.0, float(values["top_p"]), step=0.01)
        temperature = st.slider("temperature", 0.0, 1.0, float(values["temperature"]), step=0.01,
                                help="0 = always the most likely token")
        if st.button("清空对话历史 · Clear history", key="clear", width="stretch"):
            # A fresh object: nothing else can still hold it, unlike the one a stopped run was writing to.
            st.session_state.conversation = Conversation()
        if engine.is_demo_model:
            st.caption(
                "Running the small embedded demo model: its answers are not meant to make sense. "
                "Start with `streamlit run web_demo2.py -- --model THUDM/chatglm2-6b` for real answers."
            )

    st.title(f"{engine.display_name} 演示")
    conversation: Conversation = st.session_state.conversation
    for query, response in conversation.history:
        with st.chat_message("user"):
            st.markdown(display_markdown(query))
        with st.chat_message("assistant"):
            st.markdown(display_markdown(response))

    query = st.chat_input("请在这儿输入您的命令", key="query", submit_mode="stop")
    if not query or not query.strip():
        return
    query = query.strip()
    with st.chat_message("user"):
        st.markdown(display_markdown(query))
    with st.chat_message("assistant"):
        placeholder = st.empty()
        placeholder.markdown("…")
        answer = ""
        options = sampling_options(max_length, top_p, temperature)
        # Stop, a new question or Clear interrupt this run inside a placeholder update; closing() then
        # ends the engine's stream so the model is free and the partial answer is kept.
        with contextlib.closing(engine.stream_reply(conversation, query, **options)) as reply:
            for delta in reply:
                answer += delta
                placeholder.markdown(display_markdown(answer) + " ▌")
        # The engine's final clean-up (punctuation, whitespace) may rewrite the streamed text.
        placeholder.markdown(display_markdown(conversation.history[-1][1] if conversation.history else answer))


if __name__ == "__main__":
    main()
