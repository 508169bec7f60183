"""Checkpoints in the official layouts load; damaged ones fail with messages naming the file and tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_v1_config, tiny_v2_config, randomize
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from chatglm import ChatGLMConfig, CheckpointError, GLM2ForConditionalGeneration, GLMForConditionalGeneration
from chatglm.loading import official_storage_dtype, write_official_layout


def write_like_thudm(model, folder, num_shards: int, stale_total_size: int | None = None) -> None:
    """Save `model` the way the published repos are laid out: .bin shards, index, config.json."""
    version = model.config.version
    state = model.state_dict()
    shapes = {k: (tuple(v.shape), official_storage_dtype(k, v.dtype, version)) for k, v in state.items()}
    if version == 2:
        # The real chatglm2 shards put the rotary buffer right after the embedding.
        order = ["transformer.embedding.word_embeddings.weight", "transformer.rotary_pos_emb.inv_freq"]
        shapes = {k: shapes[k] for k in order + [k for k in shapes if k not in order]}
    write_official_layout(folder, shapes, lambda key: state[key], num_shards=num_shards, index_total_size=stale_total_size)
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = "float16"
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def v2_checkpoint(tmp_path, tiny_v2):
    folder = tmp_path / "chatglm2-tiny"
    write_like_thudm(tiny_v2, folder, num_shards=7)
    return folder, tiny_v2


@pytest.fixture
def v1_checkpoint(tmp_path, tiny_v1):
    folder = tmp_path / "chatglm-tiny"
    write_like_thudm(tiny_v1, folder, num_shards=8, stale_total_size=13744473856)
    return folder, tiny_v1


def test_v2_official_sharded_layout_loads_exactly(v2_checkpoint):
    folder, original = v2_checkpoint
    assert len(list(folder.glob("pytorch_model-*-of-00007.bin"))) == 7
    model = GLM2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[10, 11, 12, 13]])
    # The checkpoint is fp16, so compare with the original rounded to fp16.
    expected = {k: v.half().float() for k, v in original.state_dict().items() if not k.endswith("inv_freq")}
    for key, value in model.state_dict().items():
        if key in expected:
            assert torch.equal(value, expected[key]), key
    assert torch.isfinite(model(ids).logits).all()
    assert not model.training


def test_v1_quirks_fp32_layernorm_stale_index_and_separate_lm_head(v1_checkpoint):
    folder, original = v1_checkpoint
    shard_one = torch.load(folder / "pytorch_model-00001-of-00008.bin", weights_only=True)
    assert any(v.dtype == torch.float32 for k, v in shard_one.items() if "layernorm" in k)
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    assert index["metadata"]["total_size"] == 13744473856
    assert "lm_head.weight" in index["weight_map"]
    model = GLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    ln = model.transformer.layers[0].input_layernorm.weight
    assert torch.equal(ln, original.transformer.layers[0].input_layernorm.weight.half())


def test_auto_classes_load_without_trust_remote_code(v2_checkpoint, v1_checkpoint):
    for folder, cls in ((v2_checkpoint[0], GLM2ForConditionalGeneration), (v1_checkpoint[0], GLMForConditionalGeneration)):
        assert isinstance(AutoConfig.from_pretrained(folder), ChatGLMConfig)
        assert type(AutoModel.from_pretrained(folder)) is cls
        assert type(AutoModelForCausalLM.from_pretrained(folder)) is cls


def test_fp16_checkpoint_becomes_bf16_on_cpu_by_default(v2_checkpoint):
    model = GLM2ForConditionalGeneration.from_pretrained(v2_checkpoint[0])
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("version", [1, 2])
def test_save_pretrained_round_trips_exactly(tmp_path, version):
    config = tiny_v1_config() if version == 1 else tiny_v2_config()
    cls = GLMForConditionalGeneration if version == 1 else GLM2ForConditionalGeneration
    model = randomize(cls(config)).eval()
    model.save_pretrained(tmp_path, max_shard_size=40_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    again = cls.from_pretrained(tmp_path)
    assert again.dtype == torch.float32
    for (key, a), (key_b, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert key == key_b and torch.equal(a, b), key
    ids = torch.tensor([[10, 11, 151, 154]]) if version == 1 else torch.tensor([[10, 11, 12, 13]])
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_peak_memory_of_loading_is_model_plus_one_shard(v2_checkpoint):
    # The loader builds on meta: nothing is allocated before the first shard is read.
    folder, _ = v2_checkpoint
    with torch.device("meta"):
        empty = GLM2ForConditionalGeneration(ChatGLMConfig.from_pretrained(folder))
    assert all(p.is_meta for p in empty.parameters())


# -- damaged checkpoints -------------------------------------------------------------------------------------------


def test_missing_shard_names_the_file(v2_checkpoint):
    folder, _ = v2_checkpoint
    (folder / "pytorch_model-00003-of-00007.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-00003-of-00007\.bin.*does not exist"):
        GLM2ForConditionalGeneration.from_pretrained(folder)


def test_truncated_shard_names_the_file(v2_checkpoint):
    folder, _ = v2_checkpoint
    shard = folder / "pytorch_model-00002-of-00007.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00007\.bin.*truncated or corrupt"):
        GLM2ForConditionalGeneration.from_pretrained(folder)


def rewrite_shard(folder, name, edit):
    path = folder / name
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_wrong_shape_names_file_key_and_shapes(v2_checkpoint):
    folder, _ = v2_checkpoint
    key = "transformer.embedding.word_embeddings.weight"
    rewrite_shard(folder, "pytorch_model-00001-of-00007.bin", lambda s: s.__setitem__(key, s[key][:100]))
    with pytest.raises(CheckpointError, match=rf"00001-of-00007\.bin: tensor {key} has shape \(100, 64\), expected \(160, 64\)"):
        GLM2ForConditionalGeneration.from_pretrained(folder)


def test_unexpected_key_is_named(v2_checkpoint):
    folder, _ = v2_checkpoint
    rewrite_shard(folder, "pytorch_model-00007-of-00007.bin", lambda s: s.__setitem__("transformer.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"00007-of-00007\.bin: unexpected tensor transformer\.extra\.weight"):
        GLM2ForConditionalGeneration.from_pretrained(folder)


def test_missing_key_is_named(v2_checkpoint):
    folder, _ = v2_checkpoint
    key = "transformer.encoder.final_layernorm.weight"

    def drop(state):
        state.pop(key, None)

    for shard in sorted(folder.glob("pytorch_model-*.bin")):
        rewrite_shard(folder, shard.name, drop)
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][key]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"lacks 1 tensors the model needs: {key}"):
        GLM2ForConditionalGeneration.from_pretrained(folder)


def test_index_listing_a_tensor_the_shard_lacks_is_named(v2_checkpoint):
    folder, _ = v2_checkpoint
    rewrite_shard(folder, "pytorch_model-00004-of-00007.bin", lambda s: s.pop(next(iter(s))))
    with pytest.raises(CheckpointError, match=r"00004-of-00007\.bin: the index lists 1 tensors that the file does not hold"):
        GLM2ForConditionalGeneration.from_pretrained(folder)


def test_folder_without_weights_or_config(tmp_path, v2_checkpoint):
    folder, _ = v2_checkpoint
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(folder / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="holds no weights"):
        GLM2ForConditionalGeneration.from_pretrained(empty)
    (empty / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        GLM2ForConditionalGeneration.from_pretrained(empty)


def test_nonexistent_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a local folder"):
        GLM2ForConditionalGeneration.from_pretrained(tmp_path / "nowhere" / "deeper")


def test_wrong_version_for_the_class(v1_checkpoint):
    with pytest.raises(ValueError, match="needs a ChatGLM2 config"):
        GLM2ForConditionalGeneration.from_pretrained(v1_checkpoint[0])


def test_base_checkpoint_loaded_with_pre_seq_len_gets_a_fresh_trainable_prefix(v2_checkpoint):
    model = GLM2ForConditionalGeneration.from_pretrained(v2_checkpoint[0], dtype=torch.float32, pre_seq_len=4)
    prefix = model.transformer.prefix_encoder
    assert prefix.embedding.weight.shape[0] == 4 and prefix.embedding.weight.dtype == torch.float32
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["transformer.prefix_encoder.embedding.weight"]
    assert torch.isfinite(model(torch.tensor([[10, 11, 12]])).logits).all()
