"""The 4-bit KV cache on Hopper: our CUDA kernels on vLLM 0.26's `int4_per_token_head` paged cache.

vLLM's own path (TritonAttentionImpl + vllm/v1/attention/ops/int4_per_token_head.py) rotates K, V
and Q with a chain of small PyTorch/hadacore ops per layer and step, then runs a Triton kernel
that does the int4 dot products on CUDA cores; it decodes slower than bf16 (issue 7). Here the
same cache bytes are written and read by csrc/kv4_attention.cu:
- write: one kernel per layer and step (RHT in registers, quantize, pack, scale word);
- decode: split-K tensor-core attention with the RHT of Q and the inverse RHT of the output fused;
- prefill and chunked prefill (requests with several query tokens): the context dequantized to bf16
  in the original basis (one kernel), then vLLM's FlashAttention-3.

`install(layer, prefix)` is called from the quantization config's attention hook (as kv_cpu is)
and swaps the Triton impl's class for a subclass; nothing in vLLM is patched or registered
globally. fp8 output fusion, cascade attention and features Llama does not use (ALiBi, sliding
window, sinks, soft cap) go to vLLM's Triton path, which reads the same bytes.

Numerics are numerics.fake_quant_kv_int4's (what calibration trains against): the write kernel
produces exactly write_cache_reference's bytes; decode computes attention_reference's math with
bf16 Q, fp16 P * v_scale and fp32 accumulation; prefill attends to exactly the fake-quantized
K/V (bf16), like the calibrated model. OSTQUANT_KV4_ATTENTION=vllm keeps vLLM's path.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from . import kernels, numerics
from .kernels import _lib
from .ops import count

logger = logging.getLogger("vllm.ostquant")  # under vLLM's logger: its handler, level and format

HEAD_SIZES = (64, 128)
MAX_GROUP = 16          # query heads per KV head the decode kernel takes (m16n8k16 rows)
CTAS_PER_SM = 4  # decode kernel occupancy (__launch_bounds__(128, 4) for groups <= 8)
MAX_SPLITS = 64


def record_bytes(head_size: int) -> int:
    """Bytes per (slot, kv head): K nibbles, K scale, V nibbles, V scale."""
    return 2 * (head_size // 2 + 4)


# ---------------------------------------------------------------------------------------------
# PyTorch reference (CPU tests; what the GPU tests compare the kernels against)
# ---------------------------------------------------------------------------------------------
def _slot_index(slot_mapping: torch.Tensor, block_size: int):
    slot = slot_mapping.long()
    return slot // block_size, slot % block_size


def write_cache_reference(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, nkv, D] (model dtype) into kv_cache [blocks, nkv, block_size, 2*(D/2+4)] uint8."""
    d = key.shape[-1]
    keep = slot_mapping >= 0
    blk, pos = _slot_index(slot_mapping[keep], kv_cache.shape[2])
    for half, x in enumerate((key[keep], value[keep])):
        y = numerics.rht(x.float()).to(x.dtype).float()
        q, zero, read_scale = numerics.int4_kv_quantize(y)
        q = q.to(torch.uint8)
        packed = q[..., 0::2] | (q[..., 1::2] << 4)                                   # [t, nkv, D/2]
        word = read_scale.view(torch.int32) | zero.to(torch.int32)                     # [t, nkv, 1]
        rec = torch.cat([packed, word.contiguous().view(torch.uint8)], dim=-1)         # [t, nkv, D/2+4]
        off = half * (d // 2 + 4)
        kv_cache[blk, :, pos, off:off + d // 2 + 4] = rec


def read_cache(kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int, head_size: int):
    """Dequantized (rotated-basis) K, V [seq_len, nkv, D] float32 of one sequence."""
    d = head_size
    bs = kv_cache.shape[2]
    tok = torch.arange(seq_len, device=kv_cache.device)
    rec = kv_cache[block_row[tok // bs].long(), :, tok % bs]                            # [L, nkv, 2*(D/2+4)]
    out = []
    for half in range(2):
        r = rec[..., half * (d // 2 + 4):(half + 1) * (d // 2 + 4)]
        lo, hi = (r[..., :d // 2] & 15).float(), (r[..., :d // 2] >> 4).float()
        levels = torch.stack([lo, hi], dim=-1).reshape(*r.shape[:-1], d)
        word = r[..., d // 2:].contiguous().view(torch.int32)
        zero = (word & 15).float()
        scale = (word & -16).view(torch.float32)
        out.append((levels - zero) * scale)
    return out[0], out[1]


def attention_reference(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor, softmax_scale: float,
                        last_only: bool = False) -> torch.Tensor:
    """Causal attention of every query token (a request's L tokens are the last L of its seq_lens)
    over the cached K/V, float32 [T, Hq, D], in the rotated basis as vLLM computes it: Q rotated and
    rounded to bf16, scale / D, the output rotated back. `last_only`: only each request's last token
    (decode), other rows zero."""
    t, hq, d = query.shape
    nkv = kv_cache.shape[1]
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=query.device)
    qsl = query_start_loc.tolist()
    for s, n in enumerate(seq_lens.tolist()):
        lq = qsl[s + 1] - qsl[s]
        if lq == 0 or n == 0:
            continue
        k, v = read_cache(kv_cache, block_table[s], n, d)                              # [L, nkv, D]
        rows = range(qsl[s + 1] - 1, qsl[s + 1]) if last_only else range(qsl[s], qsl[s + 1])
        for i in rows:
            visible = n - (qsl[s + 1] - 1 - i)
            q = numerics.rht(query[i].float()).to(query.dtype).float().view(nkv, hq // nkv, d)
            sc = torch.einsum("hgd,lhd->hgl", q, k[:visible]) * (softmax_scale / d)
            o = torch.einsum("hgl,lhd->hgd", torch.softmax(sc, dim=-1), v[:visible]).reshape(hq, d)
            out[i] = numerics.rht(o, inverse=True) / d
    return out


def decode_reference(query, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale) -> torch.Tensor:
    """attention_reference of each request's last query token (what `decode` computes)."""
    return attention_reference(query, kv_cache, block_table, seq_lens, query_start_loc, softmax_scale,
                               last_only=True)


# ---------------------------------------------------------------------------------------------
# CUDA kernels (csrc/kv4_attention.cu in the plugin's kernel library)
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _signs(d: int, device: str) -> torch.Tensor:
    return numerics.rht_signs(d).to(torch.float32).to(device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _p(t: torch.Tensor | None):
    return None if t is None else kernels._ptr(t)


def _cache_strides(kv_cache: torch.Tensor, head_size: int) -> tuple[int, int, int]:
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4 or kv_cache.shape[-1] != record_bytes(head_size):
        raise ValueError(f"not an int4_per_token_head cache for head size {head_size}: "
                         f"{kv_cache.dtype} {tuple(kv_cache.shape)}")
    sb, sh, ss, sc = kv_cache.stride()
    if sc != 1 or (sb | sh | ss) % 8 or kv_cache.data_ptr() % 8:
        raise ValueError(f"int4 KV cache strides {kv_cache.stride()} are not 8-byte records")
    return sb, ss, sh


def write_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """write_cache_reference on the GPU (one kernel for K and V of all tokens)."""
    t, nkv, d = key.shape
    t = min(t, slot_mapping.shape[0])
    if key.stride(-1) != 1 or value.stride(-1) != 1 or key.dtype != torch.bfloat16 or value.dtype != torch.bfloat16:
        raise ValueError("write_cache: bf16 key/value with a contiguous head dim")
    cb, cs, ch = _cache_strides(kv_cache, d)
    sm = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    rc = _lib.load().ostq_kv4_write(_p(key), _p(value), _p(kv_cache), _p(sm), t, nkv, d, key.stride(0),
                                    key.stride(1), value.stride(0), value.stride(1), cb, cs, ch, kv_cache.shape[2],
                                    _p(_signs(d, str(key.device))), kernels._stream(key.device))
    _lib.check(rc, "kv4 cache write")


def num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Context splits per (sequence, kv head): as many CTAs as fit on the GPU at once, never more
    (a second, partial wave would cost a whole wave's time). Depends on the batch only (a CUDA graph
    is captured per batch size); the kernel shortens splits for short contexts."""
    slots = _sm_count(device.index or 0) * CTAS_PER_SM
    ctas = num_seqs * num_kv_heads
    if 2 * ctas >= slots:
        return 1
    return min(MAX_SPLITS, slots // ctas)


def decode(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
           query_start_loc: torch.Tensor, softmax_scale: float, out: torch.Tensor, splits: int | None = None,
           skip_multi: bool = False) -> None:
    """Decode attention into out [T, Hq, D] (bf16): the last query token of each request attends to
    its seq_lens cached tokens (its own K/V already written). Rows of other tokens are untouched.
    `skip_multi`: requests with several query tokens are skipped too (the prefill path computes them)."""
    _, hq, d = query.shape
    nkv = kv_cache.shape[1]
    num_seqs = query_start_loc.shape[0] - 1
    if query.stride(-1) != 1 or out.stride(-1) != 1 or query.dtype != torch.bfloat16 or out.dtype != torch.bfloat16:
        raise ValueError("decode: bf16 query/out with a contiguous head dim")
    for name, x in (("block_table", block_table), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if x.dtype != torch.int32:
            raise ValueError(f"decode: {name} must be int32, got {x.dtype}")
    cb, cs, ch = _cache_strides(kv_cache, d)
    splits = splits or num_splits(num_seqs, nkv, query.device)
    part_o = part_ml = counters = None
    if splits > 1:
        part_o = torch.empty(num_seqs * hq * splits * d, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(num_seqs * hq * splits * 2, dtype=torch.float32, device=query.device)
        # a counter per (sequence, kv head): the GEMMs' split-K counters (zero between kernels, one stream)
        counters = kernels._counters(query.device)
        if num_seqs * nkv > counters.numel():
            raise ValueError(f"decode: {num_seqs} sequences x {nkv} kv heads split {splits} ways need more counters")
    rc = _lib.load().ostq_kv4_decode(_p(query), query.stride(0), query.stride(1), _p(out), out.stride(0),
                                     out.stride(1), _p(kv_cache), cb, cs, ch, _p(block_table), block_table.stride(0),
                                     _p(seq_lens), _p(query_start_loc), num_seqs, nkv, hq // nkv, d, kv_cache.shape[2],
                                     float(softmax_scale), _p(_signs(d, str(query.device))), _p(part_o), _p(part_ml),
                                     _p(counters), splits, int(skip_multi), kernels._stream(query.device))
    _lib.check(rc, "kv4 decode attention")


def dequantize_blocks(kv_cache: torch.Tensor, src_blocks: torch.Tensor, head_size: int,
                      valid: torch.Tensor | None = None):
    """(K, V) bf16 [len(src_blocks), block_size, nkv, D] in the original basis: each value is
    numerics.fake_quant_kv_int4's (calibration's) for the token, FlashAttention's paged layout.
    `valid` [len(src_blocks)] int32: slots at or past it are written as zeros (default: none)."""
    nb, bs, nkv = src_blocks.numel(), kv_cache.shape[2], kv_cache.shape[1]
    k = torch.empty(nb, bs, nkv, head_size, dtype=torch.bfloat16, device=kv_cache.device)
    v = torch.empty_like(k)
    cb, cs, ch = _cache_strides(kv_cache, head_size)
    src = src_blocks.to(torch.int32).contiguous()
    if valid is None:
        valid = torch.full((nb,), bs, dtype=torch.int32, device=kv_cache.device)
    rc = _lib.load().ostq_kv4_dequant(_p(kv_cache), cb, cs, ch, _p(src), _p(valid.to(torch.int32).contiguous()), nb,
                                      nkv, head_size, bs, _p(k), _p(v), _p(_signs(head_size, str(kv_cache.device))),
                                      kernels._stream(kv_cache.device))
    _lib.check(rc, "kv4 dequantize")
    return k, v


class PrefillPlan:
    """Which requests of a batch have more than one query token, and a compact paged layout of their
    contexts; built once per step (one host sync) and shared by all layers."""

    def __init__(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                 block_size: int):
        # A real request fits its block table row (max_model_len); vLLM's warm-up runs can schedule one
        # that does not (--max-num-seqs 1: all max_num_batched_tokens in one request) and discard the
        # output: such a request attends to what its row covers, so nothing is read past the table.
        cap = block_table.shape[1] * block_size
        qsl, sl = query_start_loc.tolist(), [min(n, cap) for n in seq_lens.tolist()]
        reqs = [s for s in range(len(sl)) if qsl[s + 1] - qsl[s] > 1]
        qlens = [qsl[s + 1] - qsl[s] for s in reqs]
        nblk = [-(-sl[s] // block_size) for s in reqs]
        self.max_q, self.max_k = max(qlens, default=0), max((sl[s] for s in reqs), default=0)
        width = max(nblk, default=1)
        dev = block_table.device
        # the usual batch (vLLM puts decodes first): the prefill rows are one range, read and written in
        # place; otherwise q_rows lists them (gathered before FlashAttention, scattered after)
        consecutive = bool(reqs) and reqs == list(range(reqs[0], reqs[-1] + 1))
        self.q_range = (qsl[reqs[0]], qsl[reqs[-1] + 1]) if consecutive else None
        self.q_rows = None if consecutive else torch.tensor(
            [r for s in reqs for r in range(qsl[s], qsl[s + 1])], dtype=torch.long).to(dev)
        self.cu_q = torch.tensor([0] + qlens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        self.seqused = torch.tensor([sl[s] for s in reqs], dtype=torch.int32).to(dev)
        table, src_r, src_c, valid, used = torch.zeros(len(reqs), width, dtype=torch.int32), [], [], [], 0
        for i, (s, n) in enumerate(zip(reqs, nblk)):
            table[i, :n] = torch.arange(used, used + n, dtype=torch.int32)
            src_r += [s] * n
            src_c += list(range(n))
            valid += [min(block_size, sl[s] - j * block_size) for j in range(n)]
            used += n
        self.table = table.to(dev)
        self.valid = torch.tensor(valid, dtype=torch.int32).to(dev)
        self.src_blocks = block_table[torch.tensor(src_r, dtype=torch.long).to(dev),
                                      torch.tensor(src_c, dtype=torch.long).to(dev)]
        self.num_requests = len(reqs)


_PLAN: list = [None, None]  # (attention metadata object, its plan): one step's


def prefill_plan(attn_metadata, block_size: int) -> PrefillPlan:
    if _PLAN[0] is not attn_metadata:
        _PLAN[:] = [attn_metadata, PrefillPlan(attn_metadata.query_start_loc, attn_metadata.seq_lens,
                                               attn_metadata.block_table, block_size)]
    return _PLAN[1]


@functools.lru_cache(maxsize=None)
def _flash_attn():
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def prefill(query: torch.Tensor, kv_cache: torch.Tensor, plan: PrefillPlan, softmax_scale: float,
            out: torch.Tensor) -> None:
    """Attention of the plan's requests (every query token, causal): FlashAttention-3 over their
    contexts dequantized to bf16 in the original basis, i.e. over calibration's fake-quantized K/V."""
    if plan.num_requests == 0:
        return
    k, v = dequantize_blocks(kv_cache, plan.src_blocks, query.shape[-1], plan.valid)
    args = dict(max_seqlen_q=plan.max_q, cu_seqlens_q=plan.cu_q, max_seqlen_k=plan.max_k, seqused_k=plan.seqused,
                softmax_scale=softmax_scale, causal=True, block_table=plan.table, fa_version=3)
    if plan.q_range is not None:
        a, b = plan.q_range
        _flash_attn()(query[a:b], k, v, out=out[a:b], **args)
    else:
        out.index_copy_(0, plan.q_rows, _flash_attn()(query.index_select(0, plan.q_rows), k, v, **args))


# ---------------------------------------------------------------------------------------------
# the attention hook
# ---------------------------------------------------------------------------------------------
_CLASSES: dict[type, type] = {}


def _kernel_class(base: type) -> type:
    if base in _CLASSES:
        return _CLASSES[base]

    class KV4Kernels(base):  # type: ignore[misc, valid-type]
        ostquant_kv4 = True

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping, *args, **kwargs):
            if key.dtype != torch.bfloat16 or kv_cache.numel() == 0:
                return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping, *args, **kwargs)
            self._ensure_scale_caches(kv_cache)  # vLLM's one-time scale views (it fills them once)
            count("kv4_write")
            write_cache(key, value, kv_cache, slot_mapping)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            mixed = attn_metadata is not None and attn_metadata.max_query_len > 1
            if (attn_metadata is None or output_scale is not None or output_block_scale is not None
                    or query.dtype != torch.bfloat16 or (mixed and _flash_attn() is None)
                    or getattr(attn_metadata, "mm_prefix_range_tensor", None) is not None
                    or getattr(attn_metadata, "use_cascade", False)):
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                       output_scale=output_scale, output_block_scale=output_block_scale)
            self._ensure_scale_caches(kv_cache)
            n = attn_metadata.num_actual_tokens
            out = output[:n].view(n, self.num_heads, self.head_size)
            q = query[:n]
            # the requests with one query token (all of a decode batch); then every token of the
            # requests with several (prefill, chunked prefill)
            count("kv4_decode")
            decode(q, kv_cache, attn_metadata.block_table, attn_metadata.seq_lens, attn_metadata.query_start_loc,
                   self.scale, out, skip_multi=mixed)
            if mixed:
                count("kv4_prefill")
                prefill(q, kv_cache, prefill_plan(attn_metadata, kv_cache.shape[2]), self.scale, out)
            return output

    KV4Kernels.__name__ = KV4Kernels.__qualname__ = f"OstQuantKV4Kernels{base.__name__}"
    _CLASSES[base] = KV4Kernels
    return KV4Kernels


def unsupported(impl, layer) -> str | None:
    """Why our kernels cannot serve this attention layer (None: they can)."""
    if os.environ.get("OSTQUANT_KV4_ATTENTION", "ostquant") == "vllm":
        return "OSTQUANT_KV4_ATTENTION=vllm"
    if not hasattr(impl, "_ensure_scale_caches"):
        return f"backend {type(impl).__name__} is not vLLM's Triton backend"
    d = getattr(impl, "head_size", None)
    if d not in HEAD_SIZES:
        return f"head size {d} (kernels: {HEAD_SIZES})"
    if not 1 <= impl.num_heads // impl.num_kv_heads <= MAX_GROUP:
        return f"{impl.num_heads // impl.num_kv_heads} query heads per KV head (max {MAX_GROUP})"
    if (impl.alibi_slopes is not None or tuple(impl.sliding_window) != (-1, -1) or impl.logits_soft_cap
            or impl.sinks is not None or getattr(impl, "attn_type", "decoder") != "decoder"):
        return "ALiBi, sliding window, soft cap, sinks or a non-decoder attention"
    return kernels.unavailable_reason()


@functools.lru_cache(maxsize=None)
def _log_once(msg: str) -> None:
    logger.info(msg)


def install(layer, prefix: str = "") -> bool:
    """Serve `layer`'s int4_per_token_head cache with our kernels where they apply. Idempotent."""
    impl = getattr(layer, "impl", None)
    if impl is None or getattr(impl, "ostquant_kv4", False):
        return impl is not None
    why = unsupported(impl, layer)
    if why is not None:
        _log_once(f"ostquant: vLLM's own int4 KV attention serves the cache ({why})")
        return False
    impl.__class__ = _kernel_class(type(impl))
    dev = torch.device("cuda", torch.cuda.current_device())
    _signs(impl.head_size, str(dev))  # made here: no copies or allocations in graph capture
    kernels._counters(dev)
    _log_once("ostquant: the int4 KV cache is written and decoded by the ostquant Hopper kernels")
    return True
