"""Drop-in nn.Module replacements."""
from .gwq_linear import GWQLinear
from .quant_linear import QuantLinear

__all__ = ["GWQLinear", "QuantLinear"]
