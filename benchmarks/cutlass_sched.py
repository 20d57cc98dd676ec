"""Kind 40 (csrc/cutlass_gemm.cu) under each scheduler order and tile shape, in one process (issue 5's large-M
bar): the 8B and 70B layers at 2048 and 8192 tokens, torch bf16 beside each shape for the ratio.

    python3 benchmarks/cutlass_sched.py --out $OUT/kernels_sched.json [--models llama3-8b] [--ms 2048,8192]

A setting is raster:swizzle:tile[:kind] (ostq_cutlass_set_sched; raster 0 heuristic, 1 along the weight
rows, 2 along the tokens; swizzle 1/2/4/8; tile 0 = 128 x 128 x 128, 1 = 128 x 256 x 128 (kind 40 only); kind
40 by default, 42 = stream-K with 128 x 128 tiles). The settings of one shape run back to back, the default
first and again last, so drift between them shows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.kernels import LAYERS, act_operands, bench, bench_graph, weight_operands  # noqa: E402
from ostquant_vllm import kernels  # noqa: E402
from ostquant_vllm.kernels import _lib  # noqa: E402

SETTINGS = ["0:1:0", "1:1:0", "2:1:0", "1:4:0", "2:4:0", "2:8:0", "0:1:1", "2:4:1", "0:1:0:42", "0:1:0"]


def timed(fns):
    return min(bench(fns), bench_graph(fns))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="llama3-8b,llama3-70b")
    ap.add_argument("--ms", default="2048,8192")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args()
    lib = _lib.load()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, t0 = [], time.time()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "command": "python3 " + " ".join(sys.argv), "units": {"us": "min of do_bench median, graph mean"},
           "rows": rows}
    for model in args.models.split(","):
        for layer, K, N in LAYERS[model]:
            w, wps, wsum, ws, wbf = weight_operands(N, K, gen)
            del w
            for M in (int(m) for m in args.ms.split(",")):
                a, s, z = act_operands(M, K, 4, gen)
                x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
                bf = timed([lambda wb=wb: torch.matmul(x, wb.T) for wb in wbf])
                for setting in args.settings.split(","):
                    r, sw, tile, kind = ([int(v) for v in setting.split(":")] + [40])[:4]
                    lib.ostq_cutlass_set_sched(r, sw, tile)
                    fns = [lambda wp=wp: kernels._gemm_cuda(a, s, z, wp, ws, wsum, torch.bfloat16, force=kind)
                           for wp in wps]
                    us = timed(fns)
                    row = {"model": model, "layer": layer, "M": M, "N": N, "K": K, "setting": setting,
                           "us": round(us, 3), "tops": round(2 * M * N * K / us / 1e6, 1),
                           "torch_bf16_us": round(bf, 3), "x_bf16": round(bf / us, 3)}
                    rows.append(row)
                    print(f"{model} {layer:8s} M={M:5d} {setting}  {us:9.2f} us  {row['tops']:7.1f} TOP/s  "
                          f"{row['x_bf16']:.2f}x bf16", flush=True)
                lib.ostq_cutlass_set_sched(-1, -1, -1)  # automatic
            del wps, wbf
            torch.cuda.empty_cache()
    res["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
