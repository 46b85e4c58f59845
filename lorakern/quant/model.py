"""Whole-model quantization: replace the Linear layers of a model by QuantLinear."""
from __future__ import annotations

import fnmatch
import logging

from torch import nn
from tqdm.auto import tqdm

from ..formats.packing import SUPPORTED_GROUP_SIZES

__all__ = ["quantize_model"]

log = logging.getLogger("lorakern")


def _skipped(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatch(name, p) for p in patterns)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, skip=("lm_head",),
                   method: str = "rtn", progress: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`QuantLinear`.

    Args:
        model: any module, e.g. a Hugging Face causal LM.
        bits: 2, 3, 4 or 8 (round to nearest).
        group_size: 32, 64 or 128. A layer whose in_features is not a multiple
            of it uses the largest supported group size that divides in_features
            (SmolLM2's 576 gets 64 when 128 is asked); a layer with none is kept.
        skip: module names or glob patterns left in full precision
            (``"lm_head"`` matches ``model.lm_head`` too).
        method: "rtn" (round to nearest); more methods come with GPTQ and GWQ.
        progress: show a progress bar.

    Returns the model. ``model.lorakern_quantization`` records what was done:
    ``{"bits", "group_size", "method", "layers": {name: group_size}, "kept": [names]}``.
    """
    from ..nn.quant_linear import QuantLinear  # nn imports quant: import here

    if method != "rtn":
        raise ValueError(f"unknown quantization method {method!r} (available: 'rtn')")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]
    record = {"bits": bits, "group_size": group_size, "method": method, "layers": {}, "kept": []}
    for name, lin in tqdm(targets, desc=f"quantize {bits}-bit", disable=not progress, leave=False):
        g = next((g for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True)
                  if g <= group_size and lin.in_features % g == 0), None)
        if g is None:
            log.warning("lorakern: keeping %s in full precision (in_features=%d)", name, lin.in_features)
            record["kept"].append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(lin, bits, g))
        record["layers"][name] = g
    model.lorakern_quantization = record
    return model
