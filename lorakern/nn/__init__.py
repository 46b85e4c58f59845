"""Drop-in nn.Module replacements."""
from .gwq_linear import GWQLinear
from .lora_linear import LoRALinear
from .mola_linear import MoLALinear
from .multi_lora_linear import MultiLoRAContext, MultiLoRALinear, MultiLoRASlicesLinear
from .qalora_linear import QALoRALinear
from .quant_embedding import QuantEmbedding
from .quant_linear import QuantLinear
from .swap import replace_module

#: the modules that carry adapters around a linear layer (an adapter never wraps one of them again)
ADAPTER_MODULES = (LoRALinear, MultiLoRALinear, MultiLoRASlicesLinear, MoLALinear, QALoRALinear)

__all__ = ["ADAPTER_MODULES", "GWQLinear", "LoRALinear", "MoLALinear", "MultiLoRAContext", "MultiLoRALinear", "MultiLoRASlicesLinear", "QALoRALinear", "QuantEmbedding", "QuantLinear", "replace_module"]
