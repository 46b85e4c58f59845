"""Real models used by the demo, the evaluations and the benchmarks, and
quantized model directories."""
from .checkpoint import load_model, load_quantized_model, save_quantized_model
from .smollm2 import load_smollm2

__all__ = ["load_model", "load_quantized_model", "load_smollm2", "save_quantized_model"]
