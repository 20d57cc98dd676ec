"""ostquant_vllm: the OSTQuant checkpoint format, its numerics and the vLLM plugin "ostquant".

vLLM loads `register` through the `vllm.general_plugins` entry point (setup.py) in every
process it starts. Importing this package does not import vLLM; `register()` does, lazily.
"""
from __future__ import annotations

_registered = False


def register() -> None:
    """Register the quantization method "ostquant" with vLLM. Idempotent and cheap."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers import quantization as q

    from .config import OstQuantConfig

    if "ostquant" not in q.QUANTIZATION_METHODS or q.get_quantization_config("ostquant") is not OstQuantConfig:
        q.register_quantization_config("ostquant")(OstQuantConfig)
    from vllm.model_executor.layers import linear as L

    from .linear import OstQuantLinearMethod

    if OstQuantLinearMethod.__name__ not in L.WEIGHT_LOADER_V2_SUPPORTED:
        L.register_weight_loader_v2_supported_method(OstQuantLinearMethod)
    _registered = True
