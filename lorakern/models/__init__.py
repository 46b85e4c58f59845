"""Whole models: quantizing one (module swaps above :mod:`lorakern.nn`), quantized model directories,
and the real model the demo, evaluations and benchmarks use."""
from .checkpoint import load_model, load_quantized_model, save_quantized_model
from .decode import prepare_decode
from .fuse import fuse_projections, unfuse_projections
from .native import disable_native_decode, enable_native_decode, native_decode_layers
from .quantize import METHODS, QuantConfig, quantize_model
from .builtin import BUILTIN_MODELS, load_builtin
from .gemma3 import load_gemma3
from .smollm2 import load_smollm2

__all__ = ["BUILTIN_MODELS", "METHODS", "QuantConfig", "disable_native_decode", "enable_native_decode", "fuse_projections", "load_builtin", "load_gemma3", "load_model", "load_quantized_model", "load_smollm2", "native_decode_layers", "prepare_decode", "quantize_model",
           "save_quantized_model", "unfuse_projections"]
