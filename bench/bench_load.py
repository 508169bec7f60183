"""Loading benchmark: time and peak RSS of loading a 6B-shaped checkpoint, float or quantized, from disk.

``write`` creates random checkpoints in the official layout (fp16 ``pytorch_model-0000i-of-0000N.bin``
shards + index, as THUDM ships chatglm2-6b / chatglm-6b; and a single-file int4 checkpoint like
chatglm2-6b-int4), ``run`` loads each case in a fresh subprocess and prints a table:

    python bench/bench_load.py write --dir /tmp/glm6b          # ~12.5 GB fp16 + ~3.9 GB int4 per model
    python bench/bench_load.py run --dir /tmp/glm6b
    python bench/bench_load.py run --dir /tmp/glm6b --cases fp16-int4 int4

Cases: ``fp16-bf16`` (float load, the baseline), ``fp16-int8`` / ``fp16-int4`` (quantize while loading),
``int4`` (the pre-quantized checkpoint). Targets (issue 3): int4 checkpoint <= 4.5 GB peak RSS, fp16 -> int4
on load <= 6 GB. The files are read through the page cache, warm after ``write`` when RAM allows; the first
load after a reboot is slower. Slow, needs disk space; never part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import SHAPES, current_rss_gb, machine_line, peak_rss_gb, print_table

CASES = ("fp16-bf16", "fp16-int8", "fp16-int4", "int4")


def _meta_model(version: str, bits: int = 0):
    import chatglm
    from chatglm.quantization import quantize_model

    config = chatglm.ChatGLMConfig(version=1) if version == "v1" else chatglm.ChatGLMConfig()
    cls = chatglm.GLMForConditionalGeneration if version == "v1" else chatglm.GLM2ForConditionalGeneration
    with torch.device("meta"):
        model = cls(config)
    if bits:
        quantize_model(model, bits, empty_init=True)
    return config, model


def write(folder: Path, version: str, bits: int) -> None:
    from chatglm.loading import official_storage_dtype, write_official_layout

    config, model = _meta_model(version, bits)
    config.quantization_bit = bits
    shapes = {}
    state = model.state_dict(keep_vars=True)
    if version == "v1":  # the published file stores the LM head as its own tensor
        state.setdefault("lm_head.weight", model.get_input_embeddings().weight)
    for key, t in state.items():
        shapes[key] = (tuple(t.shape), official_storage_dtype(key, t.dtype, config.version))
    gen = torch.Generator().manual_seed(0)

    def make(key: str) -> torch.Tensor:
        shape, dtype = shapes[key]
        if dtype == torch.int8:
            return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
        if key.endswith("weight_scale"):
            return torch.rand(shape, generator=gen, dtype=torch.float16).mul_(0.04 / (7 if bits == 4 else 127))
        if "layernorm" in key:
            return torch.ones(shape, dtype=dtype)
        return torch.randn(shape, generator=gen, dtype=torch.float16).mul_(0.02).to(dtype)

    folder.mkdir(parents=True, exist_ok=True)
    config.torch_dtype = "float16"
    config.save_pretrained(str(folder))
    shards = 1 if bits else (7 if version == "v2" else 8)
    t = time.perf_counter()
    write_official_layout(folder, shapes, make, num_shards=shards)
    size = sum(f.stat().st_size for f in folder.glob("pytorch_model*.bin"))
    print(f"wrote {folder} ({size / 1e9:.2f} GB, {shards} shard(s)) in {time.perf_counter() - t:.0f} s")


def load_one(folder: Path, case: str) -> dict:
    from chatglm.loading import load_pretrained

    base_rss = current_rss_gb()  # python + torch + chatglm, before any weight
    t = time.perf_counter()
    if case == "int4":
        model = load_pretrained(folder, dtype=torch.bfloat16)
    else:
        quantize = None if case == "fp16-bf16" else int(case[-1])
        model = load_pretrained(folder, dtype=torch.bfloat16, quantize=quantize)
    load_s = time.perf_counter() - t
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"load_s": load_s, "peak_rss_gb": peak_rss_gb(), "base_rss_gb": base_rss, "params_gb": params / 1e9,
            "after_rss_gb": current_rss_gb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["write", "run", "one"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/chatglm-6b-random"))
    ap.add_argument("--model", nargs="+", choices=sorted(SHAPES), default=["v2"])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.action == "write":
        for version in args.model:
            write(args.dir / f"{version}-fp16", version, 0)
            write(args.dir / f"{version}-int4", version, 4)
        return
    if args.action == "one":
        print(json.dumps(load_one(args.dir, args.case)))
        return

    print(f"# {machine_line()}")
    for version in args.model:
        rows = []
        for case in args.cases:
            folder = args.dir / f"{version}-{'int4' if case == 'int4' else 'fp16'}"
            cmd = [sys.executable, os.path.abspath(__file__), "one", "--dir", str(folder), "--case", case]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{version} {case}: failed\n{out.stderr[-3000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            target = {"int4": 4.5, "fp16-int4": 6.0}.get(case)
            rows.append([case, f"{r['load_s']:.1f}", f"{r['peak_rss_gb']:.2f}",
                         "-" if target is None else f"<= {target}", f"{r['params_gb']:.2f}",
                         f"{r['after_rss_gb']:.2f}", f"{r['base_rss_gb']:.2f}"])
        print(f"\n## {SHAPES[version].name} checkpoint -> bf16 model on CPU")
        print_table(["case", "load s", "peak RSS GB", "target", "model params GB", "RSS after load GB",
                     "RSS before load GB"], rows)


if __name__ == "__main__":
    main()
