"""End-to-end CPU benchmark of the real models at full 6B size with random weights: bf16 vs int8 vs int4.

For each (model, weights) pair a fresh subprocess builds the model on the meta device, fills it in place
with random values (no 12 GB file is needed; quantized layers get random packed bytes directly), then runs
greedy generation through ``chatglm.generation.generate_tokens``: a 512-token prompt (prefill) and 128
new tokens (decode, batch 1, KV cache), never stopping at EOS. Reported per row: build time, peak RSS, prefill
tokens/s, decode tokens/s, bytes read per generated token (every weight once, the KV cache, one embedding
row), the bound that the measured memory bandwidth implies, and the ratio to the bf16 row of the same run.

    python bench/bench_decode.py                      # ChatGLM2-6B: bf16, int8, int4
    python bench/bench_decode.py --model v1 v2 --weights int4
    python bench/bench_decode.py --prompt 128 --new 32 --weights int4   # quicker

Slow (minutes; the bf16 rows need ~13 GB of RAM) and never part of the test run. Disk loading and
quantize-on-load memory are measured by bench/bench_load.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
from _common import (
    SHAPES,
    busy_warning,
    machine_line,
    measure_bandwidth,
    peak_rss_gb,
    print_table,
    wait_idle,
)

WEIGHTS = ("bf16", "int8", "int4")


def build_random_model(version: str, weights: str, dtype: torch.dtype):
    """The real model class at full size, random weights, quantized layers filled with random packed bytes."""
    import chatglm
    from chatglm.quantization import QuantizedLinear, quantize_model

    config = chatglm.ChatGLMConfig(version=1) if version == "v1" else chatglm.ChatGLMConfig()
    cls = chatglm.GLMForConditionalGeneration if version == "v1" else chatglm.GLM2ForConditionalGeneration
    with torch.device("meta"):
        model = cls(config)
    if weights != "bf16":
        quantize_model(model, int(weights[3:]), empty_init=True)
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if p.dtype == torch.int8:
                t = torch.randint(-128, 128, p.shape, dtype=torch.int8, generator=gen)
            elif pname == "weight_scale":
                # |q| <= 7 (int4) or 127 (int8): scales that give weights of about +-0.02, like the real ones
                qmax = 7 if module.bits == 4 else 127
                t = torch.rand(p.shape, generator=gen, dtype=dtype).mul_(0.04 / qmax)
            elif "layernorm" in name or "norm" in pname:
                t = torch.ones(p.shape, dtype=dtype)
            else:
                t = torch.randn(p.shape, generator=gen, dtype=dtype).mul_(0.02)  # no fp32 temporary
            module._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.is_meta and hasattr(module, "reset_buffers"):
                module.reset_buffers(torch.device("cpu"))
        if isinstance(module, QuantizedLinear):
            module.post_load()
    if hasattr(model, "tie_lm_head"):
        model.tie_lm_head()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"still on meta: {leftover[:5]}")
    return model.eval()


def bytes_per_token(model: torch.nn.Module, kv_bytes: int) -> int:
    """Bytes a decode step must read: every parameter once except the embedding table (one row), plus the KV
    cache. (A tied LM head is the embedding table, read once as the head.)"""
    seen: set[int] = set()
    total = 0
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p is emb and not tied:
            total += p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total + kv_bytes


def run_one(version: str, weights: str, prompt: int, new: int, threads: int | None) -> dict:
    from chatglm.generation import SamplingParams, generate_tokens

    if threads:
        torch.set_num_threads(threads)
    dtype = torch.bfloat16
    # This VM's memory bandwidth drifts by +-30 % over minutes, so each row measures its own (median of 5
    # passes) before building the model and after freeing it (never adding to the row's peak RSS); its bound
    # uses the better of the two.
    wait_idle(120)
    bandwidth = measure_bandwidth(statistic="median")
    t0 = time.perf_counter()
    model = build_random_model(version, weights, dtype)
    build_s = time.perf_counter() - t0
    config = model.config
    ids = torch.randint(5, 20000, (1, prompt))
    if version == "v1":  # the prompt of a ChatGLM-6B query ends with [gMASK] <sop>
        ids[0, -2] = config.gmask_token_id
        ids[0, -1] = config.bos_token_id
    wait_idle(120)
    times = []
    t = time.perf_counter()
    cache = None
    for step in generate_tokens(model, ids, params=SamplingParams(do_sample=False), max_new_tokens=new + 1):
        now = time.perf_counter()
        times.append(now - t)
        t = now
        cache = step.cache
    prefill_s, decode = times[0], times[1:]
    kv = 0
    if cache is not None:
        for layer in getattr(cache, "layers", []):
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if tensor is not None:
                    kv += tensor.numel() * tensor.element_size()
    kv_mid = kv // 2 + kv * prompt // (2 * (prompt + new))  # average over the decode steps, roughly
    result_bytes = bytes_per_token(model, kv_mid)
    peak = peak_rss_gb()
    del model, cache, step
    gc.collect()
    bandwidth = max(bandwidth, measure_bandwidth(statistic="median"))
    return {
        "build_s": build_s,
        "peak_rss_gb": peak,
        "prefill_tps": prompt / prefill_s,
        "decode_tps": len(decode) / sum(decode),
        "decode_ms_median": 1e3 * sorted(decode)[len(decode) // 2],
        "bytes_per_token": result_bytes,
        "bandwidth_gbs": bandwidth,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", choices=sorted(SHAPES), default=["v2"])
    ap.add_argument("--weights", nargs="+", choices=WEIGHTS, default=list(WEIGHTS))
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = ap.parse_args()

    if args.one:
        version, weights = args.one.split(":")
        print(json.dumps(run_one(version, weights, args.prompt, args.new, args.threads)))
        return

    print(f"# {machine_line()}")
    if (note := busy_warning()):
        print(note)
    wait_idle(120)
    bw = measure_bandwidth()
    print(f"measured read bandwidth: {bw:.1f} GB/s (torch sum over 1 GiB, best of 5); each row measures its own "
          f"(median of 5, before and after its run, the better one) for its bound")
    gc.collect()
    for version in args.model:
        results = {}
        for weights in args.weights:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{version}:{weights}", "--prompt",
                   str(args.prompt), "--new", str(args.new)] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{version} {weights}: failed\n{out.stderr[-3000:]}")
                continue
            results[weights] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results.get("bf16")
        rows = []
        for weights, r in results.items():
            bound = r["bandwidth_gbs"] * 1e9 / r["bytes_per_token"]
            rows.append([
                weights, f"{r['build_s']:.1f}", f"{r['peak_rss_gb']:.2f}", f"{r['prefill_tps']:.1f}",
                f"{r['decode_tps']:.2f}", f"{r['decode_ms_median']:.0f}", f"{r['bytes_per_token'] / 1e9:.2f}",
                f"{r['bandwidth_gbs']:.1f}", f"{bound:.2f}", f"{100 * r['decode_tps'] / bound:.0f}%",
                "-" if base is None else f"{r['decode_tps'] / base['decode_tps']:.2f}x / "
                                         f"{r['prefill_tps'] / base['prefill_tps']:.2f}x",
            ])
        print(f"\n## {SHAPES[version].name}, prompt {args.prompt} tokens, {args.new} new tokens, batch 1, "
              f"bf16 activations")
        print_table(["weights", "build s (random, in RAM)", "peak RSS GB", "prefill tok/s", "decode tok/s",
                     "median ms/token", "GB read/token", "GB/s (row)", "bound tok/s", "of bound",
                     "vs bf16 (decode / prefill)"], rows)


if __name__ == "__main__":
    main()
