"""The fused quantizers of ostquant_vllm/fusion.py against the two kernels they replace, in CUDA graphs, with the
GEMM after them (the decode GEMMs start under PDL while the quantizer runs), on Llama-3-8B's layers:

    norm_qkv:  Inductor's add + RMSNorm, then quantize_act, then the qkv GEMM    vs  rms_norm_quant, then the GEMM
    silu_down: Inductor's SiluAndMul, then quantize_act (H_down), then down      vs  silu_mul_quantize_act, then down

    python benchmarks/fusion_bench.py [--ms 1,16,64,256] [--out $OUT/fusion_bench.json]

Two rounds in turn; us a chain (the graph's mean a call). The Inductor functions are vLLM's native code
(kernels.reference.rms_norm_ref / silu_mul_ref) under torch.compile, as vLLM compiles them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.kernels import bench_graph, weight_operands  # noqa: E402
from ostquant_vllm import kernels  # noqa: E402
from ostquant_vllm.kernels.reference import rms_norm_ref, silu_mul_ref  # noqa: E402

HIDDEN, INTER, QKV, BLOCKS, EPS = 4096, 14336, 6144, 8, 1e-5


def chains(m: int, gen) -> dict:
    dev = "cuda"
    x = torch.randn(m, HIDDEN, device=dev, generator=gen).to(torch.bfloat16)
    res = torch.randn(m, HIDDEN, device=dev, generator=gen).to(torch.bfloat16)
    w = torch.ones(HIDDEN, device=dev, dtype=torch.bfloat16)  # OSTQuant folds the norm weight into the linears
    gu = (torch.randn(m, 2 * INTER, device=dev, generator=gen) * 2).to(torch.bfloat16)
    norm = torch.compile(lambda a, b: rms_norm_ref(a, b, w, EPS), dynamic=False)
    silu = torch.compile(silu_mul_ref, dynamic=False)
    out = {}
    for name, n, k, plain, fused in [
        ("norm_qkv", QKV, HIDDEN,
         lambda: kernels.quantize_act(norm(x, res)[0], 4),
         lambda: kernels.rms_norm_quant(x, res, w, EPS, 4)[:3]),
        ("silu_down", HIDDEN, INTER,
         lambda: kernels.quantize_act(silu(gu), 4, hadamard=BLOCKS),
         lambda: kernels.silu_mul_quantize_act(gu, 4, hadamard=BLOCKS)),
    ]:
        _, wps, wsum, ws, _ = weight_operands(n, k, gen)  # copies of the weights beyond L2

        def chain(quant, wp):
            def run():
                q, s, z = quant()
                kernels.int4_gemm(q, s, z, wp, ws, wsum)
            return run

        for tag, quant in (("unfused", plain), ("fused", fused)):
            out[f"{name}_{tag}"] = [chain(quant, wp) for wp in wps]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,16,64,256")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "fusion_bench.json"))
    a = ap.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for m in (int(v) for v in a.ms.split(",")):
        fns = chains(m, gen)
        for r in range(a.rounds):
            for key, f in fns.items():
                us = bench_graph(f)
                rows.append({"chain": key.rsplit("_", 1)[0], "fused": key.endswith("_fused"), "M": m, "round": r,
                             "us": us})
                print(f"M={m:4d} round {r} {key:18s} {us:7.2f} us", flush=True)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": "python benchmarks/fusion_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "settings": {k: v for k, v in os.environ.items() if k.startswith("OSTQUANT_")}, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
