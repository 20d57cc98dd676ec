"""One kernel case at a time, for Nsight Compute (benchmarks/gpu_ncu.sh): each case launches its kernel
`--launches` times on fresh-enough inputs (ncu profiles one launch after skipping the first ones), so the
hardware counters say what holds it back (issue 5: the GEMMs at 64 tokens reach 1.2-1.8 TB/s; issue 7:
decode attention over short contexts; the fused Hadamard quantizer at few rows).

    python benchmarks/ncu_cases.py --list
    python benchmarks/ncu_cases.py --case gemm13_gate_up_m64
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ostquant_vllm import kernels  # noqa: E402
from ostquant_vllm.kernels.layout import levels_to_prepared  # noqa: E402

# name: (kind, params). gemm: (force, M, N, K), Llama-3-8B layers; kv4: (batch, context);
# had: (M, K, blocks[, kernel version: kernels._quant_cuda's variant])
CASES = {
    "gemm13_gate_up_m64": ("gemm", (13, 64, 28672, 4096)),
    "gemm22_gate_up_m64": ("gemm", (22, 64, 28672, 4096)),
    "gemm5_gate_up_m64": ("gemm", (5, 64, 28672, 4096)),
    "gemm11_down_m64": ("gemm", (11, 64, 4096, 14336)),
    "gemm31_down_m64": ("gemm", (31, 64, 4096, 14336)),
    "gemm24_down_m64": ("gemm", (24, 64, 4096, 14336)),
    "gemm11_qkv_m64": ("gemm", (11, 64, 6144, 4096)),
    "gemm35_qkv_m64": ("gemm", (35, 64, 6144, 4096)),
    "gemm13_down_m64": ("gemm", (13, 64, 4096, 14336)),
    "gemm7_gate_up_m1": ("gemm", (7, 1, 28672, 4096)),
    "gemm5_gate_up_m8192": ("gemm", (5, 8192, 28672, 4096)),
    "gemm6_gate_up_m8192": ("gemm", (6, 8192, 28672, 4096)),
    "gemm26_gate_up_m8192": ("gemm", (26, 8192, 28672, 4096)),
    # kind 40 (CUTLASS's mainloop): 1,008 TOP/s at 8B o M = 2048 against 1,430 at 8192; gate_up at 8192 1,068
    "gemm40_o_m2048": ("gemm40", (40, 2048, 4096, 4096)),
    "gemm40_o_m8192": ("gemm40", (40, 8192, 4096, 4096)),
    "gemm40_gate_up_m8192": ("gemm40", (40, 8192, 28672, 4096)),
    "gemm41_down_m64": ("gemm40", (41, 64, 4096, 14336)),  # stream-K, 64 tokens a tile
    "kv4_b64_ctx256": ("kv4", (64, 256)),
    "kv4_b1_ctx4096": ("kv4", (1, 4096)),
    "kv4_b16_ctx4096": ("kv4", (16, 4096)),
    "had8_m64_k14336": ("had", (64, 14336, 8)),
    "had1_m8192_k14336": ("had", (8192, 14336, 1)),
    "had1v5_m8192_k14336": ("had", (8192, 14336, 1, 5)),
}
# the kernel-name regex that selects the case's kernel in ncu
KERNEL_REGEX = {"gemm": "gemm_", "gemm40": "device_kernel", "kv4": "decode_kernel", "had": "quant_"}


def gemm_case(force, M, N, K, launches, gen):
    w = torch.randint(-8, 8, (N, K), dtype=torch.int8, device="cuda", generator=gen)
    wp = levels_to_prepared(w)
    wsum = w.int().sum(1).int()
    ws = torch.rand(N, device="cuda", generator=gen) * 0.01
    a = torch.randint(-8, 8, (M, K), dtype=torch.int8, device="cuda", generator=gen)
    s = torch.rand(M, 1, device="cuda", generator=gen) * 0.01
    z = torch.randint(-8, 8, (M, 1), device="cuda", generator=gen).float()
    for _ in range(launches):
        kernels._gemm_cuda(a, s, z, wp, ws, wsum, torch.bfloat16, force=force)


def kv4_case(b, ctx, launches, gen):
    from benchmarks.kv4_attention import BS, D, HQ, NKV, block_tables, fill_int4
    from ostquant_vllm import kv4_attention as kv4

    tables = block_tables(b, ctx, 1, gen)
    kv_cache = torch.empty(b * (ctx // BS), BS, NKV, kv4.record_bytes(D), dtype=torch.uint8,
                           device="cuda").permute(0, 2, 1, 3)
    fill_int4(kv_cache, tables, ctx, gen)
    q = torch.randn(b, HQ, D, device="cuda", generator=gen).bfloat16()
    out = torch.empty_like(q)
    qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    for _ in range(launches):
        kv4.decode(q, kv_cache, tables[0], seq_lens, qsl, D ** -0.5, out)


def had_case(M, K, blocks, variant=None, *, launches, gen):
    x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
    for _ in range(launches):
        if variant is None:
            kernels.quantize_act(x, 4, hadamard=blocks)
        else:
            kernels._quant_cuda(x, 4, False, 1.0, blocks, variant=variant)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES))
    ap.add_argument("--launches", type=int, default=6, help="launches of the kernel (ncu skips the first ones)")
    ap.add_argument("--list", action="store_true", help="print 'case kernel-regex' lines and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, (kind, _) in CASES.items():
            print(name, KERNEL_REGEX[kind])
        return
    if not args.case:
        ap.error("--case or --list")
    assert kernels.available(), kernels.unavailable_reason()
    kind, params = CASES[args.case]
    gen = torch.Generator(device="cuda").manual_seed(0)
    {"gemm": gemm_case, "gemm40": gemm_case, "kv4": kv4_case, "had": had_case}[kind](*params, launches=args.launches,
                                                                                     gen=gen)
    torch.cuda.synchronize()
    print(f"{args.case}: {args.launches} launches done")


if __name__ == "__main__":
    main()
