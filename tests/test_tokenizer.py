"""Tokenizers of ChatGLM-6B (real ice_text.model) and ChatGLM2-6B (tiny trained stand-in), spec/tokenizer.md."""

from __future__ import annotations

import copy
import importlib.util
import json
import pickle
import shutil
import unicodedata
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from chatglm.prompt import build_incremental_prompt_v2, build_prompt_v1, build_prompt_v2, process_response_v1
from chatglm.tokenization_chatglm import (
    ChatGLM2Tokenizer,
    ChatGLMTokenizer,
    GLM2Tokenizer,
    GLMTokenizer,
    detect_tokenizer_version,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ICE_TEXT = REPO_ROOT.parent / "shared" / "tokenizers" / "chatglm-6b" / "ice_text.model"
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train_tiny_tokenizer.py"
TINY_ASSET = REPO_ROOT / "chatglm" / "assets" / "tiny-chatglm2"

needs_ice_text = pytest.mark.skipif(
    not ICE_TEXT.is_file(), reason=f"the real chatglm-6b ice_text.model is not available at {ICE_TEXT}"
)

# The real chatglm-6b tokenizer_config.json (spec/tokenizer.md §2), remote-code auto_map included.
V1_TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm-6b",
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "end_token": "</s>",
    "gmask_token": "[gMASK]",
    "mask_token": "[MASK]",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "num_image_tokens": 0,
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
}


def _load_train_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_tiny_tokenizer", TRAIN_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_script() -> ModuleType:
    return _load_train_script()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, train_script: ModuleType) -> Path:
    """A freshly trained tiny ChatGLM2-layout tokenizer folder (tokenizer.model + tokenizer_config.json)."""
    out = tmp_path_factory.mktemp("tiny-chatglm2")
    train_script.train_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def v2(tiny_dir: Path) -> GLM2Tokenizer:
    tok = ChatGLMTokenizer.from_pretrained(tiny_dir)
    assert isinstance(tok, GLM2Tokenizer)
    return tok


@pytest.fixture(scope="module")
def v1() -> GLMTokenizer:
    if not ICE_TEXT.is_file():
        pytest.skip(f"the real chatglm-6b ice_text.model is not available at {ICE_TEXT}")
    tok = ChatGLMTokenizer(str(ICE_TEXT), num_image_tokens=0)
    assert isinstance(tok, GLMTokenizer)
    return tok


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the chatglm-6b checkpoint's tokenizer files."""
    if not ICE_TEXT.is_file():
        pytest.skip(f"the real chatglm-6b ice_text.model is not available at {ICE_TEXT}")
    out = tmp_path_factory.mktemp("chatglm-6b")
    shutil.copy(ICE_TEXT, out / "ice_text.model")
    (out / "tokenizer_config.json").write_text(json.dumps(V1_TOKENIZER_CONFIG), encoding="utf-8")
    return out


# ================================================================================================================
# ChatGLM-6B on the real ice_text.model
# ================================================================================================================

# Every id list quoted in spec/tokenizer.md §2, with special tokens ([gMASK] <sop> appended).
V1_KNOWN_WITH_SPECIALS = [
    ("你好", [5, 74874, 130001, 130004]),
    (
        "def main():\n    print('hello world')\t# greeting",
        [1616, 594, 125936, 4, 130011, 2274, 89, 7283, 398, 125686, 130008, 61, 25672, 130001, 130004],
    ),
    (
        "[Round 0]\n问：你好\n答：你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。\n"
        "[Round 1]\n问：晚上睡不着应该怎么办\n答：",
        [
            53, 6945, 5, 8, 42, 4, 64286, 12, 74874, 4, 67342, 12, 74874, 130328, 130247, 130233, 130227, 35,
            65806, 68241, 75890, 14132, 5388, 340, 11, 21, 222, 6, 76693, 66877, 63852, 6, 66430, 68747, 102501,
            63823, 4, 52, 6945, 5, 9, 42, 4, 64286, 12, 65450, 83400, 64213, 66846, 4, 67342, 12, 130001, 130004,
        ],
    ),
    ("7481", [5, 25, 16, 23, 9, 130001, 130004]),
    ("74815", [5, 25, 16, 23, 9, 15, 130001, 130004]),
]

