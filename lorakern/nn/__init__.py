"""Drop-in nn.Module replacements."""
from .gwq_linear import GWQLinear
from .lora_linear import LoRALinear
from .quant_linear import QuantLinear

__all__ = ["GWQLinear", "LoRALinear", "QuantLinear"]
