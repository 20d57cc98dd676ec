"""Decode attention over a 4-bit KV cache on the GPU (issue 7): our kernels against vLLM's own
int4_per_token_head path (Triton + its RHT glue), FlashAttention-3 on a bf16 cache and on an FP8
cache, in one run, at Llama-3-8B attention shapes (32 query heads, 8 KV heads, head 128, block 16).

    python -m benchmarks.kv4_attention [--batches 1,16,64,256] [--contexts 1024,4096,16384] --out F.json

Each call is timed inside a CUDA graph that runs it over `copies` caches with their own block tables
(together >= 256 MB, so the cache is read from HBM, not L2); median of the replays / copies.
Every sequence has the full context. KV bytes: what the call must read at least (int4: 136 B per
token and KV head, fp8: 256, bf16: 512). HBM: a device-to-device copy measured in the same run.
Needs vLLM 0.26 (GPU bundle) for the baselines; our kernels from ostquant_vllm/kernels/_build.
--ours-only times our kernels alone (no vLLM needed; the baselines' columns stay empty).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from ostquant_vllm import kernels
from ostquant_vllm import kv4_attention as kv4

HQ, NKV, D, BS = 32, 8, 128, 16
L2_FLUSH_BYTES = 256 << 20


def median_us(fn, copies: int, replays: int = 20) -> float:
    """Median time of one call: fn(i) for i in range(copies) captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):  # warm-up (Triton compiles, FA3 picks kernels)
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1000 / copies)
    del g
    return statistics.median(times)


def copy_bandwidth() -> float:
    """TB/s of a 2 GiB device-to-device copy (bytes read + written)."""
    x = torch.empty(1 << 30, dtype=torch.int16, device="cuda").random_()
    y = torch.empty_like(x)
    us = median_us(lambda i: y.copy_(x), 1, 10)
    return 2 * x.numel() * 2 / us / 1e6


def read_bandwidth() -> float:
    """TB/s of a 4 GiB reduction (bytes read): the read ceiling the KV bytes are measured against."""
    x = torch.empty(1 << 31, dtype=torch.bfloat16, device="cuda").normal_()
    out = torch.empty((), dtype=torch.float32, device="cuda")
    us = median_us(lambda i: torch.sum(x, dim=0, dtype=torch.float32, out=out), 1, 10)
    return x.numel() * 2 / us / 1e6


def block_tables(b: int, ctx: int, copies: int, gen) -> list[torch.Tensor]:
    per = ctx // BS
    perm = torch.randperm(b * per * copies, device="cuda", generator=gen).int()
    return [perm[c * b * per:(c + 1) * b * per].view(b, per).contiguous() for c in range(copies)]


