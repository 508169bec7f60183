"""Helpers shared by the fine-tuning, demo-model and C-Eval tests (conftest.py belongs to the core tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from conftest import EMBEDDED_MODEL, randomize, tiny_v1_config, tiny_v2_config

from chatglm import ChatGLMTokenizer, GLM2ForConditionalGeneration, GLMForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
DIALOGUES = REPO / "chatglm" / "assets" / "demo_dialogues.jsonl"
CEVAL_SAMPLE = REPO / "evaluation" / "CEval"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def embedded_tokenizer() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(str(EMBEDDED_MODEL))


def embedded_model(dtype: torch.dtype = torch.float32) -> GLM2ForConditionalGeneration:
    return GLM2ForConditionalGeneration.from_pretrained(str(EMBEDDED_MODEL), dtype=dtype).eval()


def tiny_model(version: int, seed: int = 0, **config: Any) -> torch.nn.Module:
    """A tiny random model of either generation (conftest's shapes), fp32, eval mode."""
    if version == 2:
        return randomize(GLM2ForConditionalGeneration(tiny_v2_config(**config)), seed=seed).eval()
    return randomize(GLMForConditionalGeneration(tiny_v1_config(**config)), seed=seed).eval()


def v1_ids(config: Any, prompt: list[int], answer: list[int] = ()) -> list[int]:
    """A ChatGLM-6B sequence: prompt, [gMASK], <sop>, answer."""
    return list(prompt) + [config.gmask_token_id, config.bos_token_id] + list(answer)


def sample_ids(version: int, config: Any, length: int = 6) -> torch.Tensor:
    """One plausible input row for a tiny model of `version` (v1 needs its [gMASK] <sop> markers)."""
    if version == 2:
        return torch.tensor([[10 + i for i in range(length)]])
    return torch.tensor([v1_ids(config, [10 + i for i in range(length - 3)], [40])])


def copy_base_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every tensor except the prefix encoder (strict on the rest), so two models share their base."""
    state = {k: v for k, v in source.state_dict().items() if ".prefix_encoder." not in k}
    missing, unexpected = target.load_state_dict(state, strict=False)
    # inv_freq is recomputed, never loaded (see the rotary modules), so it always reads as missing.
    assert not unexpected and all(".prefix_encoder." in k or k.endswith("inv_freq") for k in missing), (missing, unexpected)


PTUNING_ROWS = [
    {"prompt": "你好", "response": "你好，我是测试模型。", "history": []},
    {"prompt": "hello", "response": "Hello, I am a test model.", "history": []},
    {"prompt": "谢谢", "response": "不客气。", "history": [["你好", "你好，我是测试模型。"]]},
    {"prompt": "再见", "response": "再见！", "history": None},
]


def write_untrained_demo_model(folder: Path) -> Path:
    """The embedded model's architecture and tokenizer with the seeded random weights it starts from.

    The shipped model is fine-tuned to answer in one sentence and stop; tests that need an answer long enough to
    interrupt (Ctrl-C, stop buttons, timeouts, full queues) can point --model / CHATGLM_MODEL here instead, since
    an untrained model rambles on until its length limit. Takes about a second.
    """
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL / name, folder / name)
    vocab = len(ChatGLMTokenizer.from_pretrained(str(folder)))
    module.build_model(vocab).to(torch.bfloat16).save_pretrained(folder)
    return folder
