"""KV4 where vLLM's own `int4_per_token_head` cache is not in use (the CPU backend).

Hook: vLLM's Attention.__init__ builds `layer.impl` and then calls the quant config's
`get_quant_method(attention_layer, prefix)` (`_init_kv_cache_quant`, 0.26 and 0.32 alike).
`OstQuantConfig.get_quant_method` calls `install(layer, ...)` there, which swaps the impl's class
for a subclass whose `do_kv_cache_update` (the one place the decoder K/V reach the paged cache;
`forward` too for backends that write the cache inside it) first replaces K (after RoPE) and V by
`numerics.fake_quant_kv_int4(x, cache_dtype=model dtype)` per (token, head): exactly what
attention reads back from vLLM 0.26's int4 cache, expressed in the original basis. The cache
then holds those values in the model dtype, so prefill and decode both attend to quantized K/V,
as on the GPU. No global backend registration is touched: other models are unaffected.

- cache dtype "int4_per_token_head" (GPU, Triton backend): vLLM's cache; on Hopper our kernels
  write and decode it (kv4_attention.install), elsewhere vLLM's own path runs.
- cache dtype "auto"/float dtypes: emulated (CPU; also works on GPU, at full KV memory).
- any other cache dtype (fp8...) with a kv_bits=4 checkpoint: refused, it would double-quantize.
"""
from __future__ import annotations

import logging

from .format import CheckpointError, QuantFormat
from .numerics import fake_quant_kv_int4
from .ops import count

logger = logging.getLogger("vllm.ostquant")  # under vLLM's logger: its handler, level and format

NATIVE = "int4_per_token_head"
EMULATED_OK = ("auto", "bfloat16", "float16", "float32", "half", "float")
_CLASSES: dict[type, type] = {}


def _fq(x, cache_dtype):
    if x is None:
        return None
    return fake_quant_kv_int4(x, cache_dtype=cache_dtype)


def _kv4_class(base: type) -> type:
    if base in _CLASSES:
        return _CLASSES[base]

    class KV4Emulated(base):  # type: ignore[misc, valid-type]
        ostquant_kv4 = True

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping, *args, **kwargs):
            count("kv4_emulated")
            return super().do_kv_cache_update(layer, _fq(key, key.dtype), _fq(value, value.dtype),
                                              kv_cache, slot_mapping, *args, **kwargs)

        def forward(self, layer, query, key, value, *args, **kwargs):
            backend = getattr(layer, "attn_backend", None)
            if getattr(backend, "forward_includes_kv_cache_update", False) and key is not None:
                count("kv4_emulated")
                key, value = _fq(key, key.dtype), _fq(value, value.dtype)
            return super().forward(layer, query, key, value, *args, **kwargs)

    KV4Emulated.__name__ = KV4Emulated.__qualname__ = f"OstQuantKV4{base.__name__}"
    _CLASSES[base] = KV4Emulated
    return KV4Emulated


def install(layer, fmt: QuantFormat, prefix: str = "") -> bool:
    """Make `layer` (a vLLM Attention) see 4-bit K/V when the checkpoint says kv_bits == 4.
    Idempotent (vLLM asks the quant config again after loading). Returns whether it emulates."""
    if fmt.kv_bits >= 16:
        return False
    if fmt.kv_bits != 4:
        raise CheckpointError(f"quantization_config.kv_bits={fmt.kv_bits}: vLLM serves kv_bits 4 or 16 only")
    impl = getattr(layer, "impl", None)
    if impl is None or getattr(impl, "ostquant_kv4", False):
        return impl is not None
    kv_dtype = str(getattr(layer, "kv_cache_dtype", "auto"))
    if kv_dtype == NATIVE:
        from . import kv4_attention

        kv4_attention.install(layer, prefix)
        return False
    if kv_dtype not in EMULATED_OK:
        raise CheckpointError(f"{prefix}: the checkpoint has kv_bits=4 (vLLM's {NATIVE} numerics) but the "
                              f"KV cache dtype is {kv_dtype!r}; use --kv-cache-dtype {NATIVE} (GPU) or auto")
    if layer.head_size & (layer.head_size - 1):
        raise CheckpointError(f"{prefix}: kv_bits=4 needs a power-of-two head size, got {layer.head_size}")
    if not hasattr(impl, "do_kv_cache_update") and not getattr(
            getattr(layer, "attn_backend", None), "forward_includes_kv_cache_update", False):
        raise CheckpointError(f"{prefix}: attention backend {type(impl).__name__} has no KV-cache write hook")
    impl.__class__ = _kv4_class(type(impl))
    logger.debug("ostquant: %s emulates the int4 KV cache in %s", prefix, type(impl).__name__)
    return True