V1_KNOWN_WITHOUT_SPECIALS = [
    ("Hello world", [19316, 398]),
    ("晚上睡不着怎么办", [74747, 83400, 66846]),
    ("a  b", [104, 130009, 178]),
    ("你好\n", [5, 74874, 4]),
]


@needs_ice_text
@pytest.mark.parametrize(("text", "ids"), V1_KNOWN_WITH_SPECIALS)
def test_v1_known_ids_with_special_tokens(v1: GLMTokenizer, text: str, ids: list[int]) -> None:
    assert v1.encode(text) == ids
    assert v1(text)["input_ids"] == ids


@needs_ice_text
@pytest.mark.parametrize(("text", "ids"), V1_KNOWN_WITHOUT_SPECIALS)
def test_v1_known_ids_without_special_tokens(v1: GLMTokenizer, text: str, ids: list[int]) -> None:
    assert v1.encode(text, add_special_tokens=False) == ids


@needs_ice_text
def test_v1_chat_prompt_matches_the_quoted_ids(v1: GLMTokenizer) -> None:
    text, ids = V1_KNOWN_WITH_SPECIALS[2]
    history = [("你好", "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你，欢迎问我任何问题。")]
    assert v1.build_prompt("晚上睡不着应该怎么办", history) == text
    assert v1.build_chat_input("晚上睡不着应该怎么办", history)["input_ids"].tolist() == [ids]
    assert v1.build_prompt("你好") == build_prompt_v1("你好") == "你好"


@needs_ice_text
@pytest.mark.parametrize(
    "text",
    [
        "你好",
        "Hello world",
        "def main():\n    print('hello world')\t# greeting",
        "7481",
        "a  b",
        "你好\n",
        "line one\nline two\n\nline four",
        "tab\there\t\tand two",
        "x" + " " * 80 + "y",  # the longest blank piece
        "x" + " " * 81 + "y",  # 80 + a single space
        "x" + " " * 170 + "y",  # 80 + 80 + 10
        "indent:\n        eight spaces\n  two",
        "emoji 👋🚀 and 中文",
    ],
)
def test_v1_decode_round_trip(v1: GLMTokenizer, text: str) -> None:
    assert v1.decode(v1.encode(text)) == text


@needs_ice_text
def test_v1_round_trip_is_nfkc_for_full_width_punctuation(v1: GLMTokenizer) -> None:
    # ice_text.model normalises with NFKC, so full-width ：！， come back as ASCII; v1's response post-processing
    # turns them back when they touch a CJK character, which restores the original chat text.
    text = V1_KNOWN_WITH_SPECIALS[2][0]
    decoded = v1.decode(v1.encode(text))
    assert decoded == unicodedata.normalize("NFKC", text)
    assert decoded != text
    assert process_response_v1(decoded) == text.strip()


@needs_ice_text
def test_v1_whitespace_pieces(v1: GLMTokenizer) -> None:
    assert v1.convert_ids_to_tokens(v1.encode("a\tb\nc   d", add_special_tokens=False)) == [
        "▁a", "<|tab|>", "b", "<n>", "c", "<|blank_3|>", "d",
    ]
    assert v1.convert_tokens_to_string(["▁a", "<|blank_80|>", "b", "<n>"]) == "a" + " " * 80 + "b\n"


