"""GPU checks of the 4-bit KV cache kernels (csrc/kv4_attention.cu) against their PyTorch
reference (ostquant_vllm/kv4_attention.py), on fresh random inputs in vLLM's paged layout.

Write: the bytes must equal the reference's exactly (same fp32 butterflies, correctly rounded
ops); at most a 1e-4 fraction of records may differ by one level (none expected).
Decode: ||out - ref|| / ||ref|| < 4e-3 per configuration and max error < 3% of the output's
range, against the float32 reference over the same cache (the kernel rounds P * v_scale to fp16:
~5e-4); a wrong nibble, dim permutation, scale or split merge is off by O(1). Outputs are
NaN-poisoned first, and rows of other tokens must stay poisoned.
"""
import pytest
import torch

from ostquant_vllm import kernels
from ostquant_vllm import kv4_attention as kv4

pytestmark = pytest.mark.skipif(kernels.unavailable_reason() is not None,
                                reason=f"kernels unavailable: {kernels.unavailable_reason()}")
DEV = "cuda"


def paged(seq_lens, nkv, d, block_size, layout, gen, extra_blocks=5):
    per_seq = [max(1, -(-n // block_size)) for n in seq_lens]
    total = sum(per_seq) + extra_blocks
    rec = kv4.record_bytes(d)
    if layout == "NHD":
        cache = torch.randint(0, 256, (total, block_size, nkv, rec), dtype=torch.uint8, device=DEV,
                              generator=gen).permute(0, 2, 1, 3)
    else:
        cache = torch.randint(0, 256, (total, nkv, block_size, rec), dtype=torch.uint8, device=DEV, generator=gen)
    perm = torch.randperm(total, generator=gen, device=DEV)
    table = torch.full((len(seq_lens), max(per_seq) + 2), 10 ** 6, dtype=torch.int32, device=DEV)  # junk beyond
    used = 0
    for s in range(len(seq_lens)):
        table[s, :per_seq[s]] = perm[used:used + per_seq[s]].int()
        used += per_seq[s]
    return cache, table


def slots_of(table, seq_lens, block_size):
    out = []
    for s, n in enumerate(seq_lens):
        pos = torch.arange(n, device=DEV)
        out.append(table[s, pos // block_size].long() * block_size + pos % block_size)
    return torch.cat(out)


def kv_values(n, nkv, d, gen):
    # per-channel spread and a few outliers, like post-RoPE keys
    k = torch.randn(n, nkv, d, device=DEV, generator=gen) * (torch.rand(1, nkv, d, device=DEV, generator=gen) * 4)
    k[torch.rand(n, nkv, d, device=DEV, generator=gen) < 1e-3] *= 30
    v = torch.randn(n, nkv, d, device=DEV, generator=gen)
    return k.bfloat16(), v.bfloat16()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("d,nkv", [(128, 8), (64, 3)])
def test_write_matches_reference_bytes(layout, d, nkv):
    gen = torch.Generator(device=DEV).manual_seed(d + nkv)
    lens = [1, 300, 17, 1024]
    cache, table = paged(lens, nkv, d, 16, layout, gen)
    ref = cache.clone()
    slots = slots_of(table, lens, 16)
    k, v = kv_values(slots.numel(), nkv, d, gen)
    # a strided view, as vLLM passes K/V sliced from the qkv projection
    qkv = torch.cat([torch.randn_like(k, dtype=torch.float32).bfloat16(), k, v], dim=1)
    k, v = qkv[:, nkv:2 * nkv], qkv[:, 2 * nkv:]
    slots[::7] = -1  # padding slots are skipped
    kv4.write_cache(k, v, cache, slots)
    kv4.write_cache_reference(k, v, ref, slots)
    torch.cuda.synchronize()
    diff = (cache != ref).any(-1)
    assert diff.float().mean().item() <= 1e-4, f"{int(diff.sum())} records differ"


CASES = [  # (group, d, seq_lens)
    (4, 128, [1, 2, 15, 16, 17, 255, 256, 257, 1000, 4096, 8192]),   # Llama-3-8B (32 / 8)
    (8, 128, [1, 33, 700, 5000]),                                    # Llama-3-70B (64 / 8)
    (3, 64, [1, 9, 128, 513, 2048]),                                 # SmolLM2-135M (9 / 3)
    (12, 128, [64, 1500]),                                           # > 8 query heads per KV head
]


def decode_case(group, d, lens, splits, layout, block_size=16):
    """A decode batch on a fresh random cache: the kernel's outputs (a padding request's row last) and
    the float reference's."""
    gen = torch.Generator(device=DEV).manual_seed(group * 1000 + d + (splits or 0))
    nkv = 2 if group > 8 else (3 if d == 64 else 8 if len(lens) < 6 else 4)
    cache, table = paged(lens, nkv, d, block_size, layout, gen)
    slots = slots_of(table, lens, block_size)
    k, v = kv_values(slots.numel(), nkv, d, gen)
    kv4.write_cache(k, v, cache, slots)
    # a decode batch: one query token per request, plus a padding request (CUDA graphs)
    b = len(lens)
    q = (torch.randn(b + 1, nkv * group, d, device=DEV, generator=gen) * 2).bfloat16()
    qsl = torch.arange(b + 2, dtype=torch.int32, device=DEV)
    qsl[-1] = b  # the last request is empty
    seq_lens = torch.tensor(lens + [0], dtype=torch.int32, device=DEV)
    table = torch.cat([table, table[:1]])
    out = torch.full_like(q, float("nan"))
    scale = d ** -0.5
    kv4.decode(q, cache, table, seq_lens, qsl, scale, out, splits=splits)
    ref = kv4.decode_reference(q[:b], cache, table[:b], seq_lens[:b], qsl[:b + 1], scale)
    torch.cuda.synchronize()
    return out, ref


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("splits", [None, 1, 7])
@pytest.mark.parametrize("group,d,lens", CASES)
def test_decode_matches_reference(group, d, lens, splits, layout, block_size=16):
    out, ref = decode_case(group, d, lens, splits, layout, block_size)
    b = len(lens)
    o = out[:b].float()
    assert not o.isnan().any(), "unwritten or NaN outputs"
    assert out[b].isnan().all(), "the padding request's row was written"
    for s in range(b):
        rel = ((o[s] - ref[s]).norm() / ref[s].norm()).item()
        mx = ((o[s] - ref[s]).abs().max() / ref[s].abs().max()).item()
        assert rel < 4e-3 and mx < 3e-2, f"seq {s} (len {lens[s]}): rel {rel:.2e}, max {mx:.2e}"


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("block_size", [32, 48])
def test_decode_block_sizes_match_reference(block_size, layout):
    # a tile's slot within its block: a mask for power-of-two block sizes, a division otherwise
    test_decode_matches_reference(*CASES[0], 7, layout, block_size)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("splits", [None, 1, 7])
@pytest.mark.parametrize("group,d,lens", CASES[:3])
def test_decode_two_tiles_in_flight_equals_one(group, d, lens, splits, layout):
    # OSTQUANT_KV4_PREFETCH=2's kernel (two tiles ahead a warp, through shared memory) reads the same values
    # and computes the same ops in the same order: the same bits as the one-tile kernel
    lib = kernels._lib.load()
    try:
        lib.ostq_kv4_set_prefetch(1)
        one, _ = decode_case(group, d, lens, splits, layout)
        lib.ostq_kv4_set_prefetch(2)
        two, _ = decode_case(group, d, lens, splits, layout)
    finally:
        lib.ostq_kv4_set_prefetch(kernels._lib.KV4_PREFETCH)
    assert not one[:-1].isnan().any()
    assert torch.equal(one.nan_to_num(7.0), two.nan_to_num(7.0))


@pytest.mark.parametrize("min_tiles,splits", [(1, 200), (16, 64), (4, 7)])
def test_split_combine_repeats_and_leaves_counters_zero(min_tiles, splits):
    # The last split of each (sequence, kv head) combines the others' partials, found by a counter it
    # resets: back-to-back calls (as in a CUDA graph replay) must give identical rows, every counter
    # must be zero afterwards, and many splits (one 16-token tile each) must still match the reference.
    gen = torch.Generator(device=DEV).manual_seed(min_tiles * 1000 + splits)
    lens, nkv, group, d = [3200, 1, 700, 4096], 8, 4, 128
    cache, table = paged(lens, nkv, d, 16, "NHD", gen)
    slots = slots_of(table, lens, 16)
    k, v = kv_values(slots.numel(), nkv, d, gen)
    kv4.write_cache(k, v, cache, slots)
    b = len(lens)
    q = (torch.randn(b, nkv * group, d, device=DEV, generator=gen) * 2).bfloat16()
    qsl = torch.arange(b + 1, dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    lib = kernels._lib.load()
    try:
        lib.ostq_kv4_set_min_tiles(min_tiles)
        outs = []
        for _ in range(3):
            out = torch.full_like(q, float("nan"))
            kv4.decode(q, cache, table, seq_lens, qsl, d ** -0.5, out, splits=splits)
            outs.append(out)
    finally:
        lib.ostq_kv4_set_min_tiles(16)
    ref = kv4.decode_reference(q, cache, table, seq_lens, qsl, d ** -0.5)
    torch.cuda.synchronize()
    assert int(kernels._counters(q.device).abs().sum()) == 0, "a split counter was left non-zero"  # decode's own
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "repeated decode calls differ"
    o = outs[0].float()
    for s in range(b):
        rel = ((o[s] - ref[s]).norm() / ref[s].norm()).item()
        assert rel < 4e-3, f"seq {s} (len {lens[s]}): rel {rel:.2e}"


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_pdl_write_then_decode_equals_plain_launch(splits, prefetch):
    """OSTQUANT_KV4_PDL=1: the decode launched as a programmatic dependent of the cache write (its Q rotation and the
    tiles before the new token in flight while the write runs) gives the same bits as plain launches, eagerly and in
    a CUDA graph whose new token's K/V change between replays: a decode that read the new token's tile before the
    write finished would see the previous replay's record. Contexts put the new token at a tile's first, middle and
    last slot, in a warp's first tiles and past them."""
    gen = torch.Generator(device=DEV).manual_seed(17 + (splits or 0) + 100 * prefetch)
    lens, nkv, group, d = [1, 16, 17, 40, 64, 65, 300, 4096], 8, 4, 128
    cache, table = paged(lens, nkv, d, 16, "NHD", gen)
    slots = slots_of(table, lens, 16)
    k, v = kv_values(slots.numel(), nkv, d, gen)
    kv4.write_cache(k, v, cache, slots)  # the context; each step below rewrites each request's last token
    b = len(lens)
    last = torch.tensor(lens, device=DEV).cumsum(0) - 1
    new_slots = slots[last].contiguous()
    q = (torch.randn(b, nkv * group, d, device=DEV, generator=gen) * 2).bfloat16()
    qsl = torch.arange(b + 1, dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    steps = [kv_values(b, nkv, d, gen) for _ in range(4)]  # the new tokens' K/V of 4 steps

    def step(kn, vn, out):
        kv4.write_cache(kn, vn, cache, new_slots)
        kv4.decode(q, cache, table, seq_lens, qsl, d ** -0.5, out, splits=splits)

    lib = kernels._lib.load()
    lib.ostq_kv4_set_prefetch(prefetch)
    lib.ostq_kv4_set_pdl(0)
    try:
        plain = []
        for kn, vn in steps:
            out = torch.full_like(q, float("nan"))
            step(kn, vn, out)
            plain.append(out)
        lib.ostq_kv4_set_pdl(1)
        for (kn, vn), ref in zip(steps, plain):
            out = torch.full_like(q, float("nan"))
            step(kn, vn, out)
            assert torch.equal(out, ref), "eager PDL decode differs"
        kb, vb, og = steps[0][0].clone(), steps[0][1].clone(), torch.full_like(q, float("nan"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(kb, vb, og)
        for (kn, vn), ref in list(zip(steps, plain))[::-1]:
            kb.copy_(kn)
            vb.copy_(vn)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(og, ref), "PDL decode in a CUDA graph differs"
    finally:
        lib.ostq_kv4_set_pdl(kernels._lib.KV4_PDL)
        lib.ostq_kv4_set_prefetch(kernels._lib.KV4_PREFETCH)
    assert int(kernels._counters(q.device).abs().sum()) == 0, "a split counter was left non-zero"
    assert not plain[0].isnan().any()


@pytest.mark.parametrize("d,nkv", [(128, 8), (64, 3)])
def test_dequantize_is_the_fake_quantizer(d, nkv):
    from ostquant_vllm import numerics

    gen = torch.Generator(device=DEV).manual_seed(7 + d)
    lens = [300, 40]
    cache, table = paged(lens, nkv, d, 16, "NHD", gen)
    slots = slots_of(table, lens, 16)
    k, v = kv_values(slots.numel(), nkv, d, gen)
    kv4.write_cache(k, v, cache, slots)
    src = torch.cat([table[0, :19], table[1, :3]])
    kd, vd = kv4.dequantize_blocks(cache, src, d)
    got_k = torch.cat([kd[:19].reshape(-1, nkv, d)[:300], kd[19:].reshape(-1, nkv, d)[:40]])
    got_v = torch.cat([vd[:19].reshape(-1, nkv, d)[:300], vd[19:].reshape(-1, nkv, d)[:40]])
    for got, x in ((got_k, k), (got_v, v)):
        fq = numerics.fake_quant_kv_int4(x, cache_dtype=torch.bfloat16)
        same = (got == fq).float().mean().item()
        assert same > 0.999 and torch.allclose(got.float(), fq.float(), rtol=1e-2, atol=1e-3), same


@pytest.mark.skipif(kv4._flash_attn() is None, reason="vLLM's FlashAttention not importable")
@pytest.mark.parametrize("qlens", [[1, 5, 37, 1], [64, 1, 1, 300]])
def test_mixed_batch_matches_reference(qlens):
    gen = torch.Generator(device=DEV).manual_seed(sum(qlens))
    ctx = [100, 0, 700, 33]                     # tokens before this step's queries
    lens = [c + q for c, q in zip(ctx, qlens)]
    nkv, group, d = 8, 4, 128
    cache, table = paged(lens, nkv, d, 16, "NHD", gen)
    slots = slots_of(table, lens, 16)
    k, v = kv_values(slots.numel(), nkv, d, gen)
    kv4.write_cache(k, v, cache, slots)
    qsl = torch.tensor([0] + qlens, dtype=torch.int32, device=DEV).cumsum(0, dtype=torch.int32)
    q = (torch.randn(sum(qlens), nkv * group, d, device=DEV, generator=gen) * 2).bfloat16()
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    scale = d ** -0.5
    kv4.decode(q, cache, table, seq_lens, qsl, scale, out)
    dec = out.clone()
    # what a mixed step runs: the decode kernel on the one-token requests only, then the prefill path
    out = torch.full_like(q, float("nan"))
    kv4.decode(q, cache, table, seq_lens, qsl, scale, out, skip_multi=True)
    single = torch.tensor([qsl[s + 1] - 1 for s in range(len(qlens)) if qlens[s] == 1], device=DEV)
    assert torch.equal(out[single], dec[single])
    assert out.isnan().sum().item() == (sum(qlens) - len(single)) * out[0].numel()  # nothing else written
    plan = kv4.PrefillPlan(qsl, seq_lens, table, 16)
    assert (plan.q_range is not None) == (qlens == [1, 5, 37, 1])  # rows in place / gathered
    kv4.prefill(q, cache, plan, scale, out)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    # decode kernel: every request's last token, against the rotated-basis reference
    last = (qsl[1:] - 1).long()
    ref = kv4.attention_reference(q, cache, table, seq_lens, qsl, scale, last_only=True)
    rel = ((dec[last].float() - ref[last]).norm(dim=-1) / ref[last].norm(dim=-1)).max().item()
    assert rel < 4e-3, rel
    # prefill path: every token, against attention over calibration's fake-quantized K/V (bf16,
    # original basis), the values FlashAttention reads
    from ostquant_vllm import numerics

    for s, n in enumerate(lens):
        if qlens[s] == 1:
            continue  # the decode kernel's row (checked above)
        kk, vv = kv4.read_cache(cache, table[s], n, d)
        kk = (numerics.rht(kk, inverse=True) / d).bfloat16().float().repeat_interleave(group, 1)
        vv = (numerics.rht(vv, inverse=True) / d).bfloat16().float().repeat_interleave(group, 1)
        for i in range(qsl[s].item(), qsl[s + 1].item()):
            vis = n - (qsl[s + 1].item() - 1 - i)
            p = torch.softmax(torch.einsum("hd,lhd->hl", q[i].float(), kk[:vis]) * scale, -1)
            r = torch.einsum("hl,lhd->hd", p, vv[:vis])
            err = ((out[i].float() - r).norm(dim=-1) / r.norm(dim=-1)).max().item()
            assert err < 2e-2, (s, i, err)
