"""Drop-in nn.Module replacements."""
from .gwq_linear import GWQLinear
from .lora_linear import LoRALinear
from .mola_linear import MoLALinear
from .multi_lora_linear import MultiLoRAContext, MultiLoRALinear
from .quant_embedding import QuantEmbedding
from .quant_linear import QuantLinear
from .swap import replace_module

__all__ = ["GWQLinear", "LoRALinear", "MoLALinear", "MultiLoRAContext", "MultiLoRALinear", "QuantEmbedding", "QuantLinear", "replace_module"]
