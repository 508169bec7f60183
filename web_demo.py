"""Chat with ChatGLM in the browser (Gradio): streamed markdown answers, Stop, Clear History, one
conversation per browser tab.

    python web_demo.py                                   # embedded demo model on http://127.0.0.1:7860
    python web_demo.py --model THUDM/chatglm2-6b --host 0.0.0.0 --port 8080
    python web_demo.py --model THUDM/chatglm-6b --quantize 4 --share

Each tab holds its own `chatglm.Conversation` in a `gr.State` (history and, for ChatGLM2, the KV cache, so
a follow-up question only encodes the new turn). The engine runs one answer at a time; other tabs wait in
Gradio's queue. Stop cancels the running event: Gradio closes the generator, which closes the engine's
stream, so the partial answer stays in the history and the model is free at once.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import gradio as gr

from chatglm import ChatEngine, Conversation
from chatglm.cli import add_generation_arguments, add_model_arguments
from utils import add_gpu_arguments, engine_from_demo_args, sampling_options

Messages = list[dict[str, str]]

# ChatGLM writes formulas between $$...$$, \[...\] and \(...\); single dollars are left alone because
# they are far more often prices than maths.
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
]



def local_theme() -> gr.themes.Base:
    """The default look with fonts the machine already has: the stock theme fetches its fonts from Google,
    which stalls the page where that is slow or blocked, and fails offline."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "Noto Sans CJK SC", "sans-serif"],
        font_mono=["ui-monospace", "Consolas", "DejaVu Sans Mono", "monospace"],
    )


def to_messages(history: list[tuple[str, str]]) -> Messages:
    """The chatbot's value (role/content messages) for a (query, response) history."""
    messages: Messages = []
    for query, response in history:
        messages.append({"role": "user", "content": query})
        messages.append({"role": "assistant", "content": response})
    return messages


def new_conversation() -> Conversation:
    return Conversation()


def respond(
    engine: ChatEngine,
    query: str,
    conversation: Conversation,
    max_length: float,
    top_p: float,
    temperature: float,
) -> Iterator[tuple[str, Messages]]:
    """Stream the answer to `query` as (textbox value, chatbot messages), updating `conversation`."""
    query = query.strip()
    if not query:
        yield "", to_messages(conversation.history)
        return
    shown = to_messages(conversation.history)
    answer = ""
    # The question shows at once, before the model has produced anything (it may be waiting for another tab).
    yield "", shown + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
    options = sampling_options(max_length, top_p, temperature)
    try:
        # closing(): when Stop cancels this event, Gradio closes this generator; closing the engine's stream
        # then releases the model and keeps the partial answer in the conversation.
        with contextlib.closing(engine.stream_reply(conversation, query, **options)) as reply:
            for delta in reply:
                answer += delta
                yield "", shown + [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    except Exception as exc:  # shown to the user as a toast instead of a silent "Error" badge
        raise gr.Error(f"{type(exc).__name__}: {exc}") from exc
    # The engine's final clean-up (punctuation, whitespace) may rewrite the streamed text.
    yield "", to_messages(conversation.history)


def build_demo(engine: ChatEngine, initial: dict[str, float] | None = None) -> gr.Blocks:
    """The Blocks app for `engine`; `initial` overrides the sliders' starting values (the version's defaults)."""
    values = {**engine.defaults, **{k: v for k, v in (initial or {}).items() if v is not None}}
    longest = max(engine.max_context, int(engine.defaults["max_length"]), int(values["max_length"]))
    name = engine.display_name

    with gr.Blocks(title=name, analytics_enabled=False) as demo:
        gr.HTML(f"<h1 style='text-align: center'>{name}</h1>")
        if engine.is_demo_model:
            gr.Markdown(
                "Running the small embedded demo model: its answers are not meant to make sense. "
                "Start with `--model THUDM/chatglm2-6b` (or a local folder) for real answers.",
                elem_id="demo-model-notice",
            )
        chatbot = gr.Chatbot(
            label=name, height=520, latex_delimiters=LATEX_DELIMITERS, buttons=["copy", "copy_all"],
            feedback_options=None, elem_id="chatbot",
        )
        with gr.Row():
            with gr.Column(scale=4):
                query = gr.Textbox(
                    show_label=False, placeholder="Input... (Shift+Enter sends)", lines=4, max_lines=10, container=False,
                    autofocus=True, elem_id="query",
                )
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary", elem_id="submit")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=1):
                clear = gr.Button("Clear History", elem_id="clear")
                max_length = gr.Slider(1, longest, value=int(values["max_length"]), step=1, label="Maximum length",
                                       info="prompt + answer, in tokens", elem_id="max-length")
                top_p = gr.Slider(0.01, 1, value=values["top_p"], step=0.01, label="Top P", elem_id="top-p")
                temperature = gr.Slider(0, 1, value=values["temperature"], step=0.01, label="Temperature",
                                        info="0 = always the most likely token", elem_id="temperature")
        # A callable initial value: Gradio calls it for every page load, so each tab gets its own conversation.
        # (A function, not the Conversation class: Gradio would serialise a dataclass type as if it were a value.)
        conversation = gr.State(new_conversation)

        def chat(query_text: str, conv: Conversation, length: float, p: float, temp: float) -> Iterator[Any]:
            yield from respond(engine, query_text, conv, length, p, temp)

        chat_event = gr.on(
            triggers=[submit.click, query.submit], fn=chat,
            inputs=[query, conversation, max_length, top_p, temperature], outputs=[query, chatbot],
            show_progress="minimal", api_name="chat",
        )
        stop.click(fn=None, cancels=[chat_event], api_visibility="private")

        def clear_history() -> tuple[Messages, Conversation]:
            # A new object rather than clearing in place: a cancelled answer still closing must not write into it.
            return [], new_conversation()

        clear.click(fn=clear_history, outputs=[chatbot, conversation], cancels=[chat_event], api_visibility="private")
        # The chatbot's own trash icon empties the display; the conversation behind it must go too.
        chatbot.clear(fn=clear_history, outputs=[chatbot, conversation], cancels=[chat_event], api_visibility="private")
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Chat with ChatGLM-6B / ChatGLM2-6B in the browser (Gradio).")
    add_model_arguments(parser)
    add_gpu_arguments(parser)
    add_generation_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    server.add_argument("--port", type=int, default=7860)
    server.add_argument("--share", action="store_true", help="also publish a temporary public *.gradio.live link")
    server.add_argument("--inbrowser", action="store_true", help="open the page in the default browser")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    engine = engine_from_demo_args(args)
    initial = {"max_length": args.max_length, "top_p": args.top_p, "temperature": args.temperature}
    demo = build_demo(engine, initial)
    demo.queue().launch(
        server_name=args.host, server_port=args.port, share=args.share, inbrowser=args.inbrowser, theme=local_theme()
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