def fill_int4(cache: torch.Tensor, tables: list[torch.Tensor], ctx: int, gen) -> None:
    """Real data through our write kernel (random bytes would give NaN scales)."""
    for table in tables:
        b = table.shape[0]
        pos = torch.arange(ctx, device="cuda")
        for s in range(b):
            slots = table[s, pos // BS].long() * BS + pos % BS
            k = torch.randn(ctx, NKV, D, device="cuda", generator=gen).bfloat16()
            v = torch.randn(ctx, NKV, D, device="cuda", generator=gen).bfloat16()
            kv4.write_cache(k, v, cache, slots)


def vllm_int4_views(kv_cache: torch.Tensor):
    """vLLM's own (key, value, k_scale, v_scale) views of the cache, made by its backend code
    (which fills the scales with 1.0 once: call before writing)."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl
    from vllm.v1.kv_cache_interface import get_kv_quant_mode

    impl = TritonAttentionImpl.__new__(TritonAttentionImpl)
    impl._kv_quant_mode = get_kv_quant_mode("int4_per_token_head")
    k, v = impl._pth_key_value_caches(kv_cache)
    return k, v, impl._k_scale_cache, impl._v_scale_cache


def run_point(b: int, ctx: int, gen, check: bool, baselines: bool = True) -> dict:
    int4_bytes = b * ctx * NKV * kv4.record_bytes(D)
    copies = max(1, math.ceil(L2_FLUSH_BYTES / int4_bytes))
    nblocks = b * (ctx // BS) * copies
    scale = D ** -0.5
    q = torch.randn(b, HQ, D, device="cuda", generator=gen).bfloat16()
    out = torch.empty_like(q)
    qsl = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    tables = block_tables(b, ctx, copies, gen)
    row = {"batch": b, "context": ctx, "copies": copies, "kv_bytes": {}, "us": {}}

    # int4 cache, NHD like vLLM's Triton backend by default
    kv_cache = torch.empty(nblocks, BS, NKV, kv4.record_bytes(D), dtype=torch.uint8, device="cuda").permute(0, 2, 1, 3)
    if baselines:
        kc, vc, ksc, vsc = vllm_int4_views(kv_cache)
    fill_int4(kv_cache, tables, ctx, gen)
    splits = kv4.num_splits(b, NKV, q.device)
    row["splits"] = splits
    row["kv_bytes"]["int4"] = int4_bytes
    row["us"]["ostquant_int4"] = median_us(
        lambda i: kv4.decode(q, kv_cache, tables[i], seq_lens, qsl, scale, out, splits=splits), copies)
    ours = out.clone()
    if check and b * ctx <= 16 * 4096:
        ref = kv4.decode_reference(q, kv_cache, tables[-1], seq_lens, qsl, scale)
        row["rel_err_vs_reference"] = ((ours.float() - ref).norm() / ref.norm()).item()
    if not baselines:
        return row
    from vllm.v1.attention.ops.int4_per_token_head import unified_attention_int4
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    thr, segs = max(1, 128 // NKV), 16
    segm_o = torch.empty(thr, HQ, segs, D, dtype=torch.float32, device="cuda")
    segm_m = torch.empty(thr, HQ, segs, dtype=torch.float32, device="cuda")
    segm_e = torch.empty_like(segm_m)
    out_v = torch.empty_like(q)

    def vllm_int4(i):
        unified_attention_int4(q, kc, vc, out_v, cu_seqlens_q=qsl, max_seqlen_q=1, seqused_k=seq_lens,
                               max_seqlen_k=ctx, softmax_scale=scale, window_size=(-1, -1), block_table=tables[i],
                               softcap=0.0, sinks=None, alibi_slopes=None, use_alibi_sqrt=False, qq_bias=None,
                               output_scale=None, mm_prefix_range=None, k_scale_cache=ksc, v_scale_cache=vsc,
                               seq_threshold_3D=thr, num_par_softmax_segments=segs, softmax_segm_output=segm_o,
                               softmax_segm_max=segm_m, softmax_segm_expsum=segm_e)

    row["us"]["vllm_int4"] = median_us(vllm_int4, copies)
    row["rel_diff_vs_vllm_int4"] = ((ours.float() - out_v.float()).norm() / out_v.float().norm()).item()
    kv_cache = kc = vc = ksc = vsc = None  # free the int4 cache before the bf16 and fp8 ones
    torch.cuda.empty_cache()

    for name, dt, nbytes in (("fa3_bf16", torch.bfloat16, 2), ("fa3_fp8", torch.float8_e4m3fn, 1)):
        row["kv_bytes"][name.split("_")[1]] = b * ctx * NKV * D * 2 * nbytes
        try:
            kcache = torch.randn(nblocks, BS, NKV, D, device="cuda", generator=gen, dtype=torch.bfloat16).to(dt)
            vcache = torch.randn(nblocks, BS, NKV, D, device="cuda", generator=gen, dtype=torch.bfloat16).to(dt)
        except torch.OutOfMemoryError:
            row["us"][name] = None
            continue
        qq = q.to(dt)
        ones = torch.ones(b, NKV, dtype=torch.float32, device="cuda") if dt != torch.bfloat16 else None
        o = torch.empty_like(q)

        def fa(i, kcache=kcache, vcache=vcache, qq=qq, ones=ones, o=o):
            flash_attn_varlen_func(qq, kcache, vcache, max_seqlen_q=1, cu_seqlens_q=qsl, max_seqlen_k=ctx,
                                   seqused_k=seq_lens, softmax_scale=scale, causal=True, block_table=tables[i],
                                   out=o, fa_version=3, q_descale=ones, k_descale=ones, v_descale=ones)

        row["us"][name] = median_us(fa, copies)
        del kcache, vcache
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--no-check", action="store_true", help="skip the reference comparison of small points")
    p.add_argument("--ours-only", action="store_true", help="our kernels alone: no vLLM, no baselines")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if kernels.unavailable_reason() is not None:
        sys.exit(f"kernels unavailable: {kernels.unavailable_reason()}")
    if a.ours_only:
        vllm_version = None
    else:
        import vllm
        vllm_version = vllm.__version__

    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "vllm": vllm_version, "python": platform.python_version(),
           "command": "python -m benchmarks.kv4_attention " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "shape": {"q_heads": HQ, "kv_heads": NKV, "head_size": D, "block": BS},
           "copy_tb_s": copy_bandwidth(), "read_tb_s": read_bandwidth(), "points": []}
    res["hbm_tb_s"] = max(res["copy_tb_s"], res["read_tb_s"])
    res["min_split_tiles"] = int(os.environ.get("OSTQUANT_KV4_MIN_TILES", "16"))  # the decode's least split
    res["tiles_in_flight"] = kernels._lib.KV4_PREFETCH  # a warp's loads ahead
    try:
        res["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    print(f"HBM copy {res['copy_tb_s']:.2f} TB/s, read {res['read_tb_s']:.2f} TB/s")
    print(f"{'b':>4} {'ctx':>6} {'ours us':>9} {'vllm4 us':>9} {'fa3 bf16':>9} {'fa3 fp8':>9} {'ours TB/s':>9} "
          f"{'%hbm':>6} {'x vllm4':>8} {'x fp8':>6}")
    for b in map(int, a.batches.split(",")):
        for ctx in map(int, a.contexts.split(",")):
            try:
                row = run_point(b, ctx, gen, not a.no_check, baselines=not a.ours_only)
            except torch.OutOfMemoryError as e:
                print(f"{b} {ctx}: out of memory ({e})")
                torch.cuda.empty_cache()
                continue
            us = row["us"]
            row["ostquant_tb_s"] = row["kv_bytes"]["int4"] / us["ostquant_int4"] / 1e6
            row["ostquant_frac_of_hbm"] = row["ostquant_tb_s"] / res["hbm_tb_s"]
            row["speedup_vs_vllm_int4"] = us["vllm_int4"] / us["ostquant_int4"] if us.get("vllm_int4") else None
            row["speedup_vs_fa3_fp8"] = us["fa3_fp8"] / us["ostquant_int4"] if us.get("fa3_fp8") else None
            row["speedup_vs_fa3_bf16"] = us["fa3_bf16"] / us["ostquant_int4"] if us.get("fa3_bf16") else None
            res["points"].append(row)
            f = lambda x: f"{x:9.1f}" if x else "        -"  # noqa: E731
            print(f"{b:4d} {ctx:6d} {f(us['ostquant_int4'])} {f(us.get('vllm_int4'))} {f(us.get('fa3_bf16'))} "
                  f"{f(us.get('fa3_fp8'))} {row['ostquant_tb_s']:9.2f} {100 * row['ostquant_frac_of_hbm']:5.0f}% "
                  f"{row['speedup_vs_vllm_int4'] or 0:8.2f} {row['speedup_vs_fa3_fp8'] or 0:6.2f}"
                  f"  err {row.get('rel_err_vs_reference', -1):.1e} vs-vllm {row.get('rel_diff_vs_vllm_int4', -1):.1e}",
                  flush=True)
            with open(a.out, "w") as fh:
                json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
