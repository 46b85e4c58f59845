"""Replacing a submodule by name: the one module-swap helper every model transformation uses."""
from __future__ import annotations

from torch import nn

__all__ = ["replace_module"]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model.get_submodule(name)`` was; returns the module it replaced.

    Raises:
        AttributeError: ``model`` has no module ``name``.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
