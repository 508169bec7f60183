"""Matmul-level benchmark of the quantized kernels on the full 6B Linear shapes (no model code involved).

A stack of 28 blocks with the real QKV / dense / MLP shapes is filled with random packed weights, and one
"token" runs the 112 quantized Linear layers in sequence plus the float LM head, as decoding does; a 512-row
input stands in for prefill. Every kernel that can run here is timed in the same process next to a bf16
``chatglm.layers.Linear`` baseline (the model's float layer), and the memory-bandwidth bound is printed with it.

    python bench/bench_kernels.py                       # ChatGLM2-6B shapes, int4 and int8, all kernels
    python bench/bench_kernels.py --model v1 --bits 4 --kernels cpu
    python bench/bench_kernels.py --prefill-layers 0    # decode only
    python bench/bench_kernels.py --crossover           # one MLP matrix, every kernel, 1..512 input rows

Slow (about a minute per configuration, more with --kernels torch); never part of the test run.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from _common import (
    SHAPES,
    Shape6B,
    best_time,
    busy_warning,
    machine_line,
    measure_bandwidth,
    print_table,
    wait_idle,
)

import chatglm.quantization as Q
from chatglm.layers import Linear
from chatglm.quantization import cpu_kernel


def random_quantized(out_features: int, in_features: int, bits: int, dtype: torch.dtype) -> Q.QuantizedLinear:
    """A QuantizedLinear holding random packed bytes (every nibble value occurs) and small random scales."""
    m = Q.QuantizedLinear(in_features, out_features, bits, bias=False, dtype=dtype, device="meta")
    m._parameters["weight"] = torch.nn.Parameter(
        torch.randint(-128, 128, (out_features, in_features * bits // 8), dtype=torch.int8), requires_grad=False)
    m._parameters["weight_scale"] = torch.nn.Parameter(torch.rand(out_features).mul_(0.01).to(dtype),
                                                       requires_grad=False)
    m.post_load()
    return m


def random_float(out_features: int, in_features: int, dtype: torch.dtype) -> Linear:
    lin = Linear(in_features, out_features, bias=False, device="meta", dtype=dtype)
    lin.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype).uniform_(-0.02, 0.02),
                                    requires_grad=False)
    return lin


def build_stack(shape: Shape6B, bits: int | None, dtype: torch.dtype, layers: int) -> list[list[torch.nn.Module]]:
    stack = []
    for _ in range(layers):
        if bits is None:
            stack.append([random_float(o, i, dtype) for _, o, i in shape.block_linears()])
        else:
            stack.append([random_quantized(o, i, bits, dtype) for _, o, i in shape.block_linears()])
    return stack


def run_stack(stack: list[list[torch.nn.Module]], inputs: dict[int, torch.Tensor]) -> None:
    with torch.no_grad():
        for block in stack:
            for mod in block:
                mod(inputs[mod.in_features])


def weight_bytes(stack: list[list[torch.nn.Module]]) -> int:
    return sum(p.numel() * p.element_size() for block in stack for m in block for p in m.parameters())


def crossover(shape: Shape6B, bits_list: list[int], dtype: torch.dtype, rows: list[int]) -> None:
    """Time every CPU kernel on the largest matrix (dense_h_to_4h) for growing input row counts: where the
    fused dot-product kernel stops winning is PREFILL_MIN_ROWS."""
    from chatglm.quantization import kernels

    _, n, k = shape.block_linears()[2]
    for bits in bits_list:
        m = random_quantized(n, k, bits, dtype)
        scale, bias = m._f32_scale_and_bias()
        table = []
        for rows_ in rows:
            x = torch.randn(rows_, k, dtype=dtype)
            fns = {
                "cpu fused": lambda: cpu_kernel.qlinear(x, m.weight, scale, bias, bits, n),
                "cpu tiles": lambda: kernels.cpu_linear_tiles(m, x),
                "aten": lambda: kernels.aten_linear(m, x),
            }
            if rows_ > 64:
                del fns["cpu fused"]  # 100x slower there; not a candidate
            wait_idle(60)
            table.append([rows_] + [f"{best_time(fn, repeats=3 if rows_ < 64 else 1) * 1e3:.1f}"
                                    if name in fns else "-" for name, fn in
                                    [(k_, fns.get(k_)) for k_ in ("cpu fused", "cpu tiles", "aten")]])
        print(f"\nint{bits} {n}x{k} ({args_dtype(dtype)} input), ms per call")
        print_table(["rows", "cpu fused", "cpu tiles", "aten"], table)
        del m
        gc.collect()


def args_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="v2")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--kernels", nargs="+", default=["cpu", "aten"], help="quantized kernels to time (torch: slow)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--prefill-layers", type=int, default=2, help="blocks timed for prefill (x28 extrapolated)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the bf16 Linear baseline (11 GB)")
    ap.add_argument("--crossover", action="store_true", help="kernel timings against input row count instead")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.model]
    dtype = getattr(torch, args.dtype)
    print(f"# {shape.name} Linear shapes, {shape.num_layers} blocks; {machine_line()}")
    if (note := busy_warning()):
        print(note)
    if args.crossover:
        crossover(shape, args.bits, dtype, [1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 512])
        return
    wait_idle(120)
    bw = measure_bandwidth()
    print(f"measured read bandwidth: {bw:.1f} GB/s")
    if cpu_kernel.load() is not None:
        print(f"C kernel ISA level: {cpu_kernel.load().cglm_isa()} (0 portable, 1 AVX2)")

    # The float LM head is read for every token whatever the quantization: time it once, add it to every row.
    head = random_float(shape.vocab, shape.hidden, dtype)
    x1 = torch.randn(1, shape.hidden, dtype=dtype)
    head_s = best_time(lambda: head(x1), repeats=5)
    head_bytes = head.weight.numel() * head.weight.element_size()
    print(f"LM head {shape.vocab}x{shape.hidden} {args.dtype}: {head_s * 1e3:.1f} ms "
          f"({head_bytes / head_s / 1e9:.1f} GB/s), included in decode tokens/s below")
    del head
    gc.collect()

    configs: list[tuple[str, int | None]] = []
    if not args.no_baseline:
        configs.append(("torch-" + args.dtype, None))
    for bits in args.bits:
        for k in args.kernels:
            configs.append((k, bits))

    rows = []
    baseline_tps = None
    for kernel, bits in configs:
        label = kernel if bits is None else f"int{bits} {kernel}"
        Q.set_kernel(None if bits is None else kernel)
        t0 = time.perf_counter()
        stack = build_stack(shape, bits, dtype, shape.num_layers)
        build_s = time.perf_counter() - t0
        nbytes = weight_bytes(stack)
        inputs = {k: torch.randn(1, k, dtype=dtype) for k in {shape.hidden, shape.mlp_hidden}}
        try:
            run_stack(stack, inputs)  # first call: builds kernels / repacked layouts
        except RuntimeError as exc:
            print(f"{label}: skipped ({exc})")
            del stack
            gc.collect()
            continue
        wait_idle(60)
        dec_s = best_time(lambda: run_stack(stack, inputs), repeats=args.repeats, warmup=1)
        token_s = dec_s + head_s
        tps = 1.0 / token_s
        bound = bw * 1e9 / (nbytes + head_bytes)
        prefill_tps = float("nan")
        if args.prefill_layers > 0:
            pin = {k: torch.randn(args.prefill_tokens, k, dtype=dtype) for k in {shape.hidden, shape.mlp_hidden}}
            part = stack[: args.prefill_layers]
            pre_s = best_time(lambda: run_stack(part, pin), repeats=1, warmup=1)
            pre_total = pre_s * shape.num_layers / args.prefill_layers
            prefill_tps = args.prefill_tokens / pre_total
        if bits is None:
            baseline_tps = tps
        rows.append([
            label, f"{(nbytes + head_bytes) / 1e9:.2f}", f"{build_s:.1f}", f"{dec_s * 1e3:.1f}",
            f"{nbytes / dec_s / 1e9:.1f}", f"{tps:.2f}", f"{bound:.2f}", f"{100 * tps / bound:.0f}%",
            "-" if baseline_tps is None else f"{tps / baseline_tps:.2f}x", f"{prefill_tps:.1f}",
        ])
        del stack
        gc.collect()
    Q.set_kernel(None)
    print()
    print_table(
        ["weights", "GB read/token", "build s", "blocks ms/token", "blocks GB/s", "decode tok/s (linears+head)",
         "bound tok/s", "of bound", "vs baseline", f"prefill tok/s ({args.prefill_tokens}, linears)"],
        rows,
    )


if __name__ == "__main__":
    main()
