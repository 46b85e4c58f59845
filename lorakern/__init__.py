"""lorakern: kernels for low-bit LLMs with many LoRA adapters.

CPU kernels in C++ (generic / AVX2 / AVX-512, chosen at run time), GPU kernels in
Triton, exposed as torch custom ops (``torch.ops.lorakern.*``) and drop-in
modules. Importing lorakern touches no GPU and does not need the compiled
extension until a CPU kernel is called.
"""
__version__ = "0.1.0"

from . import ops  # noqa: F401  registers torch.ops.lorakern.*
from ._native import NativeLibraryError, active_isa, available_isas, detected_isa, set_isa
from .formats import GWQWeight, QuantizedWeight, SparseOutliers, load_quantized, save_quantized
from .nn import GWQLinear, LoRALinear, MultiLoRALinear, QuantLinear
from .multilora import AdapterBank, LoRABatch
from .adapters import attach_adapters, detach_adapters
from .quant import quantize_rtn
from .models import QuantConfig, prepare_decode, quantize_model

__all__ = [
    "AdapterBank", "LoRABatch", "QuantConfig", "MultiLoRALinear", "attach_adapters", "detach_adapters",
    "GWQLinear", "GWQWeight", "LoRALinear", "NativeLibraryError", "QuantLinear", "QuantizedWeight", "SparseOutliers", "active_isa", "available_isas", "detected_isa",
    "load_quantized", "prepare_decode", "quantize_model", "quantize_rtn", "save_quantized", "set_isa",
]
