"""Weight-only int4/int8 quantization: the official format bit for bit, every kernel against the reference,
module swapping, empty (meta) init, quantize-on-load, and the compiler-failure fallback. No timing asserts."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chatglm.quantization as Q
from chatglm.quantization import cpu_kernel, kernels
from chatglm.quantization.format import compute_scale, quantize_weight_torch


@pytest.fixture(autouse=True)
def _default_kernel(monkeypatch):
    monkeypatch.delenv(Q.KERNEL_ENV, raising=False)
    Q.set_kernel(None)
    Q.set_num_threads(None)
    yield
    Q.set_kernel(None)
    Q.set_num_threads(None)


def reference(module: Q.QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """Dequantize then F.linear, in x's dtype: the definition every kernel must match."""
    w = Q.dequantize_weight(module.weight, module.weight_scale, module.bits, dtype=x.dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.linear(x, w, bias)


def activation_error_bound(module: Q.QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The most the C kernel's fused path may differ from `reference` on top of float rounding: it rounds each
    activation to int8 in blocks of `activation_block()` columns, moving it by at most half a step (block
    max |x| / 254), and every such move is multiplied by |w| of its column. Returns [rows, out_features]."""
    block = cpu_kernel.activation_block()
    rows, k = x.shape
    amax = F.pad(x.float().abs(), (0, (-k) % block)).view(rows, -1, block).amax(-1)
    half_step = (amax / 254).repeat_interleave(block, dim=1)[:, :k]
    w = Q.dequantize_weight(module.weight, module.weight_scale, module.bits, dtype=torch.float32)
    return half_step @ w.abs().t()


def fused_path(name: str, module: Q.QuantizedLinear, x: torch.Tensor) -> bool:
    return name == "cpu" and x.shape[0] < kernels.PREFILL_MIN_ROWS[module.bits]


def assert_close_to_reference(module: Q.QuantizedLinear, x: torch.Tensor, got: torch.Tensor, atol: float) -> None:
    """`got` (from the default kernel) equals the reference within atol, plus the int8-activation bound
    when the default kernel is the C kernel's fused path."""
    want = reference(module, x).float()
    tol = torch.full_like(want, atol)
    name = "cpu" if kernels.select_kernel(module, x) is kernels.cpu_linear else "other"
    if fused_path(name, module, x):
        tol += activation_error_bound(module, x)
    err = (got.float().reshape(want.shape) - want).abs()
    assert (err <= tol).all(), f"{(err - tol).max()} over the tolerance"


def original_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original recipe written out literally (fp16 ops, then the compression rule byte by byte)."""
    scale = weight.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)
    q = torch.round(weight / scale[:, None]).to(torch.int8)
    if bits == 8:
        return q, scale
    rows = []
    for row in q.tolist():
        packed = []
        for j in range(0, len(row), 2):
            byte = ((row[j] << 4) | (row[j + 1] & 0x0F)) & 0xFF
            packed.append(byte - 256 if byte > 127 else byte)
        rows.append(packed)
    return torch.tensor(rows, dtype=torch.int8), scale


# --------------------------------------------------------------------------------------------- format


def test_pack_int4_hand_made():
    # columns (-8, 7) -> 0x87, (-1, 0) -> 0xF0, (3, -3) -> 0x3D: high nibble = even column, both signed
    q = torch.tensor([[-8, 7, -1, 0, 3, -3], [0, -1, 1, -8, 7, 7]], dtype=torch.int8)
    packed = Q.pack_int4(q)
    assert packed.dtype == torch.int8
    assert packed.tolist() == [[0x87 - 256, 0xF0 - 256, 0x3D], [0x0F, 0x18, 0x77]]
    assert torch.equal(Q.unpack_int4(packed), q)


def test_unpack_covers_every_byte():
    every = torch.arange(-128, 128, dtype=torch.int8).view(1, -1)
    q = Q.unpack_int4(every)
    assert q.shape == (1, 512)
    assert int(q.min()) == -8 and int(q.max()) == 7
    assert torch.equal(Q.pack_int4(q), every)
    # byte 0x12 = 18 holds (1, 2); byte 0xE9 = -23 holds (-2, -7)
    assert Q.unpack_int4(torch.tensor([[18, -23]], dtype=torch.int8)).tolist() == [[1, 2, -2, -7]]


def test_quantize_fp16_rounds_in_fp16_like_the_original():
    # 0.231689453125 / 0.0926513671875 = 2.50066 in fp32, which fp16 rounds to 2.5, and round-half-even gives
    # 2 (an fp32 computation would give 3). The official tensors come from fp16 ops, so 2 it is.
    w = torch.tensor([[0.6484375, 0.231689453125]], dtype=torch.float16)
    q, scale = Q.quantize_weight(w, 4)
    assert scale.dtype == torch.float16 and scale.item() == 0.0926513671875
    assert Q.unpack_int4(q).tolist() == [[7, 2]]
    assert q.tolist() == [[0x72]]


@pytest.mark.parametrize("impl", ["default", "torch"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_matches_original_recipe_bit_for_bit(bits, impl):
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(67, 96, generator=g) * 0.05).half()
    w[3] = 0.0  # an all-zero row: scale 0, q 0 (the original would produce NaN -> undefined int8)
    w[5, 7] = 3.0  # an outlier
    q, scale = Q.quantize_weight(w, bits) if impl == "default" else quantize_weight_torch(w, bits)
    q_ref, scale_ref = original_quantize(w, bits)
    assert q.shape == (67, 96 * bits // 8) and q.dtype == torch.int8
    assert torch.equal(scale, scale_ref)
    rows = [i for i in range(67) if i != 3]
    assert torch.equal(q[rows], q_ref[rows])
    assert torch.count_nonzero(q[3]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_error_bound(bits, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 130, generator=g).to(dtype)
    q, scale = Q.quantize_weight(w, bits)
    assert scale.dtype == dtype and scale.shape == (33,)
    values = Q.unpack_weight(q, bits)
    qmax = 2 ** (bits - 1) - 1
    assert int(values.abs().max()) <= qmax
    deq = Q.dequantize_weight(q, scale, bits, dtype=torch.float32)
    err = (deq - w.float()).abs()
    # half a quantization step, plus the rounding of the quotient in a 16-bit dtype
    slack = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert torch.all(err <= scale.float()[:, None] * (0.5 + slack * qmax) + 1e-7)


@pytest.mark.skipif(cpu_kernel.compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_c_quantizer_equals_torch_quantizer(bits, dtype):
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(301, 4096 + 66, generator=g) * 0.03).to(dtype)
    w[0] = 0
    w[1, :3] = torch.tensor([1e-6, -2.0, 0.5]).to(dtype)
    q_c, s_c = cpu_kernel.quantize(w, bits)
    q_t, s_t = quantize_weight_torch(w, bits)
    assert torch.equal(s_c, s_t)
    assert torch.equal(q_c, q_t)


def test_scale_is_fp32_reciprocal_product():
    w = torch.randn(16, 32)
    s = compute_scale(w, 4)
    inv = torch.ones((), dtype=torch.float32) / 7
    assert torch.equal(s, w.abs().amax(-1) * inv)


def test_bits_validation():
    with pytest.raises(ValueError):
        Q.quantize_weight(torch.randn(4, 4), 3)
    with pytest.raises(ValueError):
        Q.QuantizedLinear(8, 4, bits=2)
    with pytest.raises(ValueError):
        Q.quantize_model(nn.Sequential(), 16)
    with pytest.raises(ValueError):
        Q.quantize_weight(torch.randn(4, 5), 4)  # odd column count cannot be packed


# --------------------------------------------------------------------------------------------- kernels


def _kernels_here(bits: int, device: str = "cpu") -> list[str]:
    module = Q.QuantizedLinear(64, 8, bits, dtype=torch.float32, device=device)
    with torch.no_grad():
        module.load_float_weight(torch.randn(8, 64, device=device))
    return Q.available_kernels(module, torch.randn(2, 64, device=device))


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_kernels_are_available(bits):
    names = _kernels_here(bits)
    assert "torch" in names
    if cpu_kernel.compiler() is not None:
        assert "cpu" in names  # the C kernel builds on this machine


SHAPES = [(37, 200), (33, 136), (64, 256), (5, 4096 + 66)]  # odd row counts, K % 64 != 0, K > one block
ROWS = [1, 3, 33]  # decode, a few tokens, and the prefill path (>= PREFILL_MIN_ROWS)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_matches_reference(bits, dtype):
    g = torch.Generator().manual_seed(1)
    for n, k in SHAPES:
        linear = nn.Linear(k, n, bias=(n % 2 == 1)).to(dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        module = Q.QuantizedLinear.from_linear(linear, bits)
        for m in ROWS:
            x = torch.randn(m, k, generator=g).to(dtype)
            want = reference(module, x).float()
            for name in Q.available_kernels(module, x):
                Q.set_kernel(name)
                got = module(x)
                assert got.dtype == dtype and got.shape == (m, n)
                tol = (2e-4 if dtype == torch.float32 else 3e-2) * want.abs().max() + 1e-6
                if fused_path(name, module, x):
                    tol = tol + activation_error_bound(module, x)
                err = (got.float() - want).abs()
                assert (err <= tol).all(), f"{name} int{bits} {dtype} {(m, n, k)}: {(err - tol).max()} over"
            Q.set_kernel(None)


def test_leading_dims_and_fp16_input():
    module = Q.QuantizedLinear.from_linear(nn.Linear(128, 24), 4)
    x = torch.randn(2, 3, 128)
    assert module(x).shape == (2, 3, 24)
    assert_close_to_reference(module, x.reshape(6, 128), module(x), atol=1e-4)
    xh = x.half()
    y = module(xh)
    assert y.dtype == torch.float16
    assert_close_to_reference(module, xh.reshape(6, 128), y, atol=2e-2)
    assert module(torch.randn(0, 128)).shape == (0, 24)


@pytest.mark.skipif(cpu_kernel.compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_kernel_thread_count_and_every_isa(bits):
    k = 4096 + 64 + 6  # several activation blocks, whole vector steps and a ragged tail
    module = Q.QuantizedLinear.from_linear(nn.Linear(k, 301), bits)
    x = torch.randn(2, k)
    Q.set_kernel("cpu")
    Q.set_num_threads(1)
    one = module(x)
    Q.set_num_threads(2)
    two = module(x)
    assert torch.equal(one, two)  # each output is computed by one thread in a fixed order
    assert ((one - reference(module, x)).abs() <= activation_error_bound(module, x) + 1e-4).all()
    lib = cpu_kernel.load()
    assert lib is not None
    best = lib.cglm_isa()
    try:
        for isa in range(best + 1):  # portable C, AVX2, AVX512-VNNI: whatever this CPU can run
            lib.cglm_force_isa(isa)
            assert lib.cglm_isa() == isa
            torch.testing.assert_close(module(x), one, atol=1e-4, rtol=1e-4)
    finally:
        lib.cglm_force_isa(-1)


def test_gradient_flows_to_the_input():
    module = Q.QuantizedLinear.from_linear(nn.Linear(64, 8), 4)
    x = torch.randn(3, 64, requires_grad=True)
    module(x).sum().backward()
    w = Q.dequantize_weight(module.weight, module.weight_scale, 4)
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, -1))
    assert not any(p.requires_grad for p in module.parameters())


def test_nan_input_propagates():
    module = Q.QuantizedLinear.from_linear(nn.Linear(64, 8), 4)
    x = torch.randn(1, 64)
    x[0, 5] = float("nan")
    for name in Q.available_kernels(module, x):
        Q.set_kernel(name)
        assert torch.isnan(module(x)).all(), name


def test_forced_kernel_env(monkeypatch):
    monkeypatch.setenv(Q.KERNEL_ENV, "torch")
    assert Q.get_kernel() == "torch"
    module = Q.QuantizedLinear.from_linear(nn.Linear(64, 8), 8)
    x = torch.randn(1, 64)
    assert torch.equal(module(x), reference(module, x))
    monkeypatch.setenv(Q.KERNEL_ENV, "bogus")
    with pytest.raises(ValueError):
        Q.get_kernel()
    with pytest.raises(ValueError):
        Q.set_kernel("bogus")
    monkeypatch.setenv(Q.KERNEL_ENV, "cuda")
    with pytest.raises(RuntimeError):  # forced kernel that cannot run a CPU tensor: loud, not silent
        module(x)


def test_compile_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATGLM_KERNEL_CC", str(tmp_path / "no-such-gcc"))
    monkeypatch.setenv("CHATGLM_KERNEL_CACHE", str(tmp_path / "cache"))  # no cached library to fall back on
    cpu_kernel.reset()
    try:
        x = torch.randn(3, 64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = Q.QuantizedLinear.from_linear(nn.Linear(64, 8), 4)  # quantizing tries the C kernel too
            first = module(x)
            second = module(x)
        relevant = [w for w in caught if "C CPU kernel" in str(w.message)]
        assert len(relevant) == 1 and issubclass(relevant[0].category, RuntimeWarning)
        assert "cpu" not in Q.available_kernels(module, x)
        torch.testing.assert_close(first, reference(module, x), atol=1e-5, rtol=1e-5)
        assert torch.equal(first, second)
    finally:
        monkeypatch.undo()
        cpu_kernel.reset()


def test_import_loads_no_cuda_and_compiles_nothing():
    code = (
        "import sys, chatglm.quantization as Q\n"
        "assert 'cpm_kernels' not in sys.modules\n"
        "assert not Q.cpu_kernel._state['tried']\n"
        "import torch; assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- modules


def test_quantized_linear_layout_and_state_dict():
    module = Q.QuantizedLinear.from_linear(nn.Linear(96, 10).to(torch.float16), 4)
    sd = module.state_dict()
    assert list(sd) == ["weight", "weight_scale", "bias"]
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (10, 48)
    assert sd["weight_scale"].dtype == torch.float16 and sd["weight_scale"].shape == (10,)
    assert sd["bias"].dtype == torch.float16
    assert not any(p.requires_grad for p in module.parameters())
    assert (module.in_features, module.out_features, module.bits) == (96, 10, 4)
    clone = copy.deepcopy(module)  # kernel caches (weak references) must not break copying
    x = torch.randn(2, 96)
    torch.testing.assert_close(clone(x), module(x))


def test_load_float_weight_equals_from_linear():
    linear = nn.Linear(128, 20).to(torch.float16)
    built = Q.QuantizedLinear.from_linear(linear, 4)
    empty = Q.QuantizedLinear(128, 20, 4, bias=True, dtype=torch.float16, device="meta")
    empty._parameters["bias"] = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    empty.load_float_weight(linear.weight.detach())
    for name in ("weight", "weight_scale", "bias"):
        assert torch.equal(getattr(empty, name), getattr(built, name))
    with pytest.raises(ValueError):
        empty.load_float_weight(torch.randn(20, 64))


def test_cache_follows_replaced_and_modified_tensors():
    module = Q.QuantizedLinear.from_linear(nn.Linear(64, 8), 8)
    x = torch.randn(1, 64)
    before = module(x)
    other = Q.QuantizedLinear.from_linear(nn.Linear(64, 8), 8)
    module.load_state_dict(other.state_dict())  # in-place copies: version counters move
    torch.testing.assert_close(module(x), other(x))
    # the loader's way: replace the Parameter objects, then post_load (or not)
    for name in ("weight", "weight_scale", "bias"):
        module._parameters[name] = nn.Parameter(getattr(other, name).detach().clone() * (2 if name == "bias" else 1),
                                                requires_grad=False)
    assert not torch.allclose(module(x), before)
    assert_close_to_reference(module, x, module(x), atol=1e-4)


class _Block(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.self_attention = nn.Module()
        self.self_attention.query_key_value = nn.Linear(h, 3 * h)
        self.self_attention.dense = nn.Linear(h, h, bias=False)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = nn.Linear(h, 4 * h, bias=False)
        self.mlp.dense_4h_to_h = nn.Linear(4 * h, h, bias=False)
        self.mlp.other = nn.Linear(h, h)


class _Toy(nn.Module):
    def __init__(self, h: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.embedding = nn.Embedding(50, h)
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(_Block(h) for _ in range(layers))
        self.transformer.dense = nn.Linear(h, h)  # right leaf name, but not inside a block
        self.transformer.output_layer = nn.Linear(h, 50, bias=False)


def test_quantize_model_swaps_exactly_the_four_block_linears():
    model = _Toy()
    Q.quantize_model(model, 4)
    swapped = sorted(n for n, m in model.named_modules() if isinstance(m, Q.QuantizedLinear))
    expected = sorted(f"transformer.encoder.layers.{i}.{leaf}" for i in range(2) for leaf in (
        "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
    assert swapped == expected
    assert type(model.transformer.dense) is nn.Linear
    assert type(model.transformer.output_layer) is nn.Linear
    assert type(model.transformer.encoder.layers[0].mlp.other) is nn.Linear
    Q.quantize_model(model, 4)  # idempotent
    with pytest.raises(ValueError):
        Q.quantize_model(model, 8)
    custom = Q.quantize_model(_Toy(), 8, module_filter=lambda name, m: name.endswith("output_layer"))
    assert [n for n, m in custom.named_modules() if isinstance(m, Q.QuantizedLinear)] == ["transformer.output_layer"]


def test_empty_init_on_meta_then_load():
    source = Q.quantize_model(_Toy(), 4)
    with torch.device("meta"):
        model = _Toy()
    Q.quantize_model(model, 4, empty_init=True)
    qkv = model.transformer.encoder.layers[0].self_attention.query_key_value
    assert isinstance(qkv, Q.QuantizedLinear) and qkv.weight.is_meta
    assert qkv.weight.shape == (96, 16) and qkv.weight.dtype == torch.int8 and qkv.bias is not None
    # load the way the streaming loader does: replace each parameter, then call post_load
    for name, tensor in source.state_dict().items():
        module_name, _, attr = name.rpartition(".")
        sub = model.get_submodule(module_name)
        sub._parameters[attr] = nn.Parameter(tensor.clone(), requires_grad=tensor.is_floating_point())
    for m in model.modules():
        if isinstance(m, Q.QuantizedLinear):
            m.post_load()
    x = torch.randn(3, 32)
    src_qkv = source.transformer.encoder.layers[0].self_attention.query_key_value
    torch.testing.assert_close(qkv(x), src_qkv(x))


def test_tiny_glm_models_quantize():
    import chatglm

    configs = [
        dict(num_layers=2, padded_vocab_size=160, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
             num_attention_heads=4, multi_query_group_num=2, seq_length=64),
        dict(version=1, num_layers=2, vocab_size=160, hidden_size=64, inner_hidden_size=128,
             num_attention_heads=4, max_sequence_length=64, mask_token_id=150, gmask_token_id=151,
             bos_token_id=154, eos_token_id=155, pad_token_id=3),
    ]
    for fields in configs:
        config = chatglm.ChatGLMConfig(**fields)
        cls = chatglm.GLMForConditionalGeneration if config.version == 1 else chatglm.GLM2ForConditionalGeneration
        torch.manual_seed(0)
        model = cls(config).eval()
        ids = torch.tensor([[5, 6, 7, 150, 151, 154, 9]]) if config.version == 1 else torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            want = model(input_ids=ids).logits
        Q.quantize_model(model, 8)
        n = sum(isinstance(m, Q.QuantizedLinear) for m in model.modules())
        assert n == 4 * config.num_layers
        with torch.no_grad():
            got = model(input_ids=ids).logits
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 0.05 * want.abs().max() + 1e-3


def _fp32_model_and_sequence(version: int):
    """An fp32 model and a token sequence [1, n] whose positions from `start` on are answer positions."""
    import chatglm
    from chatglm.generation import SamplingParams, generate
    from conftest import EMBEDDED_MODEL, randomize, tiny_v1_config

    if version == 2:  # the trained demo model: real weight statistics, a real chat prompt and its answer
        model = chatglm.GLM2ForConditionalGeneration.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()
        prompt = chatglm.ChatGLMTokenizer.from_pretrained(EMBEDDED_MODEL).build_chat_input("你好，介绍一下你自己")
        prompt = prompt["input_ids"]
        answer = generate(model, prompt, params=SamplingParams(do_sample=False), max_new_tokens=24)
    else:  # random weights small enough that the network is not chaotic; teacher-forced random "answer"
        model = randomize(chatglm.GLMForConditionalGeneration(tiny_v1_config()), std=0.1).eval()
        prompt = torch.tensor([[5, 6, 7, 8, 9, 151, 154]])
        answer = torch.randint(5, 150, (1, 24), generator=torch.Generator().manual_seed(0))
    return model, torch.cat([prompt, answer], dim=1), prompt.shape[1]


# Measured on these models: int8 logits within 0.3-0.4 % of the largest fp32 logit, int4 within 3-8 %
# (per-row int4 weights are coarse); the C kernel's int8 activations add < 1 % to the reference kernel's.
@pytest.mark.parametrize("bits, tolerance", [(8, 0.02), (4, 0.2)])
@pytest.mark.parametrize("version", [1, 2])
def test_quantized_models_stay_close_to_fp32_and_pass_the_top5_rule(version, bits, tolerance):
    from chatglm.generation import SamplingParams, generate

    fp32, sequence, start = _fp32_model_and_sequence(version)
    quantized = copy.deepcopy(fp32).quantize(bits)
    with torch.no_grad():
        want = fp32(input_ids=sequence).logits[0]
        got = quantized(input_ids=sequence).logits[0]
        last = quantized(input_ids=sequence[:, :start]).logits[0, -1]  # few rows: the fused decode path
        Q.set_kernel("torch")
        reference_got = quantized(input_ids=sequence).logits[0]
        reference_last = quantized(input_ids=sequence[:, :start]).logits[0, -1]
        Q.set_kernel(None)
    scale = want.abs().max()
    assert (got - want).abs().max() <= tolerance * scale
    assert (got - reference_got).abs().max() <= 0.02 * scale
    assert (last - reference_last).abs().max() <= 0.02 * scale
    # The top-k rule at every answer position: each side's choice is in the other's top 5.
    answer_want, answer_got = want[start - 1 : -1], got[start - 1 : -1]
    assert len(set(answer_want.argmax(-1).tolist())) > 1, "the comparison needs varying predictions"
    assert (answer_want.topk(5).indices == answer_got.argmax(-1, keepdim=True)).any(-1).all()
    assert (answer_got.topk(5).indices == answer_want.argmax(-1, keepdim=True)).any(-1).all()
    if version == 2:  # and free-running greedy decoding: the first difference obeys the same rule
        greedy = SamplingParams(do_sample=False)
        prompt = sequence[:, :start]
        ours = generate(quantized, prompt, params=greedy, max_new_tokens=24)[0].tolist()
        theirs = sequence[0, start:].tolist()
        for i, (x, y) in enumerate(zip(theirs, ours)):
            if x != y:
                prefix = sequence[:, : start + i]
                with torch.no_grad():
                    top_fp32 = fp32(input_ids=prefix).logits[0, -1].topk(5).indices.tolist()
                    top_quantized = quantized(input_ids=prefix).logits[0, -1].topk(5).indices.tolist()
                assert y in top_fp32 and x in top_quantized, (i, x, y)
                break


# ------------------------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matches_reference(bits, dtype):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(4096 + 66, 77).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(77, 4096 + 66, generator=g) * 0.05)
    module = Q.QuantizedLinear.from_linear(linear, bits).cuda()
    for m in (1, 33):
        x = torch.randn(m, 4096 + 66, generator=g).to(dtype).cuda()
        want = reference(module, x).float()
        got = module(x)
        assert got.dtype == dtype and got.is_cuda
        tol = (1e-3 if dtype == torch.float32 else 3e-2) * want.abs().max().item()
        assert (got.float() - want).abs().max().item() <= tol


@cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_extraction_is_exact(bits):
    from chatglm.quantization.cuda_kernel import dequantize_cuda, status

    q = torch.randint(-128, 128, (129, 70), dtype=torch.int8, device="cuda")
    s = torch.rand(129, device="cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert torch.equal(dequantize_cuda(q, s, bits, dtype), Q.dequantize_weight(q, s, bits, dtype=dtype))
    print("cuda extraction:", status())


@cuda
def test_cuda_quantize_matches_cpu():
    w = (torch.randn(64, 256) * 0.05).half()
    for bits in (4, 8):
        q_cpu, s_cpu = Q.quantize_weight(w, bits)
        q_gpu, s_gpu = Q.quantize_weight(w.cuda(), bits)
        assert torch.equal(q_cpu, q_gpu.cpu()) and torch.equal(s_cpu, s_gpu.cpu())
