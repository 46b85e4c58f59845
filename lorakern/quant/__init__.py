"""Quantization algorithms (round-to-nearest now; GPTQ and GWQ build on this)."""
from .model import quantize_model
from .rtn import quantize_rtn, quantize_sign, rtn_params

__all__ = ["quantize_model", "quantize_rtn", "quantize_sign", "rtn_params"]
