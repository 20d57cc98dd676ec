"""The 4-bit KV cache's PyTorch reference (ostquant_vllm/kv4_attention.py): its bytes and its
attention are calibration's fake quantizer (numerics.fake_quant_kv_int4) on vLLM's paged layout.
The CUDA kernels are compared against this reference in tests/gpu/test_kv4_kernels.py."""
import pytest
import torch

from ostquant_vllm import kv4_attention as kv4
from ostquant_vllm import numerics


def paged_cache(num_blocks, nkv, block_size, d, layout="NHD"):
    """A cache with vLLM's logical shape (blocks, nkv, block_size, record) in either physical layout."""
    rec = kv4.record_bytes(d)
    if layout == "NHD":
        phys = torch.zeros(num_blocks, block_size, nkv, rec, dtype=torch.uint8)
        return phys.permute(0, 2, 1, 3)
    return torch.zeros(num_blocks, nkv, block_size, rec, dtype=torch.uint8)


def random_batch(gen, seq_lens, nkv, d, block_size, layout):
    """Write random K/V of every sequence into a paged cache with shuffled blocks; returns the cache,
    the block table and the written (key, value) per sequence."""
    per_seq = [-(-n // block_size) for n in seq_lens]
    total = sum(per_seq) + 3
    cache = paged_cache(total, nkv, block_size, d, layout)
    perm = torch.randperm(total, generator=gen)
    table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    kvs, used = [], 0
    for s, n in enumerate(seq_lens):
        table[s, :per_seq[s]] = perm[used:used + per_seq[s]].int()
        used += per_seq[s]
        k = (torch.randn(n, nkv, d, generator=gen) * torch.rand(1, nkv, d, generator=gen) * 4).bfloat16()
        v = torch.randn(n, nkv, d, generator=gen).bfloat16()
        pos = torch.arange(n)
        slots = table[s, pos // block_size].long() * block_size + pos % block_size
        kv4.write_cache_reference(k, v, cache, slots)
        kvs.append((k, v))
    return cache, table, kvs


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("d", [64, 128])
def test_written_cache_reads_back_as_the_fake_quantizer(layout, d):
    gen = torch.Generator().manual_seed(d)
    cache, table, kvs = random_batch(gen, [37, 16, 5], nkv=2, d=d, block_size=16, layout=layout)
    for s, (k, v) in enumerate(kvs):
        kr, vr = kv4.read_cache(cache, table[s], k.shape[0], d)
        for x, xr in ((k, kr), (v, vr)):
            y = numerics.rht(x.float()).bfloat16().float()
            q, zero, scale = numerics.int4_kv_quantize(y)
            assert torch.equal(xr, (q - zero) * scale)  # the bytes hold exactly the quantizer's levels
            back = numerics.rht(xr, inverse=True) / d
            fq = numerics.fake_quant_kv_int4(x, cache_dtype=torch.bfloat16).float()
            assert torch.allclose(back.bfloat16().float(), fq, rtol=1e-2, atol=1e-2 * fq.abs().max())
            assert (back - x.float()).norm() / x.float().norm() < 0.2  # 4 bits: close, not equal


def test_negative_slots_are_skipped():
    cache = paged_cache(2, 1, 16, 64)
    k = torch.randn(3, 1, 64).bfloat16()
    kv4.write_cache_reference(k, k, cache, torch.tensor([-1, 5, -1]))
    assert cache[0, 0, 5].any() and not cache[0, 0, :5].any() and not cache[1].any()


@pytest.mark.parametrize("group,d", [(4, 128), (3, 64), (8, 128)])
def test_decode_reference_is_attention_over_fake_quantized_kv(group, d):
    gen = torch.Generator().manual_seed(group)
    nkv, lens = 2, [1, 40, 17]
    cache, table, kvs = random_batch(gen, lens, nkv, d, 16, "NHD")
    q = torch.randn(len(lens), nkv * group, d, generator=gen).bfloat16()
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    out = kv4.decode_reference(q, cache, table, torch.tensor(lens, dtype=torch.int32), qsl, d ** -0.5)
    for s, (k, v) in enumerate(kvs):
        kf = numerics.fake_quant_kv_int4(k, cache_dtype=torch.bfloat16).float()
        vf = numerics.fake_quant_kv_int4(v, cache_dtype=torch.bfloat16).float()
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)  # [L, Hq, D]
        sc = torch.einsum("hd,lhd->hl", q[s].float(), kf) * d ** -0.5
        ref = torch.einsum("hl,lhd->hd", torch.softmax(sc, -1), vf)
        # differs only by Q rounded to bf16 after its rotation (vLLM's and the kernel's choice)
        assert (out[s] - ref).norm() / ref.norm() < 1e-2


def test_unsupported_says_why():
    class Impl:
        head_size, num_heads, num_kv_heads = 96, 32, 8
        alibi_slopes, sliding_window, logits_soft_cap, sinks, attn_type = None, (-1, -1), 0, None, "decoder"

        def _ensure_scale_caches(self, kv_cache):
            pass

    assert "head size 96" in kv4.unsupported(Impl(), None)
    impl = Impl()
    impl.head_size = 128
    impl.sliding_window = (4095, 0)
    assert "sliding window" in kv4.unsupported(impl, None)
    impl.sliding_window = (-1, -1)
    why = kv4.unsupported(impl, None)
    assert why is None or "CUDA" in why or "Hopper" in why or "library" in why  # CPU CI: no kernels
    assert "Triton" in kv4.unsupported(object(), None)


def test_num_splits_fill_the_gpu(monkeypatch):
    monkeypatch.setattr(kv4, "_sm_count", lambda index: 132)
    dev = torch.device("cuda", 0)
    assert kv4.num_splits(1, 8, dev) == 64 and kv4.num_splits(64, 8, dev) == 1 and kv4.num_splits(16, 8, dev) == 4
    assert kv4.num_splits(32, 8, dev) == 2  # 512 CTAs: one wave of 528 slots, not 768 in two


def test_prefill_plan_compacts_the_multi_token_requests():
    qsl = torch.tensor([0, 1, 6, 7, 40], dtype=torch.int32)           # query lens 1, 5, 1, 33
    seq_lens = torch.tensor([20, 40, 3, 33], dtype=torch.int32)
    table = torch.arange(4 * 5, dtype=torch.int32).view(4, 5) + 100
    plan = kv4.PrefillPlan(qsl, seq_lens, table, 16)
    assert plan.num_requests == 2 and plan.max_q == 33 and plan.max_k == 40
    assert plan.q_range is None and plan.q_rows.tolist() == list(range(1, 6)) + list(range(7, 40))
    assert plan.cu_q.tolist() == [0, 5, 38] and plan.seqused.tolist() == [40, 33]
    assert plan.src_blocks.tolist() == [105, 106, 107, 115, 116, 117]   # 3 blocks of request 1, 3 of request 3
    assert plan.table.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert plan.valid.tolist() == [16, 16, 8, 16, 16, 1]
    # decodes first, as vLLM orders a batch: the prefill rows are one range, no gather
    plan = kv4.PrefillPlan(torch.tensor([0, 1, 2, 7, 40], dtype=torch.int32), seq_lens, table, 16)
    assert plan.q_range == (2, 40) and plan.q_rows is None and plan.cu_q.tolist() == [0, 5, 38]
    # a warm-up request longer than its block table row attends within the row (no index past it)
    plan = kv4.PrefillPlan(torch.tensor([0, 1, 2, 7, 200], dtype=torch.int32),
                           torch.tensor([20, 40, 5, 300], dtype=torch.int32), table, 16)
    assert plan.seqused.tolist() == [5, 80] and plan.max_k == 80 and plan.src_blocks.tolist()[-5:] == list(range(115, 120))


def test_attention_reference_last_rows_are_decode():
    gen = torch.Generator().manual_seed(3)
    cache, table, _ = random_batch(gen, [9, 30], nkv=2, d=64, block_size=16, layout="NHD")
    q = torch.randn(6, 4, 64, generator=gen).bfloat16()
    qsl = torch.tensor([0, 2, 6], dtype=torch.int32)
    sl = torch.tensor([9, 30], dtype=torch.int32)
    full = kv4.attention_reference(q, cache, table, sl, qsl, 0.125)
    last = kv4.decode_reference(q, cache, table, sl, qsl, 0.125)
    assert torch.equal(full[[1, 5]], last[[1, 5]]) and not last[[0, 2, 3, 4]].any()
    assert not torch.allclose(full[4], full[5])  # causal: the earlier token sees fewer keys


@pytest.mark.parametrize("qlens", [[1, 7, 1, 20], [1, 1, 7, 20]])  # prefill rows gathered / one range
def test_impl_dispatch_on_the_reference(monkeypatch, qlens):
    """The attention impl subclass routes decode-only steps to the decode kernel, mixed steps to
    decode + prefill (one plan per step for all layers) and everything else to vLLM's forward;
    with the kernels replaced by the PyTorch reference, a mixed step equals attention_reference."""
    from types import SimpleNamespace

    class FakeTriton:  # the parts of vLLM's TritonAttentionImpl the subclass uses
        num_heads, head_size, scale = 6, 64, 0.125

        def __init__(self):
            self.calls = []

        def _ensure_scale_caches(self, kv_cache):
            self.calls.append("views")

        def forward(self, layer, query, key, value, kv_cache, meta, output, output_scale=None,
                    output_block_scale=None):
            self.calls.append("vllm_forward")
            return output

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            self.calls.append("vllm_write")

    def decode_ref(q, kv, bt, sl, qsl, scale, out, splits=None, skip_multi=False):
        skips.append(skip_multi)
        last = (qsl[1:] - 1).long()
        if skip_multi:
            last = last[qsl[1:] - qsl[:-1] == 1]
        out[last] = kv4.decode_reference(q, kv, bt, sl, qsl, scale)[last].to(out.dtype)

    def prefill_ref(q, kv, plan, scale, out):
        full = kv4.attention_reference(q, kv, plan_src["bt"], plan_src["sl"], plan_src["qsl"], scale)
        rows = plan.q_rows if plan.q_range is None else torch.arange(*plan.q_range)
        out[rows] = full[rows].to(out.dtype)

    plans, skips = [], []
    monkeypatch.setattr(kv4, "write_cache", kv4.write_cache_reference)
    monkeypatch.setattr(kv4, "decode", decode_ref)
    monkeypatch.setattr(kv4, "prefill", prefill_ref)
    monkeypatch.setattr(kv4, "_flash_attn", lambda: object())
    real_plan = kv4.PrefillPlan
    monkeypatch.setattr(kv4, "PrefillPlan", lambda *a: plans.append(1) or real_plan(*a))

    gen = torch.Generator().manual_seed(11)
    nkv, d, bs = 2, 64, 16
    ctx = [30, 0, 5, 40]
    lens = [c + q for c, q in zip(ctx, qlens)]
    cache = paged_cache(16, nkv, bs, d)
    table = torch.randperm(16, generator=gen).int().view(4, 4)
    qsl = torch.tensor([0] + qlens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    plan_src = {"bt": table, "sl": sl, "qsl": qsl}
    impl = kv4._kernel_class(FakeTriton)()
    # the context before this step, then this step's K/V through the impl's cache write
    for s in range(4):
        pos = torch.arange(lens[s])
        slots = table[s, pos // bs].long() * bs + pos % bs
        k = torch.randn(lens[s], nkv, d, generator=gen).bfloat16()
        if ctx[s]:
            kv4.write_cache_reference(k[:ctx[s]], k[:ctx[s]], cache, slots[:ctx[s]])
        impl.do_kv_cache_update(None, k[ctx[s]:], k[ctx[s]:], cache, slots[ctx[s]:])
    meta = SimpleNamespace(max_query_len=max(qlens), num_actual_tokens=sum(qlens), block_table=table, seq_lens=sl,
                           query_start_loc=qsl)
    q = torch.randn(sum(qlens) + 3, 6, d, generator=gen).bfloat16()  # + CUDA-graph padding rows
    out = torch.full((q.shape[0], 6 * d), float("nan"), dtype=torch.bfloat16)
    for _ in range(2):  # two layers of one step: one plan
        impl.forward(None, q, None, None, cache, meta, out)
    ref = kv4.attention_reference(q[:sum(qlens)], cache, table, sl, qsl, 0.125)
    got = out[:sum(qlens)].view(-1, 6, d).float()
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max() and out[sum(qlens):].isnan().all()
    assert len(plans) == 1 and "vllm_forward" not in impl.calls and "vllm_write" not in impl.calls
    assert skips == [True, True]  # a mixed step's decode leaves the prefill rows to prefill()
    # decode-only step: no plan; fp8 output fusion and profiling runs: vLLM's own forward
    meta1 = SimpleNamespace(max_query_len=1, num_actual_tokens=4, block_table=table, seq_lens=sl,
                            query_start_loc=torch.arange(5, dtype=torch.int32))
    impl.forward(None, q[:4], None, None, cache, meta1, out)
    assert len(plans) == 1 and skips[-1] is False
    impl.forward(None, q, None, None, cache, meta, out, output_scale=torch.ones(1))
    impl.forward(None, q, None, None, cache, None, out)
    assert impl.calls.count("vllm_forward") == 2
