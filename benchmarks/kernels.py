"""Kernel benchmark (issue 5): ostquant W4A8 / W4A4 GEMM and the activation quantizers on
Llama-3-8B / 70B linear shapes, against torch bf16 matmul, fp8 torch._scaled_mm and int8
torch._int_mm, with the device copy bandwidth measured in the same run.

    python benchmarks/kernels.py [--out benchmarks/results/kernels_<gpu>.json] [--quick]

--vllm adds vLLM's own kernels (CUTLASS W8A8-int8, Machete W4A16, CUTLASS W4A8 with fp8 activations) on
the same shapes; run it where the vLLM bundle is installed (../shared/gpu, 4 calls), e.g.
    . benchmarks/gpu_vllm_env.sh && python3 benchmarks/kernels.py --vllm --skip-quant --out $OUT/kernels_vllm.json

Each time is the smaller of (a) the median of triton.testing.do_bench (CUDA events, L2 flushed
before every call) and (b) a CUDA-graph replay of calls cycling through weight copies (>= 4x L2
in total, so L2 does not hold the weights), which removes host/launch overhead as vLLM's graphs
do; both are kept in the row (us_do_bench, us_graph). weight_tbps = weight bytes / time
(int4: N*K/2, fp8/int8: N*K, bf16: 2*N*K); tops = 2*M*N*K / time. Quantize rows: tbps = (bytes
read + written) / time, to compare with hbm_copy_tbps (a device-to-device copy, read + write).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ostquant_vllm import kernels  # noqa: E402
from ostquant_vllm.kernels.layout import levels_to_prepared  # noqa: E402

LAYERS = {
    "llama3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "llama3-70b": [("qkv", 8192, 10240), ("o", 8192, 8192), ("gate_up", 8192, 57344), ("down", 28672, 8192)],
}
MS = [1, 16, 64, 256, 2048, 8192]
# kernel kinds to leave out of the per-kind rows (e.g. ones whose GPU tests failed in the same call)
SKIP_KINDS = {int(k) for k in os.environ.get("OSTQUANT_BENCH_SKIP_KINDS", "").split(",") if k.strip()}
L2_BYTES = 50 * 2**20


def bench(fns, rep_ms=60):
    """Median us of calling fns[i % len(fns)] (rotating input sets)."""
    state = {"i": 0}

    def run():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return 1e3 * do_bench(run, warmup=15, rep=rep_ms, return_mode="median")


def copies_for(nbytes):
    return max(1, min(16, -(-4 * L2_BYTES // max(nbytes, 1))))


def bench_graph(fns, reps=10):
    """Mean us per call of a CUDA graph holding max(8, len(fns)) calls cycling through fns
    (no host overhead: what vLLM's decode graphs see)."""
    n = max(8, len(fns))
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns[:2]:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        t0.record()
        g.replay()
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) * 1e3 / n)
    del g
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    us = bench([lambda: dst.copy_(src)], rep_ms=200)
    return 2 * n / (us * 1e-6) / 1e12


