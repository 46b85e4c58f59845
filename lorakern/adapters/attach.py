"""Attach one adapter to a model's layers (LoRALinear), and take it off again."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..nn.lora_linear import LoRALinear
from .peft_io import LoraAdapter

__all__ = ["apply_adapter", "attach_adapter", "detach_adapter"]


def _layers(adapter) -> dict:
    if isinstance(adapter, LoraAdapter):
        return adapter.layers
    if isinstance(adapter, dict):
        return adapter
    raise TypeError(f"expected a LoraAdapter or a dict of module name -> layer, got {type(adapter).__name__}")


def attach_adapter(model: nn.Module, adapter, dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Replace each adapted module of ``model`` by a :class:`LoRALinear` around it.

    ``adapter`` is a :class:`LoraAdapter` (floating point; stored in ``dtype``) or a dict
    ``{module name: LoraLayer | CompressedLoRA}`` (e.g. from
    :func:`~lorakern.adapters.load_compressed_adapter`). Module names are relative to
    ``model`` (PEFT's names without ``base_model.model.``). Returns the replaced
    modules, for :func:`detach_adapter`. Every name is checked before anything changes.
    """
    layers = _layers(adapter)
    targets = {}
    for name, layer in layers.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module {name!r} (adapter for another model?)") from None
        if isinstance(mod, LoRALinear):
            raise ValueError(f"{name} already carries an adapter; detach it first")
        if not hasattr(mod, "in_features"):
            raise ValueError(f"{name} is a {type(mod).__name__}, not a linear layer")
        targets[name] = (mod, layer)
    wrapped = {}
    for name, (mod, layer) in targets.items():
        wrapped[name] = LoRALinear(mod, layer, dtype=dtype)  # validates shapes before any swap
    old = {}
    for name, new in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old[name] = getattr(parent, child)
        setattr(parent, child, new)
    return old


def detach_adapter(model: nn.Module, old: dict[str, nn.Module]) -> None:
    """Undo :func:`attach_adapter` (``old`` is what it returned)."""
    for name, mod in old.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod)


@contextmanager
def apply_adapter(model: nn.Module, adapter, dtype: torch.dtype = torch.float32):
    """``with apply_adapter(model, adapter): ...`` runs the model with the adapter attached."""
    old = attach_adapter(model, adapter, dtype)
    try:
        yield model
    finally:
        detach_adapter(model, old)


