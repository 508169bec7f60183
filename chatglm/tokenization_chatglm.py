"""SentencePiece tokenizers of ChatGLM-6B (v1, `ice_text.model`) and ChatGLM2-6B (v2, `tokenizer.model`).

Both real checkpoints name their tokenizer `ChatGLMTokenizer` in tokenizer_config.json although the two behave
differently, so `ChatGLMTokenizer` here is an entry class: constructing it (or calling `from_pretrained`) looks at
the SentencePiece model and returns a `GLMTokenizer` (v1) or a `GLM2Tokenizer` (v2). Both are subclasses of
`ChatGLMTokenizer`, so `isinstance(tok, ChatGLMTokenizer)` holds and `save_pretrained` writes
`"tokenizer_class": "ChatGLMTokenizer"` so that the folder loads back through AutoTokenizer.

Version detection: ChatGLM-6B's SentencePiece model carries its GLM control symbols (`[gMASK]`, `<sop>`, ...) as
real pieces; ChatGLM2-6B's model has none and the tokenizer appends its five specials after the SentencePiece
vocabulary. A model containing the piece `[gMASK]` is v1, any other is v2.

Compatibility with transformers 4.4x and 5.x (spec/tokenizer.md §3): the SentencePiece processor is created before
`super().__init__` (the base constructor queries the vocabulary), and `_pad` accepts `padding_side`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import sentencepiece as spm
from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.utils import PaddingStrategy

from .prompt import V1_FORMAT, V2_FORMAT, PromptFormat, build_incremental_prompt_v2

__all__ = [
    "ChatGLMTokenizer",
    "ChatGLM2Tokenizer",
    "GLMTokenizer",
    "GLM2Tokenizer",
    "detect_tokenizer_version",
]

V1_VOCAB_FILE = "ice_text.model"
V2_VOCAB_FILE = "tokenizer.model"
# Order matters only when a folder holds both files: the newer generation wins.
_VOCAB_FILE_CANDIDATES = (V2_VOCAB_FILE, V1_VOCAB_FILE)
_V1_MARKER_PIECE = "[gMASK]"
_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

History = Optional[Sequence[Sequence[str]]]


@functools.lru_cache(maxsize=8)
def _load_processor_cached(path: str, mtime_ns: int, size: int) -> spm.SentencePieceProcessor:
    # mtime/size are part of the key so a rewritten file is reloaded. Sharing one processor between tokenizer
    # instances is safe: encoding and decoding do not mutate it.
    return spm.SentencePieceProcessor(model_file=path)


def _load_processor(vocab_file: Union[str, os.PathLike]) -> spm.SentencePieceProcessor:
    path = os.path.realpath(os.fspath(vocab_file))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SentencePiece model not found: {vocab_file}")
    stat = os.stat(path)
    return _load_processor_cached(path, stat.st_mtime_ns, stat.st_size)


def _version_of(sp: spm.SentencePieceProcessor) -> int:
    # piece_to_id answers the unknown id for a piece that is not in the model.
    return 1 if sp.piece_to_id(_V1_MARKER_PIECE) != sp.unk_id() else 2


def detect_tokenizer_version(vocab_file: Union[str, os.PathLike]) -> int:
    """1 for a ChatGLM-6B SentencePiece model (has the piece `[gMASK]`), 2 otherwise (ChatGLM2-6B layout)."""
    return _version_of(_load_processor(vocab_file))


def _implementation_for(vocab_file: Union[str, os.PathLike]) -> type[ChatGLMTokenizer]:
    return GLMTokenizer if detect_tokenizer_version(vocab_file) == 1 else GLM2Tokenizer


def _pad_sequence(values: Any, difference: int, pad_value: Any, side: str) -> Any:
    # Pads the last axis (the sequence axis) of a list or an array; v1 also stores 2-D/3-D arrays here.
    nested = isinstance(values, (list, tuple)) and len(values) > 0 and isinstance(values[0], (list, tuple, np.ndarray))
    if isinstance(values, np.ndarray) or nested:
        array = np.asarray(values)
        widths = [(0, 0)] * array.ndim
        widths[-1] = (difference, 0) if side == "left" else (0, difference)
        return np.pad(array, widths, mode="constant", constant_values=pad_value)
    values = list(values)
    return [pad_value] * difference + values if side == "left" else values + [pad_value] * difference


class ChatGLMTokenizer(PreTrainedTokenizer):
    """Entry class for both ChatGLM tokenizers; see the module docstring.

    `ChatGLMTokenizer(vocab_file)` and `ChatGLMTokenizer.from_pretrained(path)` return a `GLMTokenizer` (v1) or a
    `GLM2Tokenizer` (v2) chosen from the content of the SentencePiece model, whatever the file is called.
    """

    vocab_files_names = {"vocab_file": V2_VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"
    version: Optional[int] = None
    prompt_format: Optional[PromptFormat] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> ChatGLMTokenizer:
        if cls is ChatGLMTokenizer:
            vocab_file = args[0] if args else kwargs.get("vocab_file")
            if vocab_file is None:
                raise ValueError(
                    "ChatGLMTokenizer needs `vocab_file` (a SentencePiece model: ice_text.model or tokenizer.model)"
                )
            cls = _implementation_for(vocab_file)
        return super().__new__(cls)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Union[str, os.PathLike], *init_inputs: Any, **kwargs: Any
    ) -> ChatGLMTokenizer:
        """Load from a folder / hub repo holding `tokenizer.model` or `ice_text.model` (+ optional
        tokenizer_config.json), or from the path of the SentencePiece file itself."""
        if cls is not ChatGLMTokenizer:
            return super().from_pretrained(pretrained_model_name_or_path, *init_inputs, **kwargs)
        vocab_file = kwargs.pop("vocab_file", None) or _find_vocab_file(pretrained_model_name_or_path, kwargs)
        implementation = _implementation_for(vocab_file)
        if os.path.basename(vocab_file) == implementation.vocab_files_names["vocab_file"]:
            return implementation.from_pretrained(
                pretrained_model_name_or_path, *init_inputs, vocab_file=vocab_file, **kwargs
            )
        # A model stored under the other generation's file name (e.g. a v1 model as tokenizer.model): transformers
        # 4.x only resolves the class's own file name, so load from the file and apply the folder's settings here.
        folder = os.fspath(pretrained_model_name_or_path)
        settings = _read_tokenizer_config(os.path.dirname(vocab_file)) if os.path.isdir(folder) else {}
        return implementation.from_pretrained(vocab_file, *init_inputs, **{**settings, **kwargs})

    # ------------------------------------------------------------------------------------------------------------
    # Shared SentencePiece plumbing (subclasses set self.sp before calling super().__init__).
    # ------------------------------------------------------------------------------------------------------------

    sp: spm.SentencePieceProcessor

    def _init_sentencepiece(self, vocab_file: Union[str, os.PathLike]) -> None:
        self.vocab_file = os.fspath(vocab_file)
        self.sp = _load_processor(vocab_file)
        found = _version_of(self.sp)
        if found != self.version:
            raise ValueError(
                f"{vocab_file} is a ChatGLM v{found} SentencePiece model but {type(self).__name__} is the "
                f"v{self.version} tokenizer; load it through ChatGLMTokenizer, which picks the right class"
            )
        self._vocab_cache: Optional[dict[str, int]] = None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _build_vocab(self) -> dict[str, int]:
        raise NotImplementedError

    def get_vocab(self) -> dict[str, int]:
        # The base class calls this repeatedly while registering special tokens; 130k pieces make it worth caching.
        if self.__dict__.get("_vocab_cache") is None:
            self._vocab_cache = self._build_vocab()
        return dict(self._vocab_cache)

    def _silent_ids(self) -> set[int]:
        """Ids inside the vocabulary that decode to nothing (padding and the like)."""
        raise NotImplementedError

    def _decode_piece(self, index: int) -> Optional[str]:
        """The SentencePiece piece an id decodes through, or None for ids outside the text vocabulary."""
        raise NotImplementedError

    def _postprocess_text(self, text: str) -> str:
        return text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._postprocess_text(self.sp.decode_pieces([t for t in tokens if t and self._is_text_token(t)]))

    def _is_text_token(self, token: str) -> bool:
        return True

    def _decode(
        self,
        token_ids: Union[int, list[int]],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: Optional[bool] = None,
        **kwargs: Any,
    ) -> str:
        # Decoding works on ids rather than on convert_ids_to_tokens: transformers 5 registers eos/pad/unk as added
        # tokens, whose strings would otherwise reach SentencePiece ("<unk>" decodes as " ⁇ "), while the original
        # tokenizers make those ids vanish.
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [int(token_ids)]
        skip = self._silent_ids() | (set(self.all_special_ids) if skip_special_tokens else set())
        vocab_size = self.vocab_size
        chunks: list[str] = []
        pieces: list[str] = []
        for index in token_ids:
            index = int(index)
            if index in skip:
                continue
            if index >= vocab_size and index in self._added_tokens_decoder:
                # A token added with add_tokens() after loading: not a SentencePiece piece, keep its text verbatim.
                chunks.append(self.convert_tokens_to_string(pieces))
                pieces = []
                chunks.append(self._added_tokens_decoder[index].content)
                continue
            piece = self._decode_piece(index)
            if piece is not None:
                pieces.append(piece)
        chunks.append(self.convert_tokens_to_string(pieces))
        text = "".join(chunks)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple[str]:
        """Write the SentencePiece model under its real name (ice_text.model / tokenizer.model)."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = os.path.join(save_directory, name)
        # From memory, so saving works even after the source file moved, and never copies a file onto itself.
        with open(path, "wb") as handle:
            handle.write(self.sp.serialized_model_proto())
        return (path,)

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        legacy_format: Optional[bool] = None,
        filename_prefix: Optional[str] = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> tuple[str, ...]:
        """As the base method, but records `tokenizer_class: "ChatGLMTokenizer"` (the name AutoTokenizer resolves,
        as in the real checkpoints) instead of the implementation class name."""
        if push_to_hub:
            # The base method would upload before the class name is corrected; upload the saved folder instead.
            raise NotImplementedError("save_pretrained(push_to_hub=True) is not supported; save, then upload")
        files = super().save_pretrained(
            save_directory, legacy_format=legacy_format, filename_prefix=filename_prefix, **kwargs
        )
        config_file = os.path.join(
            os.fspath(save_directory), (filename_prefix + "-" if filename_prefix else "") + _TOKENIZER_CONFIG_FILE
        )
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as handle:
                config = json.load(handle)
            config["tokenizer_class"] = "ChatGLMTokenizer"
            # Load-time bookkeeping that some transformers versions copy into the config; it is not a setting.
            for key in ("is_local", "local_files_only", "vocab_file"):
                config.pop(key, None)
            with open(config_file, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files

    # ------------------------------------------------------------------------------------------------------------
    # Chat helpers shared by both versions.
    # ------------------------------------------------------------------------------------------------------------

    def build_prompt(self, query: str, history: History = None) -> str:
        """The chat prompt text of this tokenizer's model generation (spec/chat.md)."""
        assert self.prompt_format is not None
        return self.prompt_format.build_prompt(query, history)

    def build_chat_input(self, query: str, history: History = None) -> BatchEncoding:
        """The full chat prompt encoded with special tokens, as a batch of one (`return_tensors="pt"`)."""
        return self([self.build_prompt(query, history)], return_tensors="pt")


def _read_tokenizer_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, _TOKENIZER_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    # Keys about the file itself or remote code, not constructor settings.
    for key in ("tokenizer_class", "auto_map", "added_tokens_decoder", "name_or_path", "vocab_file"):
        config.pop(key, None)
    return config


def _find_vocab_file(pretrained_model_name_or_path: Union[str, os.PathLike], kwargs: dict[str, Any]) -> str:
    path = os.fspath(pretrained_model_name_or_path)
    if os.path.isfile(path):
        return path
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        for name in _VOCAB_FILE_CANDIDATES:
            candidate = os.path.join(path, subfolder, name)
            if os.path.isfile(candidate):
                return candidate
    else:
        from transformers.utils import cached_file

        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
            if key in kwargs
        }
        for name in _VOCAB_FILE_CANDIDATES:
            resolved = cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
            if resolved is not None:
                return resolved
    raise OSError(f"no ChatGLM SentencePiece model ({' or '.join(_VOCAB_FILE_CANDIDATES)}) found in {path!r}")


