"""Real models used by the demo, the evaluations and the benchmarks."""
from .smollm2 import load_smollm2

__all__ = ["load_smollm2"]