@needs_ice_text
def test_v1_layout(v1: GLMTokenizer) -> None:
    assert v1.vocab_size == len(v1) == 130344
    ids = {name: v1.convert_tokens_to_ids(name) for name in ("<unk>", "<s>", "</s>", "<pad>", "<n>", "▁", "[MASK]",
                                                             "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|tab|>",
                                                             "<|blank_2|>", "<|blank_80|>", "<0x00>", "<0xFF>")}
    assert ids == {
        "<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<n>": 4, "▁": 5, "[MASK]": 130000, "[gMASK]": 130001,
        "[sMASK]": 130002, "<sop>": 130004, "<eop>": 130005, "<|tab|>": 130008, "<|blank_2|>": 130009,
        "<|blank_80|>": 130087, "<0x00>": 130088, "<0xFF>": 130343,
    }
    assert (v1.bos_token_id, v1.eos_token_id, v1.pad_token_id, v1.unk_token_id) == (130004, 130005, 3, 0)
    assert (v1.mask_token_id, v1.gmask_token_id, v1.end_token_id) == (130000, 130001, 2)
    assert v1.get_command("[gMASK]") == 130001 and v1.get_command("<sop>") == 130004
    with pytest.raises(KeyError):
        v1.get_command("sop")


@needs_ice_text
def test_v1_pair_layout(v1: GLMTokenizer) -> None:
    a = v1.encode("你好", add_special_tokens=False)
    b = v1.encode("Hello world", add_special_tokens=False)
    assert v1.build_inputs_with_special_tokens(a, b) == a + [130001, 130004] + b + [130005]
    assert v1(text="你好", text_pair="Hello world")["input_ids"] == a + [130001, 130004] + b + [130005]
    assert v1.get_special_tokens_mask(a, b) == [0] * len(a) + [1, 1] + [0] * len(b) + [1]


@needs_ice_text
def test_v1_decode_drops_pad_and_control_tokens(v1: GLMTokenizer) -> None:
    assert v1.decode([3, 3, 5, 74874, 130001, 130004, 130005]) == "你好"
    assert v1.decode([5, 74874, 130005, 2], skip_special_tokens=True) == "你好"
    assert v1.decode(130001) == ""
    assert v1.decode([]) == ""
    assert v1.decode([-100, 5, 74874, 10**9]) == "你好"  # label padding / out of range vanish


@needs_ice_text
def test_v1_image_token_offset() -> None:
    # Pre-slim checkpoints (vocab 150528): the class default offset of 20000 shifts every id.
    tok = ChatGLMTokenizer(str(ICE_TEXT))
    assert isinstance(tok, GLMTokenizer) and tok.num_image_tokens == 20000
    assert tok.encode("你好") == [20005, 94874, 150001, 150004]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.gmask_token_id) == (150004, 150005, 20003, 150001)
    assert tok.vocab_size == len(tok) == 150344
    assert tok.convert_ids_to_tokens([7, 20005]) == ["<image_7>", "▁"]
    assert tok.convert_tokens_to_ids("<image_7>") == 7
    # Ids below the offset (image tokens) and the shifted pad id decode to nothing.
    assert tok.decode([7, 20003, 19999, 20005, 94874, 150001, 150004]) == "你好"


