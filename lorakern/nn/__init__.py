"""Drop-in nn.Module replacements."""
from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
