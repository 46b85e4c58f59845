"""Quantization algorithms on single weights and adapters: RTN, GPTQ, outlier scores and selection, GWQ,
LoRAQuant, and the calibration statistics they use. Whole-model quantization (module swaps) is
:func:`lorakern.models.quantize_model`, a floor above :mod:`lorakern.nn`."""
from .calibration import LayerStats, calibration_windows, collect_statistics
from .gptq import gptq_quantize, inverse_hessian_diag
from .loraquant import CompressedLoRA, choose_h, compress_lora, rtn_lora, svd_reparameterize, unbias_components
from .gwq import quantize_dense, quantize_with_outliers
from .outliers import SCORES, outlier_budget, outlier_scores, select_outliers
from .rtn import quantize_rtn, quantize_sign, round_codes, rtn_params

__all__ = [
    "CompressedLoRA", "LayerStats", "choose_h", "compress_lora", "rtn_lora", "svd_reparameterize", "SCORES",
    "calibration_windows", "collect_statistics", "gptq_quantize", "inverse_hessian_diag", "outlier_budget",
    "outlier_scores", "quantize_dense", "quantize_rtn", "quantize_sign", "quantize_with_outliers", "round_codes",
    "rtn_params", "select_outliers", "unbias_components",
]
