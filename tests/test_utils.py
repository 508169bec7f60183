"""utils.py: the multi-GPU device maps of both versions, dispatch through accelerate, the demos' helpers."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
from conftest import EMBEDDED_MODEL, randomize, tiny_v1_config, tiny_v2_config
from demo_helpers import REPO  # noqa: F401 - puts the repo root on sys.path for `utils`

from chatglm import ChatEngine, GLM2ForConditionalGeneration, GLMForConditionalGeneration
from utils import auto_configure_device_map, engine_from_demo_args, load_model_on_gpus, sampling_options

SHARED = {
    2: {"transformer.embedding.word_embeddings", "transformer.rotary_pos_emb", "transformer.encoder.final_layernorm",
        "transformer.output_layer"},
    1: {"transformer.word_embeddings", "transformer.final_layernorm", "lm_head"},
}
BLOCK = {2: "transformer.encoder.layers.{}", 1: "transformer.layers.{}"}


def meta_model(version: int, **overrides: object) -> torch.nn.Module:
    with torch.device("meta"):
        if version == 2:
            return GLM2ForConditionalGeneration(tiny_v2_config(**overrides))
        return GLMForConditionalGeneration(tiny_v1_config(**overrides))


def assert_covers(model: torch.nn.Module, device_map: dict) -> None:
    """Every key is a module of the model, and every weight and buffer falls under exactly one key."""
    modules = dict(model.named_modules())
    assert set(device_map) <= set(modules), sorted(set(device_map) - set(modules))
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        owners = [key for key in device_map if name.startswith(key + ".")]
        assert len(owners) == 1, f"{name} is placed by {owners}"


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("num_gpus", range(1, 9))
def test_device_map_for_the_real_models(version: int, num_gpus: int) -> None:
    device_map = auto_configure_device_map(num_gpus, version=version)
    layers = [device_map[BLOCK[version].format(i)] for i in range(28)]
    assert set(device_map) == SHARED[version] | {BLOCK[version].format(i) for i in range(28)}
    assert all(device_map[name] == 0 for name in SHARED[version]), "input and output modules belong on GPU 0"
    assert layers == sorted(layers), "consecutive layers stay together"
    assert layers[0] == 0 and max(layers) < num_gpus
    # 30 units (28 blocks + embeddings + output side counted as two), at most ceil(30 / n) per GPU.
    per_gpu = 30 / num_gpus
    counts = [layers.count(gpu) + (2 if gpu == 0 else 0) for gpu in range(num_gpus)]
    assert max(counts) <= math.ceil(per_gpu)
    assert_covers(meta_model(version, num_layers=28), device_map)


@pytest.mark.parametrize("version", [1, 2])
def test_two_gpus_split_as_the_original(version: int) -> None:
    device_map = auto_configure_device_map(2, version=version)
    assert [device_map[BLOCK[version].format(i)] for i in range(28)] == [0] * 13 + [1] * 15


def test_one_gpu_takes_everything_and_eight_use_all() -> None:
    assert set(auto_configure_device_map(1).values()) == {0}
    assert set(auto_configure_device_map(8).values()) == set(range(8))
    # The original's arithmetic leaves the seventh GPU of seven unused (30 units in chunks of 5).
    assert set(auto_configure_device_map(7).values()) == set(range(6))


@pytest.mark.parametrize("version", [1, 2])
def test_prefix_encoder_goes_to_gpu_0(version: int) -> None:
    device_map = auto_configure_device_map(2, version=version, num_layers=2, prefix_encoder=True)
    assert device_map["transformer.prefix_encoder"] == 0
    assert_covers(meta_model(version, pre_seq_len=4), device_map)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_gpus"):
        auto_configure_device_map(0)
    with pytest.raises(ValueError, match="version"):
        auto_configure_device_map(2, version=3)


@pytest.mark.parametrize("version", [1, 2])
def test_dispatch_with_a_cpu_device_map(version: int, tmp_path: Path) -> None:
    config = tiny_v2_config() if version == 2 else tiny_v1_config()
    reference = randomize((GLM2ForConditionalGeneration if version == 2 else GLMForConditionalGeneration)(config))
    reference.eval().save_pretrained(str(tmp_path))
    device_map = {name: "cpu" for name in auto_configure_device_map(2, version=version, num_layers=config.num_layers)}

    model = load_model_on_gpus(tmp_path, device_map=device_map, dtype="float32")

    assert model.hf_device_map == device_map  # accelerate placed it by our map
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 150 if version == 1 else 11, 154 if version == 1 else 12]])
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = model(input_ids).logits
    torch.testing.assert_close(actual, expected)


def test_dispatched_embedded_model_chats() -> None:
    device_map = {name: "cpu" for name in auto_configure_device_map(2, version=2, num_layers=4)}
    model = load_model_on_gpus(EMBEDDED_MODEL, device_map=device_map, dtype="float32")
    from chatglm import ChatGLMTokenizer

    engine = ChatEngine(model, ChatGLMTokenizer.from_pretrained(str(EMBEDDED_MODEL)))
    response, history = engine.chat("你好", max_length=48)
    assert history[-1][0] == "你好" and isinstance(response, str)


def test_incomplete_device_map_is_refused() -> None:
    device_map = {name: "cpu" for name in auto_configure_device_map(2, version=2, num_layers=4)}
    del device_map["transformer.encoder.layers.3"]
    with pytest.raises(ValueError, match="transformer.encoder.layers.3"):
        load_model_on_gpus(EMBEDDED_MODEL, device_map=device_map, dtype="float32")


def test_more_gpus_than_visible_is_explained() -> None:
    visible = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"{visible} CUDA GPU"):
        load_model_on_gpus(EMBEDDED_MODEL, num_gpus=visible + 2)


def test_demo_args_with_one_gpu_use_the_plain_engine() -> None:
    args = argparse.Namespace(model=None, device="cpu", dtype="float32", quantize=None, num_gpus=1)
    engine = engine_from_demo_args(args)
    assert engine.is_demo_model and engine.version == 2


def test_sampling_options_from_slider_values() -> None:
    assert sampling_options(8192.0, 0.8, 0.95) == {"max_length": 8192, "top_p": 0.8, "temperature": 0.95}
    greedy = sampling_options(100, 0.0, 0.0)
    assert greedy == {"max_length": 100, "top_p": 0.01, "do_sample": False}
    assert sampling_options(0, 1.0, 1.0)["max_length"] == 1
