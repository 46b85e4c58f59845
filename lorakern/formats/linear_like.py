"""What counts as a linear layer: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2 style, weight stored
``[in, out]``) and lorakern's own layers (anything with ``in_features`` / ``out_features``)."""
from __future__ import annotations

from torch import nn

__all__ = ["is_conv1d", "linear_shape", "linear_weight"]


def is_conv1d(mod: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (``y = x @ W + b`` with ``W [in, out]``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for the kernels
        return False
    return isinstance(mod, Conv1D)


def linear_shape(mod: nn.Module) -> tuple[int, int] | None:
    """``(out_features, in_features)`` of a linear-like module, or None."""
    if is_conv1d(mod):
        k, n = mod.weight.shape
        return int(n), int(k)
    if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
        return int(mod.out_features), int(mod.in_features)
    return None


def linear_weight(mod: nn.Module):
    """The weight as ``[out_features, in_features]`` (a transposed view for ``Conv1D``)."""
    return mod.weight.t() if is_conv1d(mod) else mod.weight
