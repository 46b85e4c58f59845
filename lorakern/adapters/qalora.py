"""QA-LoRA adapters (arXiv 2309.14717) on a quantized model: attach one unmerged, or merge it into the base's
zeros (:func:`merge_qalora_adapter`, ``lorakern merge-qalora``).

A QA-LoRA adapter is a :class:`~lorakern.adapters.LoraAdapter` whose config has PEFT's ``use_qalora=True`` and
``qalora_group_size=G``; each layer's ``A`` is ``[r, in_features / G]`` and acts on the mean of each group of G
inputs. (PEFT's files scale the pooled input by ``in_features / G`` instead; :mod:`lorakern.adapters.peft_io`
converts on load and save, so lorakern's A always means "on the mean".)
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.io import FormatError
from ..formats.lora import LoraAdapter
from ..models.fuse import is_fused, unfuse_projections
from ..nn.gwq_linear import GWQLinear
from ..nn.qalora_linear import QALoRALinear
from ..nn.quant_linear import QuantLinear
from ..nn.swap import replace_module

__all__ = ["check_qalora_config", "is_qalora", "merge_qalora_adapter", "qalora_group_size", "refuse_qalora",
           "qalora_wrappers"]


def is_qalora(adapter) -> bool:
    """Whether ``adapter`` is a :class:`LoraAdapter` with ``use_qalora`` set."""
    return isinstance(adapter, LoraAdapter) and bool(adapter.config.get("use_qalora"))


def check_qalora_config(cfg: dict, where: str) -> int | None:
    """``qalora_group_size`` of a config with ``use_qalora`` (None without). Raises FormatError if it is not a
    positive integer."""
    if not cfg.get("use_qalora"):
        return None
    G = cfg.get("qalora_group_size")
    if isinstance(G, bool) or not isinstance(G, int) or G < 1:
        raise FormatError(f"{where}: use_qalora needs a positive integer qalora_group_size, got {G!r}")
    return G


def qalora_group_size(adapter: LoraAdapter) -> int:
    """The pooling group size G of a QA-LoRA adapter."""
    return check_qalora_config(adapter.config, "the adapter")


def refuse_qalora(adapter, what: str) -> None:
    """ValueError, by name, where a QA-LoRA adapter cannot go (the multi-adapter bank, compression)."""
    if is_qalora(adapter):
        raise ValueError(f"lorakern: {what}: QA-LoRA adapters (use_qalora) are not supported here; attach one with "
                         "attach_adapter, or merge it into the base (lorakern merge-qalora)")


def qalora_wrappers(adapter: LoraAdapter, targets: dict[str, nn.Module]) -> dict[str, QALoRALinear]:
    """A :class:`QALoRALinear` around each target module (``{name: module}``) for the adapter's layer of that
    name; every shape checked before anything is returned."""
    G = qalora_group_size(adapter)
    return {name: QALoRALinear(mod, adapter.layers[name].A, adapter.layers[name].B, adapter.layers[name].scale, G)
            for name, mod in targets.items()}


def merge_qalora_adapter(model: nn.Module, adapter: LoraAdapter) -> list[str]:
    """Fold a QA-LoRA adapter into the zeros of ``model``'s quantized layers, in place: each adapted
    :class:`QuantLinear` / :class:`GWQLinear` is replaced by its merged copy (codes and scales unchanged, new
    fp16 zeros), so the model stays a plain low-bit model with no adapter cost. Returns the merged modules'
    names. Every layer is merged (and checked) before any is replaced.

    Raises:
        ValueError: not a QA-LoRA adapter, a module the model lacks or that is not a quantized layer, a group
            size other than the layer's, or a merge that does not fit fp16 zeros
            (:func:`lorakern.quant.qalora.merged_zeros`).
    """
    if not is_qalora(adapter):
        raise ValueError("lorakern: merge_qalora_adapter needs a QA-LoRA adapter (use_qalora=True in its config)")
    G = qalora_group_size(adapter)
    merged = {}
    for name, layer in adapter.layers.items():
        parent = name.rpartition(".")[0]
        try:
            if parent and is_fused(model.get_submodule(parent)):  # prepare_decode fused it: the layers back
                unfuse_projections(model.get_submodule(parent))
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"lorakern: the model has no module {name!r} (an adapter for another model?)") from None
        if not isinstance(mod, (QuantLinear, GWQLinear)):
            raise ValueError(f"lorakern: {name} is a {type(mod).__name__}; QA-LoRA merges into a quantized layer "
                             "(quantize the model with the adapter's group size first)")
        try:
            merged[name] = QALoRALinear(mod, layer.A, layer.B, layer.scale, G).merged()
        except ValueError as e:
            raise ValueError(f"lorakern: {name}: {str(e).removeprefix('lorakern: ')}") from None
    with torch.no_grad():
        for name, new in merged.items():
            replace_module(model, name, new)
    return sorted(merged)
