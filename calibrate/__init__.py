"""OSTQuant calibration for Llama-family models (SPEC.md): learn, fuse, quantize, export."""
__version__ = "0.1.0"