def vllm_operands(N, K, gen):
    """vLLM's own low-bit GEMMs for one layer, as its linear kernels prepare them (vLLM 0.26, random values):
    name -> (make(M) -> list of timed calls, weight bytes). CUTLASS W8A8 int8 (`cutlass_scaled_mm`), Machete
    W4A16 (uint4b8, bf16 group-128 scales) and CUTLASS W4A8 (fp8 activations, int4 weights, fp8 group-128
    scales + fp32 channel scales). A kernel this vLLM lacks is skipped with a line saying why."""
    from vllm import _custom_ops as ops
    from vllm.scalar_type import scalar_types
    dev, g = "cuda", 128
    packed = torch.zeros(K // 8, N, dtype=torch.int32, device=dev)  # 8 nibbles along K a word
    for i in range(8):
        packed |= torch.randint(0, 16, (K // 8, N), dtype=torch.int32, device=dev, generator=gen) << (4 * i)
    col_major = packed.t().contiguous().t()
    ops_ = {}
    try:
        w8 = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=dev, generator=gen)
        w8s = [w8.clone().t() for _ in range(copies_for(N * K))]  # [K, N] column-major, as vLLM keeps them
        sb = torch.rand(N, 1, device=dev, generator=gen) * 0.01
        def w8a8(M):
            a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=dev, generator=gen)
            sa = torch.rand(M, 1, device=dev, generator=gen) * 0.01
            return [lambda w=w: ops.cutlass_scaled_mm(a, w, sa, sb, torch.bfloat16) for w in w8s]
        ops_["vllm_cutlass_w8a8_int8"] = (w8a8, N * K)
    except Exception as e:  # noqa: BLE001
        print(f"vllm int8 {N}x{K}: {type(e).__name__}: {str(e)[:160]}")
    try:
        wm = ops.machete_prepack_B(col_major, torch.bfloat16, scalar_types.uint4b8, torch.bfloat16)
        wms = [wm] + [wm.clone() for _ in range(copies_for(N * K // 2) - 1)]
        sm = (torch.rand(K // g, N, device=dev, generator=gen) * 0.01).to(torch.bfloat16)
        def machete(M):
            a = torch.randn(M, K, device=dev, generator=gen).to(torch.bfloat16)
            return [lambda w=w: ops.machete_mm(a=a, b_q=w, b_type=scalar_types.uint4b8, b_group_scales=sm,
                                               b_group_size=g) for w in wms]
        ops_["vllm_machete_w4a16"] = (machete, N * K // 2)
    except Exception as e:  # noqa: BLE001
        print(f"vllm machete {N}x{K}: {type(e).__name__}: {str(e)[:160]}")
    try:
        wc = ops.cutlass_encode_and_reorder_int4b(col_major)
        wcs = [wc] + [wc.clone() for _ in range(copies_for(N * K // 2) - 1)]
        gs = torch.rand(N, K // g, device=dev, generator=gen) + 0.5
        chan = gs.amax(-1, keepdim=True) * 0.01  # [N, 1], as convert_bf16_scales_to_fp8 leaves them
        sg = ops.cutlass_pack_scale_fp8((gs / gs.amax(-1, keepdim=True)).to(torch.float8_e4m3fn).t().contiguous())
        def w4a8(M):
            a = torch.randn(M, K, device=dev, generator=gen).to(torch.float8_e4m3fn)
            ta = torch.rand(M, 1, device=dev, generator=gen) * 0.01
            return [lambda w=w: ops.cutlass_w4a8_mm(a=a, b_q=w, b_group_scales=sg, b_group_size=g,
                                                    b_channel_scales=chan, a_token_scales=ta) for w in wcs]
        ops_["vllm_cutlass_w4a8_fp8"] = (w4a8, N * K // 2)
    except Exception as e:  # noqa: BLE001
        print(f"vllm cutlass w4a8 {N}x{K}: {type(e).__name__}: {str(e)[:160]}")
    return ops_


def weight_operands(N, K, gen):
    """Random int4 weight levels [N, K] and what the GEMMs take: (levels, prepared copies, w_sum int32, w_scale fp32,
    bf16 copies); as many copies as keep the timed loop out of L2 (copies_for)."""
    w = torch.randint(-8, 8, (N, K), dtype=torch.int8, device="cuda", generator=gen)
    wp0 = levels_to_prepared(w)
    wsum = w.int().sum(1).int()
    ws = torch.rand(N, device="cuda", generator=gen) * 0.01
    wps = [wp0] + [wp0.clone() for _ in range(copies_for(N * K // 2) - 1)]
    wbf = [w.to(torch.bfloat16) for _ in range(copies_for(2 * N * K))]
    return w, wps, wsum, ws, wbf


def act_operands(M, K, bits, gen):
    """Random activation levels of `bits` bits [M, K] int8 with per-token scale and zero point [M, 1] fp32."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    a = torch.randint(lo, hi, (M, K), dtype=torch.int8, device="cuda", generator=gen)
    s = torch.rand(M, 1, device="cuda", generator=gen) * 0.01
    z = torch.randint(lo, hi, (M, 1), device="cuda", generator=gen).float()
    return a, s, z


def gemm_rows(model, layer, K, N, gen, rows, quick, ms=None, with_vllm=False):
    dev = "cuda"
    w, wps, wsum, ws, wbf = weight_operands(N, K, gen)
    w8 = [w.clone() for _ in range(copies_for(N * K))]
    wf8 = [w.to(torch.float8_e4m3fn) for _ in range(copies_for(N * K))]
    del w
    one = torch.ones((), device=dev)
    vops = vllm_operands(N, K, gen) if with_vllm else {}
    for M in (ms or (MS if not quick else [1, 16, 2048])):
        def add(kernel, fns, wbytes, note=None):
            try:
                us_b = bench(fns)
            except Exception as e:  # noqa: BLE001
                print(f"{kernel} M={M} N={N} K={K} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                return
            try:
                us_g = bench_graph(fns)
            except Exception as e:  # noqa: BLE001
                print(f"graph timing failed for {kernel}: {e}")
                us_g = float("inf")
            us = min(us_b, us_g)
            r = {"kind": "gemm", "kernel": kernel, "model": model, "layer": layer, "M": M, "N": N, "K": K,
                 "us": round(us, 3), "us_do_bench": round(us_b, 3), "us_graph": round(us_g, 3),
                 "weight_tbps": round(wbytes / (us * 1e-6) / 1e12, 4),
                 "tops": round(2 * M * N * K / (us * 1e-6) / 1e12, 2)}
            if note:
                r["note"] = note
            if kernel in ("ostquant_w4a4", "ostquant_w4a8"):  # the kind the automatic choice ran
                r["auto_kind"] = kernels._auto_force(M, N, K)
            rows.append(r)
            print(f"{model:10s} {layer:8s} M={M:5d} {kernel:22s} {us:9.2f} us  {r['weight_tbps']:6.3f} TB/s(w)  "
                  f"{r['tops']:7.1f} TOP/s", flush=True)

        for bits, name in ((8, "ostquant_w4a8"), (4, "ostquant_w4a4")):
            a, s, z = act_operands(M, K, bits, gen)
            fns = [lambda wp=wp: kernels.int4_gemm(a, s, z, wp, ws, wsum) for wp in wps]
            add(name, fns, N * K // 2)
            if bits == 4:  # the other kernel choices, for the notes and the dispatch
                if M <= 16:
                    alts = ((4 if M <= 8 else 0, "splitk_mma"), (7 if M <= 8 else 8, "dec"),
                            (27 if M <= 8 else 28, "dec8w"),  # 8 warps a CTA
                            (43, "cutlass43_sk32"), (41, "cutlass41_sk64"))  # CUTLASS, stream-K
                elif M <= 256:  # the decode kernel with R weight blocks a warp (kinds 9-12) vs wgmma
                    alts = ((3, "wg3"), (5, "wg5"), (9, "dec_r2t32"), (10, "dec_r2t64"), (11, "dec_r4t32"),
                            (12, "dec_r4t64"), (13, "wg13_t64"), (14, "wg14_t32"), (15, "wg15_t64_n256"),
                            (16, "wg16_t32_n256"), (22, "wp22_t64"), (23, "wp23_t32"), (24, "wp24_t64_n256"),
                            (25, "wp25_t32_n256"), (29, "dec8w_r2t32"), (30, "dec8w_r2t64"),
                            (31, "dec8w_r4t32"), (32, "dec8w_r4t64"),  # 29-32: 9-12 with 8 warps a CTA
                            (33, "dec_r4t64_cl2"), (34, "dec8w_r4t64_cl2"),  # 12 / 32, K over 2 CTAs
                            (35, "dec8w_r6t32"), (36, "dec_r6t32"),  # 31 / 11 with 6 weight blocks a warp
                            (6, "wg6"), (40, "cutlass40"),  # 40: CUTLASS's mixed-input mainloop on our layout
                            (41, "cutlass41_sk64"), (42, "cutlass42_sk128"), (43, "cutlass43_sk32"))  # stream-K
                else:  # 6: the pipelined wgmma (a commit group a k32 slice, the next one widened under it),
                    # 26: the same with 128 x 256 tiles (L2-bound at 128 x 128: session 11's Nsight Compute)
                    alts = ((3, "wg3"), (5, "wg5"), (6, "wg6"), (26, "wp26_n256"), (40, "cutlass40"),
                            (42, "cutlass42_sk128"))
                for force, tag in alts:
                    if force in SKIP_KINDS:
                        continue
                    fns = [lambda wp=wp, f=force: kernels._gemm_cuda(a, s, z, wp, ws, wsum, torch.bfloat16, force=f)
                           for wp in wps]
                    add(f"{name}_force_{tag}", fns, N * K // 2)
                if M in (64, 256) and not quick:  # wgmma split-K on (the library default is off)
                    lib = kernels._lib.load()
                    lib.ostq_set_wgmma_split(1)
                    fns = [lambda wp=wp: kernels._gemm_cuda(a, s, z, wp, ws, wsum, torch.bfloat16, force=5)
                           for wp in wps]
                    add(f"{name}_force_wg5_split", fns, N * K // 2)
                    lib.ostq_set_wgmma_split(int(kernels._lib.DEFAULT_WGMMA_SPLIT))
        x = torch.randn(M, K, device=dev, generator=gen).to(torch.bfloat16)
        had = layer == "down"
        fns = []
        for wp in wps:
            def lin(wp=wp):
                q, s_, z_ = kernels.quantize_act(x, 4, hadamard=had)
                return kernels.int4_gemm(q, s_, z_, wp, ws, wsum)
            fns.append(lin)
        add("ostquant_w4a4_linear", fns, N * K // 2, "quantize" + ("+hadamard" if had else "") + " + gemm")
        fns = [lambda wb=wb: torch.matmul(x, wb.T) for wb in wbf]
        add("torch_bf16", fns, 2 * N * K)
        try:
            xf8 = x.to(torch.float8_e4m3fn)
            fns = [lambda wf=wf: torch._scaled_mm(xf8, wf.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
                   for wf in wf8]
            fns[0]()
            add("torch_fp8", fns, N * K)
        except Exception as e:  # noqa: BLE001
            print(f"torch_fp8 M={M}: {type(e).__name__}: {str(e)[:120]}")
        try:
            Mp = max(M, 32)
            a8 = torch.randint(-128, 128, (Mp, K), dtype=torch.int8, device=dev, generator=gen)
            fns = [lambda w_=w_: torch._int_mm(a8, w_.T) for w_ in w8]
            fns[0]()
            add("torch_int8", fns, N * K, None if Mp == M else f"M padded to {Mp}")
        except Exception as e:  # noqa: BLE001
            print(f"torch_int8 M={M}: {type(e).__name__}: {str(e)[:120]}")
        for vname, (make, wbytes) in vops.items():  # timing only: their numerics are vLLM's
            try:
                fns = make(M)
                fns[0]()
            except Exception as e:  # noqa: BLE001
                print(f"{vname} M={M}: {type(e).__name__}: {str(e)[:160]}")
                continue
            add(vname, fns, wbytes)
    del wps, wbf, w8, wf8, vops
    torch.cuda.empty_cache()


# the fused Hadamard kernel's versions (kernels._quant_cuda's `variant`): None = the dispatch's choice,
# 1 = version 2 (constant-memory table), 2 = version 3, 3 / 4 = version 4 (row in registers) / with half
# the values a thread, 5 = version 5 (H_B on the tensor cores), 6 = version 4 with one a-row a thread, 8 = version 6
# (blocks of <= 64 a-rows each in one warp's registers; elsewhere version 3)
HAD_VARIANTS = {None: "", 1: "_v2", 2: "_v3", 3: "_v4", 4: "_v4half", 5: "_v5", 6: "_v4r1", 8: "_v6"}


def quant_rows(rows, copy_tbps, gen, quick, hadamard_only=False, ms=()):
    """Quantizer rows: (K, blocks of the fused Hadamard I_b (x) H_{K/b}, 0 = none) at `ms` tokens (default:
    all). --hadamard-only: the down_proj inputs of Llama-3-8B/70B and SmolLM2 at b = 1 and calibration's
    default 8, every version."""
    if hadamard_only:
        cases = [(k, b) for k in (14336, 28672, 1536) for b in (0, 1, 8)]
    else:
        cases = [(4096, 0), (8192, 0), (14336, 0), (28672, 0), (14336, 1), (28672, 1), (1536, 1)]
    for K, had in cases:
        for M in (ms or ([1, 16, 64, 256, 2048, 8192] if not quick else [16, 8192])):
            nx = copies_for(M * K * 2)
            xs = [torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(nx)]
            nbytes = M * K * 2 + M * K + 8 * M
            if not had:
                runs = [(4, None)] if hadamard_only else [(4, None), (8, None)]
            else:
                runs = ([(4, None), (4, 2), (4, 3), (4, 4), (4, 5), (4, 6), (4, 8)] if hadamard_only
                        else [(4, None), (8, None), (4, 2)])
            for bits, variant in runs:
                if variant is None:
                    qf = [lambda x=x: kernels.quantize_act(x, bits, hadamard=had) for x in xs]
                else:
                    qf = [lambda x=x: kernels._quant_cuda(x, bits, False, 1.0, had, variant=variant) for x in xs]
                try:
                    us = min(bench(qf), bench_graph(qf))
                except Exception as e:  # noqa: BLE001
                    print(f"quant K={K} had={had} M={M} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                tb = nbytes / (us * 1e-6) / 1e12
                name = (f"ostquant_quant_a{bits}" + ("_had" if had else "") + (str(had) if had > 1 else "")
                        + (HAD_VARIANTS[variant] if had else ""))
                rows.append({"kind": "quantize", "kernel": name, "M": M, "N": None, "K": K, "us": round(us, 3),
                             "hadamard_blocks": had, "variant": variant,
                             "tbps": round(tb, 4), "frac_of_copy": round(tb / copy_tbps, 3)})
                print(f"quant K={K:5d} had={had} M={M:5d} {name}: {us:9.2f} us  {tb:6.3f} TB/s  "
                      f"{tb / copy_tbps:5.1%} of copy", flush=True)
            dst = torch.empty_like(xs[0])
            cf = [lambda x=x: dst.copy_(x) for x in xs]
            us = min(bench(cf), bench_graph(cf))
            tb = 2 * M * K * 2 / (us * 1e-6) / 1e12
            rows.append({"kind": "quantize", "kernel": "torch_copy", "M": M, "N": None, "K": K, "us": round(us, 3),
                         "hadamard_blocks": had, "tbps": round(tb, 4), "frac_of_copy": round(tb / copy_tbps, 3)})
            del xs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="llama3-8b,llama3-70b")
    ap.add_argument("--skip-quant", action="store_true")
    ap.add_argument("--hadamard-only", action="store_true",
                    help="quantize rows: the fused Hadamard at b = 1 and 8, every kernel version (use with --models '')")
    ap.add_argument("--ms", default="", help="comma-separated token counts for the rows (default: all)")
    ap.add_argument("--vllm", action="store_true",
                    help="also time vLLM's CUTLASS W8A8-int8, Machete W4A16 and CUTLASS W4A8 GEMMs "
                         "(needs vLLM on the GPU)")
    args = ap.parse_args()
    assert kernels.available(), kernels.unavailable_reason()
    name = torch.cuda.get_device_name()
    tag = re.sub(r"[^a-z0-9]+", "", name.lower().replace("nvidia", "")) or "gpu"
    tag = "h100" if "h100" in tag else ("h200" if "h200" in tag else tag)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels_{tag}.json")
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    copy_tbps = copy_bandwidth()
    print(f"{name}: device copy {copy_tbps:.3f} TB/s (read + write)", flush=True)
    rows = []
    res = {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
           "command": "python " + " ".join(sys.argv), "hbm_copy_tbps": round(copy_tbps, 4),
           "units": {"us": "microseconds, min of do_bench median and CUDA-graph replay mean",
                     "weight_tbps": "weight bytes / time, 1e12 B/s",
                     "tops": "2*M*N*K / time, 1e12 ops/s", "tbps": "bytes read+written / time (quantize rows)"},
           "complete": False, "rows": rows,
           "env": {k: v for k, v in os.environ.items() if k.startswith("OSTQUANT_")}}  # measurement settings
    if args.vllm:
        import vllm
        res["vllm"] = vllm.__version__
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def save():
        res["seconds"] = round(time.time() - t0, 1)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)

    ms = [int(m) for m in args.ms.split(",") if m]
    if not args.skip_quant:
        quant_rows(rows, copy_tbps, gen, args.quick, args.hadamard_only, ms)
        save()
    for model in filter(None, args.models.split(",")):  # --models "": the quantize rows only
        for layer, K, N in LAYERS[model]:
            gemm_rows(model, layer, K, N, gen, rows, args.quick, ms, args.vllm)
            save()
    res["hbm_copy_tbps_end"] = round(copy_bandwidth(), 4)
    res["complete"] = True
    save()
    print(f"wrote {out} ({len(rows)} rows, {time.time() - t0:.0f} s)")
    summarize(res)


def summarize(res):
    """Short table: ours vs bf16 per shape and M; bars."""
    copy = res["hbm_copy_tbps"]
    by = {}
    for r in res["rows"]:
        if r["kind"] == "gemm":
            by[(r["model"], r["layer"], r["M"], r["kernel"])] = r
    print(f"\nsummary (copy {copy:.2f} TB/s): us ours(w4a4) / bf16 / fp8 / int8; speedup vs bf16; weight TB/s % of copy")
    for (model, layer, M, k), r in sorted(by.items()):
        if k != "ostquant_w4a4":
            continue
        b = by.get((model, layer, M, "torch_bf16"))
        f8 = by.get((model, layer, M, "torch_fp8"))
        i8 = by.get((model, layer, M, "torch_int8"))
        print(f"{model:10s} {layer:8s} M={M:5d} {r['us']:9.1f} {b['us'] if b else float('nan'):9.1f} "
              f"{f8['us'] if f8 else float('nan'):9.1f} {i8['us'] if i8 else float('nan'):9.1f}  "
              f"x{(b['us'] / r['us']) if b else float('nan'):5.2f}  {r['weight_tbps'] / copy:6.1%}")


if __name__ == "__main__":
    main()