# ----------------------------------------------------------------------------------------------------------------
# ChatGLM2-6B
# ----------------------------------------------------------------------------------------------------------------


class GLM2Tokenizer(ChatGLMTokenizer):
    """ChatGLM2-6B tokenizer (spec/tokenizer.md §1).

    Ids 0..n-1 are the SentencePiece pieces (unk 0 = pad, bos 1, eos 2); the five GLM specials follow at n..n+4.
    Inputs are prefixed with `[gMASK] sop`; padding is on the left and also yields `position_ids`.
    """

    vocab_files_names = {"vocab_file": V2_VOCAB_FILE}
    version = 2
    prompt_format = V2_FORMAT
    SPECIAL_TOKEN_NAMES = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")

    def __init__(
        self,
        vocab_file: Union[str, os.PathLike],
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        unk_token: str = "<unk>",
        pad_token: str = "<unk>",
        eos_token: str = "</s>",
        **kwargs: Any,
    ) -> None:
        self._init_sentencepiece(vocab_file)
        self.num_sp_pieces = self.sp.get_piece_size()
        self.special_tokens = {name: self.num_sp_pieces + i for i, name in enumerate(self.SPECIAL_TOKEN_NAMES)}
        self._special_token_by_id = {index: name for name, index in self.special_tokens.items()}
        self._commands = {
            **self.special_tokens,
            "<bos>": self.sp.bos_id(),
            "<eos>": self.sp.eos_id(),
            "<pad>": self.sp.unk_id(),
        }
        # bos, eos and unk (= pad) decode to nothing, as do the five specials (beyond the SentencePiece range)
        self._silent = frozenset({self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()})
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            unk_token=unk_token,
            pad_token=pad_token,
            eos_token=eos_token,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.num_sp_pieces + len(self.SPECIAL_TOKEN_NAMES)

    def get_command(self, token: str) -> int:
        """Id of `<bos>`, `<eos>`, `<pad>` or one of `[MASK]`, `[gMASK]`, `[sMASK]`, `sop`, `eop`."""
        try:
            return self._commands[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a ChatGLM2 command token; known: {sorted(self._commands)}") from None

    def _build_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.num_sp_pieces)}
        for name, index in self.special_tokens.items():
            vocab.setdefault(name, index)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp.encode_as_pieces(text)

    def _convert_token_to_id(self, token: str) -> int:
        # A real SentencePiece piece wins over a special's name: the names "sop"/"eop" are ordinary words, and
        # a piece produced by encoding text must never turn into a control token.
        index = self.sp.piece_to_id(token)
        if index != self.sp.unk_id() or token == self.sp.id_to_piece(self.sp.unk_id()):
            return index
        return self.special_tokens.get(token, index)

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < self.num_sp_pieces:
            return self.sp.id_to_piece(index)
        return self._special_token_by_id.get(index, "")

    def _silent_ids(self) -> set[int]:
        return set(self._silent)

    def _decode_piece(self, index: int) -> Optional[str]:
        if index < 0 or index >= self.num_sp_pieces:
            return None
        return self.sp.id_to_piece(index)

    def _is_text_token(self, token: str) -> bool:
        return token not in self.special_tokens or self.sp.piece_to_id(token) != self.sp.unk_id()

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None
    ) -> list[int]:
        """`[gMASK] sop A` for one sequence, `[gMASK] sop A B </s>` for a pair."""
        ids = [self.special_tokens["[gMASK]"], self.special_tokens["sop"], *token_ids_0]
        if token_ids_1 is not None:
            ids += [*token_ids_1, self.sp.eos_id()]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.special_tokens.values()) | self._silent
            return [1 if int(t) in special else 0 for t in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def _pad(
        self,
        encoded_inputs: Union[dict[str, Any], BatchEncoding],
        max_length: Optional[int] = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: Optional[int] = None,
        padding_side: Optional[str] = None,
        return_attention_mask: Optional[bool] = None,
    ) -> dict[str, Any]:
        side = padding_side or self.padding_side
        required_input = encoded_inputs[self.model_input_names[0]]
        seq_length = len(required_input)
        max_length = _target_length(seq_length, max_length, padding_strategy, pad_to_multiple_of)
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names

        if return_attention_mask and "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * seq_length
        if "position_ids" in self.model_input_names and "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(seq_length))

        if padding_strategy != PaddingStrategy.DO_NOT_PAD and max_length is not None and seq_length < max_length:
            difference = max_length - seq_length
            for key, value in (("attention_mask", 0), ("position_ids", 0), ("token_type_ids", self.pad_token_type_id),
                               ("special_tokens_mask", 1)):
                if key in encoded_inputs:
                    encoded_inputs[key] = _pad_sequence(encoded_inputs[key], difference, value, side)
            main = self.model_input_names[0]
            encoded_inputs[main] = _pad_sequence(required_input, difference, self.pad_token_id, side)
        return encoded_inputs

    def build_stream_inputs(self, query: str, history: History = None) -> BatchEncoding:
        """Inputs that continue a conversation whose previous turns are already in the KV cache.

        With a history, only `\\n\\n[Round n+1]\\n\\n问：{query}\\n\\n答：` is encoded, without special tokens and
        without its first token (SentencePiece's dummy-prefix `▁`); position_ids start at 0 and the caller offsets
        them by the cache length. Without a history this is the full prompt (`build_chat_input`).
        """
        if not history:
            return self.build_chat_input(query, history)
        ids = self.encode(build_incremental_prompt_v2(query, history), add_special_tokens=False)[1:]
        return self.pad({"input_ids": [ids]}, return_tensors="pt")


# ----------------------------------------------------------------------------------------------------------------
# ChatGLM-6B
# ----------------------------------------------------------------------------------------------------------------

_BLANK_RUN_RE = re.compile(" {2,80}")
_BLANK_TOKEN_RE = re.compile(r"<\|blank_(\d+)\|>")
_IMAGE_TOKEN_RE = re.compile(r"<image_(\d+)>")


class GLMTokenizer(ChatGLMTokenizer):
    """ChatGLM-6B tokenizer (spec/tokenizer.md §2).

    Text is normalised before SentencePiece (`\\n` -> `<n>`, `\\t` -> `<|tab|>`, runs of 2..80 spaces ->
    `<|blank_N|>`) and restored on decode. Every SentencePiece id is shifted by `num_image_tokens` (0 in the current
    checkpoint, 20000 before the April 2023 vocabulary slimming). `[gMASK] <sop>` are appended to inputs; padding
    is on the left and produces the prefix-LM attention mask `[1, L, L]` (True = masked) and the 2-D position ids
    `[2, L]` that the model expects.
    """

    vocab_files_names = {"vocab_file": V1_VOCAB_FILE}
    version = 1
    prompt_format = V1_FORMAT

    def __init__(
        self,
        vocab_file: Union[str, os.PathLike],
        do_lower_case: bool = False,
        remove_space: bool = False,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        end_token: str = "</s>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        padding_side: str = "left",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        num_image_tokens: int = 20000,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        self._init_sentencepiece(vocab_file)
        self.num_sp_pieces = self.sp.get_piece_size()
        self.num_image_tokens = int(num_image_tokens)
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        # transformers 5 hands custom "*_token" entries of tokenizer_config.json over as a dict.
        specific = kwargs.get("model_specific_special_tokens") or {}
        self._gmask_token = str(specific.get("gmask_token", gmask_token))
        self._end_token = str(specific.get("end_token", end_token))
        self._mask_token_text = str(mask_token)
        self._bos_token_text = str(bos_token)
        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            bos_token=bos_token,
            eos_token=eos_token,
            end_token=self._end_token,
            mask_token=mask_token,
            gmask_token=self._gmask_token,
            padding_side=padding_side,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.num_sp_pieces

    @property
    def gmask_token_id(self) -> int:
        return self._convert_token_to_id(self._gmask_token)

    @property
    def end_token_id(self) -> int:
        return self._convert_token_to_id(self._end_token)

    def _sop_id(self) -> int:
        return self._convert_token_to_id(self._bos_token_text)

    def _mask_id(self) -> int:
        return self._convert_token_to_id(self._mask_token_text)

    def get_command(self, token: str) -> int:
        """Id of a named piece such as `[gMASK]`, `<sop>`, `<eop>`, `<pad>` (offset included)."""
        if self.sp.piece_to_id(token) == self.sp.unk_id() and token != "<unk>":
            raise KeyError(f"{token!r} is not a piece of the ChatGLM-6B vocabulary")
        return self._convert_token_to_id(token)

    def _build_vocab(self) -> dict[str, int]:
        vocab = {f"<image_{i}>": i for i in range(self.num_image_tokens)}
        offset = self.num_image_tokens
        vocab.update({self.sp.id_to_piece(i): i + offset for i in range(self.num_sp_pieces)})
        return vocab

    # -- text normalisation --------------------------------------------------------------------------------------

    def preprocess_text(self, text: str) -> str:
        """Optional whitespace collapsing / lower-casing (both off in the released checkpoint)."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return text

    @staticmethod
    def _encode_whitespace(text: str) -> str:
        # The vocabulary has pieces for a newline, a tab and runs of 2..80 spaces; a greedy scan takes the longest
        # run first, which is the same as replacing the 80-space run first, then 79, ... down to 2.
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        return _BLANK_RUN_RE.sub(lambda m: f"<|blank_{len(m.group(0))}|>", text)

    @staticmethod
    def _decode_whitespace(text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")

        def blank(match: re.Match[str]) -> str:
            count = int(match.group(1))
            return " " * count if 2 <= count <= 80 else match.group(0)

        return _BLANK_TOKEN_RE.sub(blank, text)

    def _sp_pieces(self, text: str, add_dummy_prefix: bool = True) -> list[str]:
        text = self._encode_whitespace(self.preprocess_text(text))
        if add_dummy_prefix:
            return self.sp.encode_as_pieces(text)
        # SentencePiece always adds its dummy prefix; encode after a newline and drop the "▁", "<n>" it produces.
        return self.sp.encode_as_pieces("<n>" + text)[2:]

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self._sp_pieces(text, add_dummy_prefix=kwargs.get("add_dummy_prefix", True))

    def _convert_token_to_id(self, token: str) -> int:
        match = _IMAGE_TOKEN_RE.fullmatch(token)
        if match and int(match.group(1)) < self.num_image_tokens:
            return int(match.group(1))
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if index < 0:
            return ""
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        index -= self.num_image_tokens
        return self.sp.id_to_piece(index) if index < self.num_sp_pieces else ""

    def _silent_ids(self) -> set[int]:
        pad = self.pad_token_id
        return set() if pad is None else {pad}

    def _decode_piece(self, index: int) -> Optional[str]:
        # Image-token ids vanish; control pieces ([gMASK], <sop>, ...) already decode to "" in SentencePiece.
        if index < self.num_image_tokens:
            return None
        index -= self.num_image_tokens
        return self.sp.id_to_piece(index) if index < self.num_sp_pieces else None

    def _is_text_token(self, token: str) -> bool:
        return _IMAGE_TOKEN_RE.fullmatch(token) is None

    def _postprocess_text(self, text: str) -> str:
        return self._decode_whitespace(text)

    # -- model inputs --------------------------------------------------------------------------------------------

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None
    ) -> list[int]:
        """`A [gMASK] <sop>` for one sequence, `A [gMASK] <sop> B <eop>` for a pair."""
        ids = [*token_ids_0, self.gmask_token_id, self._sop_id()]
        if token_ids_1 is not None:
            ids += [*token_ids_1, self.eos_token_id]
        return ids

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids) | {self.gmask_token_id, self._sop_id()}
            return [1 if int(t) in special else 0 for t in token_ids_0]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def _context_length(self, ids: list[int]) -> int:
        # Everything before <sop> is the bidirectional context.
        sop = self._sop_id()
        return ids.index(sop) if sop in ids else len(ids)

    def build_attention_mask(self, input_ids: Sequence[int]) -> np.ndarray:
        """Prefix-LM mask `[1, L, L]`, True = masked: the context (up to <sop>) is visible to all, the rest causal."""
        ids = [int(i) for i in input_ids]
        length = len(ids)
        visible = np.tril(np.ones((length, length), dtype=bool))
        visible[:, : self._context_length(ids)] = True
        return ~visible[None, :, :]

    def build_position_ids(self, input_ids: Sequence[int]) -> np.ndarray:
        """2-D positions `[2, L]` (int64): row 0 the token position, frozen at the mask position after the context;
        row 1 the block position, 0 over the context and 1, 2, ... from <sop> on."""
        ids = [int(i) for i in input_ids]
        length = len(ids)
        context_length = self._context_length(ids)
        positions = np.arange(length, dtype=np.int64)
        # Same rule as the model's own position computation (spec/checkpoints.md): [gMASK] if present, else [MASK].
        gmask, mask = self.gmask_token_id, self._mask_id()
        mask_token = gmask if gmask in ids else mask
        if mask_token in ids:
            positions[context_length:] = ids.index(mask_token)
        block_positions = np.concatenate(
            [np.zeros(context_length, dtype=np.int64), np.arange(1, length - context_length + 1, dtype=np.int64)]
        )
        return np.stack([positions, block_positions], axis=0)

    def _pad(
        self,
        encoded_inputs: Union[dict[str, Any], BatchEncoding],
        max_length: Optional[int] = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: Optional[int] = None,
        padding_side: Optional[str] = None,
        return_attention_mask: Optional[bool] = None,
    ) -> dict[str, Any]:
        # The v1 mask and positions are always the model's structured ones (never a 1-D mask), whether or not the
        # batch needs padding, so a model sees one input layout.
        side = padding_side or self.padding_side
        required_input = list(encoded_inputs[self.model_input_names[0]])
        seq_length = len(required_input)
        max_length = _target_length(seq_length, max_length, padding_strategy, pad_to_multiple_of)
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names

        if return_attention_mask and "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = self.build_attention_mask(required_input)
        if "position_ids" in self.model_input_names and "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = self.build_position_ids(required_input)

        if padding_strategy != PaddingStrategy.DO_NOT_PAD and max_length is not None and seq_length < max_length:
            difference = max_length - seq_length
            if "attention_mask" in encoded_inputs:
                mask = encoded_inputs["attention_mask"]
                if not isinstance(mask, np.ndarray) and len(mask) > 0 and isinstance(mask[0], (list, tuple)):
                    mask = np.asarray(mask, dtype=bool)  # a structured mask that went through to_py_obj
                if isinstance(mask, np.ndarray) and mask.ndim == 3:
                    # Padded rows and columns are fully masked.
                    edge = (difference, 0) if side == "left" else (0, difference)
                    widths = [(0, 0), edge, edge]
                    encoded_inputs["attention_mask"] = np.pad(mask, widths, mode="constant", constant_values=True)
                else:
                    encoded_inputs["attention_mask"] = _pad_sequence(mask, difference, 0, side)
            fills = (("position_ids", 0), ("token_type_ids", self.pad_token_type_id), ("special_tokens_mask", 1))
            for key, value in fills:
                if key in encoded_inputs:
                    encoded_inputs[key] = _pad_sequence(encoded_inputs[key], difference, value, side)
            main = self.model_input_names[0]
            encoded_inputs[main] = _pad_sequence(required_input, difference, self.pad_token_id, side)
        return encoded_inputs


def _target_length(
    seq_length: int, max_length: Optional[int], padding_strategy: PaddingStrategy, pad_to_multiple_of: Optional[int]
) -> Optional[int]:
    if padding_strategy == PaddingStrategy.LONGEST:
        max_length = seq_length
    if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of != 0:
        max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
    return max_length


# The name used for the v2 tokenizer in the project brief and by the original ChatGLM2 code base.
ChatGLM2Tokenizer = GLM2Tokenizer