@needs_ice_text
def test_v1_left_padding_builds_prefix_lm_mask_and_2d_positions(v1: GLMTokenizer) -> None:
    batch = v1(["你好", "晚上睡不着怎么办"], padding=True)
    # Row 0 is [5, 74874, [gMASK], <sop>] left-padded by one <pad> (3).
    assert batch["input_ids"] == [[3, 5, 74874, 130001, 130004], [74747, 83400, 66846, 130001, 130004]]

    # Unpadded row 0: length 4, context = 3 tokens before <sop>, [gMASK] at 2.
    #   positions       0 1 2 2 ; block 0 0 0 1 ; then one 0 prepended for the pad.
    # Row 1: length 5, context 4, [gMASK] at 3: positions 0 1 2 3 3 ; block 0 0 0 0 1.
    np.testing.assert_array_equal(batch["position_ids"][0], [[0, 0, 1, 2, 2], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(batch["position_ids"][1], [[0, 1, 2, 3, 3], [0, 0, 0, 0, 1]])

    # True = masked. Context columns are visible to every row, the rest is causal; the pad row/column is masked.
    expected_row0 = np.array(
        [
            [1, 1, 1, 1, 1],
            [1, 0, 0, 0, 1],
            [1, 0, 0, 0, 1],
            [1, 0, 0, 0, 1],
            [1, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    expected_row1 = np.array(
        [
            [0, 0, 0, 0, 1],
            [0, 0, 0, 0, 1],
            [0, 0, 0, 0, 1],
            [0, 0, 0, 0, 1],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    assert batch["attention_mask"][0].dtype == bool and batch["attention_mask"][0].shape == (1, 5, 5)
    np.testing.assert_array_equal(batch["attention_mask"][0][0], expected_row0)
    np.testing.assert_array_equal(batch["attention_mask"][1][0], expected_row1)

    tensors = v1(["你好", "晚上睡不着怎么办"], padding=True, return_tensors="pt")
    assert tensors["input_ids"].shape == (2, 5)
    assert tensors["attention_mask"].shape == (2, 1, 5, 5) and tensors["attention_mask"].dtype == torch.bool
    assert tensors["position_ids"].shape == (2, 2, 5) and tensors["position_ids"].dtype == torch.int64


@needs_ice_text
def test_v1_positions_after_sop_stay_at_the_mask(v1: GLMTokenizer) -> None:
    # Training layout: prompt + [gMASK] <sop> + answer + <eop>.
    ids = v1("你好", text_pair="Hello world")["input_ids"]  # [5, 74874, gMASK, sop, 19316, 398, eop]
    positions = v1.build_position_ids(ids)
    np.testing.assert_array_equal(positions, [[0, 1, 2, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3, 4]])
    mask = v1.build_attention_mask(ids)[0]
    assert not mask[:, :3].any()  # context visible everywhere
    assert mask[3, 4] and not mask[4, 3] and not mask[6, 6]  # causal after <sop>


@needs_ice_text
def test_v1_padding_side_kwarg(v1: GLMTokenizer) -> None:
    batch = v1(["你好", "晚上睡不着怎么办"], padding=True, padding_side="right")
    assert batch["input_ids"][0] == [5, 74874, 130001, 130004, 3]
    np.testing.assert_array_equal(batch["position_ids"][0], [[0, 1, 2, 2, 0], [0, 0, 0, 1, 0]])
    assert batch["attention_mask"][0][0, 4].all() and batch["attention_mask"][0][0, :, 4].all()
    # tokenizer.pad() with an explicit side and a fixed length
    padded = v1.pad({"input_ids": v1.encode("你好")}, padding="max_length", max_length=6, padding_side="left")
    assert padded["input_ids"] == [3, 3, 5, 74874, 130001, 130004]
    assert padded["attention_mask"].shape == (1, 6, 6)


# ================================================================================================================
# ChatGLM2-6B layout on the tiny trained model
# ================================================================================================================


def test_v2_special_token_layout(v2: GLM2Tokenizer) -> None:
    n = v2.sp.get_piece_size()
    assert v2.num_sp_pieces == n
    expected = {"[MASK]": n, "[gMASK]": n + 1, "[sMASK]": n + 2, "sop": n + 3, "eop": n + 4}
    assert {name: v2.get_command(name) for name in expected} == expected
    assert {name: v2.convert_tokens_to_ids(name) for name in expected} == expected
    assert v2.convert_ids_to_tokens(list(expected.values())) == list(expected)
    assert (v2.get_command("<bos>"), v2.get_command("<eos>"), v2.get_command("<pad>")) == (1, 2, 0)
    assert v2.vocab_size == len(v2) == len(v2.get_vocab()) == n + 5
    assert (v2.pad_token_id, v2.unk_token_id, v2.eos_token_id) == (0, 0, 2)
    assert (v2.pad_token, v2.unk_token, v2.eos_token) == ("<unk>", "<unk>", "</s>")
    assert v2.padding_side == "left"
    assert v2.model_input_names == ["input_ids", "attention_mask", "position_ids"]
    with pytest.raises(KeyError):
        v2.get_command("<sop>")


def test_v2_quoted_ids_fit_the_layout(v2: GLM2Tokenizer) -> None:
    # The real tokenizer.model is not available; check that the ids quoted in spec/tokenizer.md §1 follow the same
    # layout arithmetic this class applies to any SentencePiece model: specials at n + offset, n = 64789.
    n_tiny = v2.num_sp_pieces
    offsets = {name: v2.get_command(name) - n_tiny for name in GLM2Tokenizer.SPECIAL_TOKEN_NAMES}
    assert offsets == {"[MASK]": 0, "[gMASK]": 1, "[sMASK]": 2, "sop": 3, "eop": 4}
    n_real = 64789
    real = {name: n_real + offset for name, offset in offsets.items()}
    assert real == {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793}
    assert n_real + len(offsets) == 64794  # tokenizer.vocab_size of chatglm2-6b

    quoted = [
        [64790, 64792, 36474, 54591],
        [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211],
        [64790, 64792, 884, 1301, 9427, 13, 296, 4466, 2029, 15616, 30914, 993, 3387, 12, 31010, 30174],
    ]
    for ids in quoted:
        assert ids[:2] == [real["[gMASK]"], real["sop"]]  # the prefix this class prepends
        assert all(0 <= i < n_real for i in ids[2:])  # the rest are SentencePiece ids
    # The tiny model keeps the same byte-fallback placement: "\n" is <0x0A> = 3 + 10 = 13, "\t" is 12.
    assert v2.encode("\n", add_special_tokens=False)[-1] == 13 == v2.sp.piece_to_id("<0x0A>")
    assert v2.encode("\t", add_special_tokens=False)[-1] == 12
    # Same word split of the prompt header as the quoted ids: "▁[", "Round", "▁", "1", "]".
    pieces = v2.convert_ids_to_tokens(v2.encode("[Round 1]", add_special_tokens=False))
    assert pieces == ["▁[", "Round", "▁", "1", "]"]


def test_v2_prefix_and_pair(v2: GLM2Tokenizer) -> None:
    gmask, sop = v2.get_command("[gMASK]"), v2.get_command("sop")
    body = v2.encode("你好", add_special_tokens=False)
    assert v2.encode("你好") == [gmask, sop] + body
    second = v2.encode("再见", add_special_tokens=False)
    assert v2.encode("你好", "再见") == [gmask, sop] + body + second + [2]
    assert v2.get_special_tokens_mask(body, second) == [1, 1] + [0] * len(body) + [0] * len(second) + [1]
    assert v2.get_special_tokens_mask(v2.encode("你好"), already_has_special_tokens=True) == [1, 1] + [0] * len(body)


def test_v2_decode_drops_specials(v2: GLM2Tokenizer) -> None:
    body = v2.encode("你好 world", add_special_tokens=False)
    n = v2.num_sp_pieces
    noise = [n, n + 1, n + 2, n + 3, n + 4, 0, 1, 2, -100, n + 100]  # specials, pad/unk, bos, eos, labels, beyond
    assert v2.decode(noise[:5] + body + noise[5:]) == "你好 world"
    assert v2.decode(v2.encode("你好 world") + [2], skip_special_tokens=True) == "你好 world"
    assert v2.decode(n + 1) == ""
    assert v2.decode(torch.tensor(v2.encode("你好"))) == "你好"
    assert v2.clean_up_tokenization_spaces is False
    assert v2.decode(v2.encode("a , b . c")) == "a , b . c"  # no clean-up of spaces before punctuation


@pytest.mark.parametrize(
    "text",
    [
        "你好",
        "Hello, how are you today?",
        "emoji 🚀 not in the corpus, 👋 in it",
        "café — naïve ☕ ✨ 𝄞",  # 2-, 3- and 4-byte characters through byte fallback
        "[Round 1]\n\n问：12345+234=？\n\n答：",
        "def main():\n    print('hello world')\t# greeting",
        "trailing spaces   ",
        "multiple\n\n\nnewlines",
    ],
)
def test_v2_utf8_round_trip(v2: GLM2Tokenizer, text: str) -> None:
    assert v2.decode(v2.encode(text)) == text


def test_v2_unknown_characters_use_byte_pieces(v2: GLM2Tokenizer) -> None:
    pieces = v2.convert_ids_to_tokens(v2.encode("🚀", add_special_tokens=False))
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]


def test_v2_left_padding(v2: GLM2Tokenizer) -> None:
    short = v2.encode("你好")
    long = v2.encode("[Round 1]\n\n问：你好\n\n答：")
    pad = len(long) - len(short)
    assert pad > 0
    batch = v2(["你好", "[Round 1]\n\n问：你好\n\n答："], padding=True)
    assert batch["input_ids"] == [[0] * pad + short, long]
    assert batch["attention_mask"] == [[0] * pad + [1] * len(short), [1] * len(long)]
    assert batch["position_ids"] == [[0] * pad + list(range(len(short))), list(range(len(long)))]

    tensors = v2(["你好", "[Round 1]\n\n问：你好\n\n答："], padding=True, return_tensors="pt")
    assert {key: tuple(value.shape) for key, value in tensors.items()} == {
        "input_ids": (2, len(long)), "attention_mask": (2, len(long)), "position_ids": (2, len(long)),
    }


def test_v2_padding_side_and_pad_to_multiple(v2: GLM2Tokenizer) -> None:
    ids = v2.encode("你好")
    right = v2(["你好"], padding="max_length", max_length=len(ids) + 2, padding_side="right")
    assert right["input_ids"] == [ids + [0, 0]]
    assert right["attention_mask"] == [[1] * len(ids) + [0, 0]]
    assert right["position_ids"] == [list(range(len(ids))) + [0, 0]]
    padded = v2.pad({"input_ids": [ids]}, padding="longest", pad_to_multiple_of=8, padding_side="left")
    assert padded["input_ids"] == [[0] * (8 - len(ids)) + ids]
    # Existing attention_mask / position_ids are padded, not rebuilt.
    given = v2.pad({"input_ids": [ids], "attention_mask": [[1] * len(ids)], "position_ids": [[5] * len(ids)]},
                   padding="max_length", max_length=len(ids) + 1)
    assert given["position_ids"] == [[0] + [5] * len(ids)]


def test_v2_build_prompt_delegates(v2: GLM2Tokenizer) -> None:
    history = [("你好", "你好！")]
    assert v2.build_prompt("再见") == build_prompt_v2("再见") == "[Round 1]\n\n问：再见\n\n答："
    assert v2.build_prompt("再见", history) == build_prompt_v2("再见", history)
    inputs = v2.build_chat_input("再见", history)
    assert inputs["input_ids"].tolist() == [v2.encode(build_prompt_v2("再见", history))]
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids"}


def test_v2_stream_inputs_drop_the_dummy_prefix(v2: GLM2Tokenizer) -> None:
    history = [("你好", "你好👋！我是人工智能助手。")]
    text = build_incremental_prompt_v2("晚上睡不着应该怎么办", history)
    encoded = v2.encode(text, add_special_tokens=False)
    assert v2.convert_ids_to_tokens(encoded[0]) == "▁"

    inputs = v2.build_stream_inputs("晚上睡不着应该怎么办", history)
    stream = inputs["input_ids"][0].tolist()
    assert stream == encoded[1:]
    assert stream[:2] == [13, 13]  # starts right at the "\n\n" separator, no specials
    assert inputs["position_ids"][0].tolist() == list(range(len(stream)))
    assert inputs["attention_mask"][0].tolist() == [1] * len(stream)
    # Cache contents (full first prompt + answer) followed by the stream ids == the full second-round prompt.
    full = v2.encode(build_prompt_v2("晚上睡不着应该怎么办", history))
    assert full[-len(stream):] == stream


def test_v2_stream_inputs_without_history_is_the_full_prompt(v2: GLM2Tokenizer) -> None:
    inputs = v2.build_stream_inputs("你好", [])
    assert inputs["input_ids"].tolist() == [v2.encode("[Round 1]\n\n问：你好\n\n答：")]


def test_v2_special_names_in_text_stay_text(v2: GLM2Tokenizer) -> None:
    # "sop"/"eop" are ordinary words in text; only build_inputs_with_special_tokens emits the control ids.
    ids = v2.encode("sop eop [gMASK] philosophy", add_special_tokens=False)
    assert not set(ids) & set(range(v2.num_sp_pieces, v2.vocab_size))
    assert v2.decode(ids) == "sop eop [gMASK] philosophy"


def test_v2_copy_and_pickle(v2: GLM2Tokenizer) -> None:
    for clone in (copy.deepcopy(v2), pickle.loads(pickle.dumps(v2))):
        assert type(clone) is GLM2Tokenizer
        assert clone.encode("你好 world") == v2.encode("你好 world")


# ================================================================================================================
# Version detection, saving and loading
# ================================================================================================================


def test_version_detection_from_content(tiny_dir: Path, tmp_path: Path) -> None:
    assert detect_tokenizer_version(tiny_dir / "tokenizer.model") == 2
    tok = ChatGLMTokenizer(str(tiny_dir / "tokenizer.model"))
    assert type(tok) is GLM2Tokenizer and isinstance(tok, ChatGLMTokenizer) and tok.version == 2
    assert ChatGLM2Tokenizer is GLM2Tokenizer
    # The file name does not matter: a v2 model stored as ice_text.model is still v2.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(tiny_dir / "tokenizer.model", renamed / "ice_text.model")
    assert type(ChatGLMTokenizer.from_pretrained(renamed)) is GLM2Tokenizer
    with pytest.raises(ValueError, match="v2 SentencePiece model"):
        GLMTokenizer(str(tiny_dir / "tokenizer.model"))
    with pytest.raises(ValueError, match="vocab_file"):
        ChatGLMTokenizer()
    with pytest.raises(OSError):
        ChatGLMTokenizer.from_pretrained(tmp_path / "renamed" / "missing")


@needs_ice_text
def test_version_detection_v1(tmp_path: Path) -> None:
    assert detect_tokenizer_version(ICE_TEXT) == 1
    assert type(ChatGLMTokenizer(str(ICE_TEXT))) is GLMTokenizer
    shutil.copy(ICE_TEXT, tmp_path / "tokenizer.model")  # v1 content under the v2 name
    renamed = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert type(renamed) is GLMTokenizer and renamed.num_image_tokens == 20000  # class default
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(V1_TOKENIZER_CONFIG), encoding="utf-8")
    renamed = ChatGLMTokenizer.from_pretrained(tmp_path)  # the folder's settings still apply
    assert renamed.num_image_tokens == 0 and renamed.encode("你好") == [5, 74874, 130001, 130004]
    assert type(ChatGLMTokenizer.from_pretrained(ICE_TEXT, num_image_tokens=0)) is GLMTokenizer  # a file path
    with pytest.raises(ValueError, match="v1 SentencePiece model"):
        GLM2Tokenizer(str(ICE_TEXT))


def test_v2_save_and_reload(v2: GLM2Tokenizer, tmp_path: Path) -> None:
    v2.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == v2.sp.serialized_model_proto()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLMTokenizer"
    assert config["padding_side"] == "left"
    reloaded = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is GLM2Tokenizer
    assert reloaded.encode("你好 world") == v2.encode("你好 world")
    assert reloaded.vocab_size == v2.vocab_size and reloaded.padding_side == "left"
    assert reloaded.clean_up_tokenization_spaces is False


@needs_ice_text
def test_v1_save_and_reload(v1_dir: Path, tmp_path: Path) -> None:
    tok = ChatGLMTokenizer.from_pretrained(v1_dir)
    assert type(tok) is GLMTokenizer and tok.num_image_tokens == 0
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "ice_text.model").read_bytes() == ICE_TEXT.read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLMTokenizer" and config["num_image_tokens"] == 0
    reloaded = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is GLMTokenizer and reloaded.num_image_tokens == 0
    text = "def main():\n    print('hello world')\t# greeting"
    assert reloaded.encode(text) == tok.encode(text) == V1_KNOWN_WITH_SPECIALS[1][1]
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (130004, 130005, 3)


class _StubConfig(PretrainedConfig):
    # Registering against a throw-away model type checks the AutoTokenizer route without the model package.
    model_type = "chatglm_tok_test"


def _register_stub() -> None:
    AutoConfig.register(_StubConfig.model_type, _StubConfig, exist_ok=True)
    AutoTokenizer.register(_StubConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)


def test_auto_tokenizer_route_stub_v2(v2: GLM2Tokenizer, tmp_path: Path) -> None:
    _register_stub()
    v2.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": _StubConfig.model_type}), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(tok) is GLM2Tokenizer and tok.encode("你好") == v2.encode("你好")


@needs_ice_text
def test_auto_tokenizer_route_stub_v1(v1_dir: Path, tmp_path: Path) -> None:
    _register_stub()
    folder = tmp_path / "v1"
    shutil.copytree(v1_dir, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": _StubConfig.model_type}), encoding="utf-8")
    # The real tokenizer_config.json names remote code (auto_map); the registered local class must win without
    # trust_remote_code.
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok) is GLMTokenizer and tok.encode("你好") == [5, 74874, 130001, 130004]


@pytest.mark.skipif(not (REPO_ROOT / "chatglm" / "__init__.py").is_file(), reason="chatglm/__init__.py not written yet")
def test_auto_tokenizer_route_via_package(v2: GLM2Tokenizer, tmp_path: Path) -> None:
    import chatglm  # noqa: F401  - registers model_type "chatglm"

    v2.save_pretrained(tmp_path / "v2")
    (tmp_path / "v2" / "config.json").write_text(json.dumps({"model_type": "chatglm"}), encoding="utf-8")
    assert type(AutoTokenizer.from_pretrained(tmp_path / "v2")) is GLM2Tokenizer
    if ICE_TEXT.is_file():
        folder = tmp_path / "v1"
        folder.mkdir()
        shutil.copy(ICE_TEXT, folder / "ice_text.model")
        (folder / "tokenizer_config.json").write_text(json.dumps(V1_TOKENIZER_CONFIG), encoding="utf-8")
        (folder / "config.json").write_text(
            json.dumps({"model_type": "chatglm", "position_encoding_2d": True, "vocab_size": 130528}), encoding="utf-8"
        )
        tok = AutoTokenizer.from_pretrained(folder)
        assert type(tok) is GLMTokenizer and tok.encode("你好") == [5, 74874, 130001, 130004]


# ================================================================================================================
# The training script
# ================================================================================================================


def test_tiny_tokenizer_training_is_reproducible(train_script: ModuleType, tiny_dir: Path, tmp_path: Path) -> None:
    again = train_script.train_tiny_tokenizer(tmp_path)
    assert again.read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLMTokenizer"


def test_tiny_tokenizer_shape(v2: GLM2Tokenizer) -> None:
    sp = v2.sp
    assert 1000 <= sp.get_piece_size() <= 4000
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    # Whitespace-only pieces exist for indentation, digits are split, the full-width colon survives.
    assert sp.piece_to_id("▁▁▁▁") != sp.unk_id()
    assert v2.convert_ids_to_tokens(v2.encode("2023", add_special_tokens=False)) == ["▁", "2", "0", "2", "3"]
    assert "：" in v2.convert_ids_to_tokens(v2.encode("问：", add_special_tokens=False))
    # None of the five special names is a piece of the tiny model, so convert_tokens_to_ids is unambiguous.
    assert all(sp.piece_to_id(name) == sp.unk_id() for name in GLM2Tokenizer.SPECIAL_TOKEN_NAMES)


def test_tiny_tokenizer_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--out", str(out)], capture_output=True, text=True, check=True, timeout=60
    )
    assert "SentencePiece pieces" in result.stdout
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()


@pytest.mark.skipif(not (TINY_ASSET / "tokenizer.model").is_file(), reason="the demo tokenizer asset is not built")
def test_embedded_demo_tokenizer_loads() -> None:
    tok = ChatGLMTokenizer.from_pretrained(TINY_ASSET)
    assert type(tok) is GLM2Tokenizer
    assert tok.decode(tok.encode("你好，世界！")) == "你好，世界！"
