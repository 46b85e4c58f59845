"""AWQ on a whole model: search each input-sharing group's scales (:mod:`lorakern.quant.awq`) and fold them
into the model, so the quantized layers see ``W diag(s)`` and their inputs arrive divided by ``s`` at no cost
at run time (llm-awq's ``apply_scale``).

Groups, found in every decoder layer that has ``self_attn`` and ``mlp`` with Llama-style projection names
(Llama, SmolLM2, Mistral, Qwen2, Gemma 2/3):

* ``q_proj, k_proj, v_proj``  after ``input_layernorm``;
* ``gate_proj, up_proj``      after ``pre_feedforward_layernorm`` (Gemma 2/3) or ``post_attention_layernorm``;
* ``down_proj``               after ``up_proj`` (its rows divided by s: ``act(gate) * up`` is divided by s);
* ``o_proj``                  after ``v_proj`` only when they have the same width (no grouped-query
  attention), as in llm-awq; with GQA (SmolLM2, Gemma 3) o_proj gets no scales, only the clipping search.

An RMSNorm folds ``1/s`` into its weight: ``w / s`` for Llama's ``x_hat * w``; ``(1 + w) / s - 1`` for Gemma's
``x_hat * (1 + w)``. Every fold is checked on a random probe (the producer's new output must equal the old one
divided by s); a producer that fails the check is restored and its group keeps ``s = 1``, with a warning.
Layers in no group are still quantized (with the clipping search when the dense quantizer is "awq").
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..quant.awq import search_scales
from ..quant.calibration import LayerStats

__all__ = ["AWQGroup", "apply_awq", "awq_groups"]

log = logging.getLogger("lorakern")


@dataclasses.dataclass
class AWQGroup:
    """Linear layers ``consumers`` (module names) that read the output of ``producer`` (a module name), which
    is an RMSNorm (``kind`` "norm") or a linear layer whose rows feed them (``kind`` "linear")."""
    producer: str
    kind: str
    consumers: list


def awq_groups(model: nn.Module) -> list[AWQGroup]:
    """The scale groups of ``model``'s decoder layers (module docstring), in forward order."""
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for layer in model.modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not isinstance(attn, nn.Module) or not isinstance(mlp, nn.Module):
            continue
        lin = lambda mod, n: getattr(mod, n, None) if isinstance(getattr(mod, n, None), nn.Linear) else None  # noqa: E731
        q, k, v, o = (lin(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        gate, up, down = (lin(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        ln1 = getattr(layer, "input_layernorm", None)
        ln2 = getattr(layer, "pre_feedforward_layernorm", None) or getattr(layer, "post_attention_layernorm", None)
        if q is not None and k is not None and v is not None and isinstance(ln1, nn.Module):
            groups.append(AWQGroup(names[ln1], "norm", [names[q], names[k], names[v]]))
        if v is not None and o is not None and v.out_features == o.in_features:
            groups.append(AWQGroup(names[v], "linear", [names[o]]))
        if gate is not None and up is not None and isinstance(ln2, nn.Module):
            groups.append(AWQGroup(names[ln2], "norm", [names[gate], names[up]]))
        if up is not None and down is not None and up.out_features == down.in_features:
            groups.append(AWQGroup(names[up], "linear", [names[down]]))
    return groups


def apply_awq(model: nn.Module, targets: dict, stats: dict, bits: int, group_size: int,
              progress_bar=None) -> tuple[dict, dict]:
    """Search and fold AWQ scales into ``model`` in place.

    Args:
        model: the float model (its norms and linear weights are changed; the function it computes is not).
        targets: ``{name: group size}`` of the layers that will be quantized (the search's error is measured
            on these; a group with none is left alone).
        stats: ``{name: LayerStats}`` with ``hessian`` and ``act_mean`` (not changed).
        bits, group_size: the quantization to come (``targets`` may give a smaller group size per layer).
        progress_bar: a callable wrapping an iterable (tqdm), or None.

    Returns:
        ``(stats, record)``: the statistics of the scaled layers (a new dict: Hessians ``H / (s s^T)``,
        gradients ``g / s`` by column and ``g * s`` by row where a producer's rows were divided, activation
        means ``/ s``) and ``{producer: {"alpha", "consumers", "rtn_error", "awq_error"}}`` (errors summed over
        the consumers on the calibration inputs; "skipped" with the reason where nothing was folded).
    """
    stats = dict(stats)
    record = {}
    groups = awq_groups(model)
    for grp in (progress_bar(groups) if progress_bar else groups):
        quant = [c for c in grp.consumers if c in targets]
        st = next((stats[c] for c in quant if c in stats and stats[c] is not None
                   and stats[c].hessian is not None and getattr(stats[c], "act_mean", None) is not None), None)
        if st is None:
            record[grp.producer] = {"skipped": "no quantized consumer with calibration statistics"}
            continue
        ws = [model.get_submodule(c).weight.detach().float().cpu() for c in quant]
        g = min(targets[c] for c in quant)
        s, alpha, errors = search_scales(ws, st.hessian, st.act_mean, bits, min(g, group_size))
        entry = {"alpha": alpha, "consumers": grp.consumers, "rtn_error": errors[0], "awq_error": min(errors)}
        if alpha == 0.0:
            record[grp.producer] = entry  # s = 1: nothing to fold
            continue
        why = _fold(model, grp, s)
        if why:
            log.warning("lorakern: AWQ scales not folded into %s: %s", grp.producer, why)
            record[grp.producer] = {"skipped": why, **entry, "alpha": 0.0}
            continue
        for c in grp.consumers:
            if c in stats and stats[c] is not None:
                stats[c] = _scaled_stats(stats[c], cols=s)
        if grp.kind == "linear" and grp.producer in stats and stats[grp.producer] is not None:
            stats[grp.producer] = _scaled_stats(stats[grp.producer], rows=s)
        record[grp.producer] = entry
    return stats, record


def _fold(model: nn.Module, grp: AWQGroup, s: torch.Tensor) -> str | None:
    """Divide the producer's output by ``s`` and multiply the consumers' columns by it; None, or why not (and
    nothing changed)."""
    prod = model.get_submodule(grp.producer)
    w = getattr(prod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() not in (1, 2) or w.shape[0] != s.shape[0]:
        return f"{type(prod).__name__} has no weight of {s.shape[0]} outputs to fold into"
    dev = w.device
    sd = s.to(dev)
    K = s.shape[0]
    gen = torch.Generator().manual_seed(0)
    in_features = prod.in_features if grp.kind == "linear" else K
    probe = torch.randn(4, in_features, generator=gen).to(dev, w.dtype)
    saved = {n: t.detach().clone() for n, t in prod.named_parameters(recurse=False)}
    with torch.no_grad():
        before = prod(probe).float()
        if grp.kind == "linear":
            prod.weight.div_(sd.to(w.dtype).unsqueeze(1))
            if getattr(prod, "bias", None) is not None:
                prod.bias.div_(sd.to(w.dtype))
        elif type(prod).__name__.startswith("Gemma"):  # x_hat * (1 + w)
            prod.weight.copy_(((1 + prod.weight.float()) / sd - 1).to(w.dtype))
        else:  # x_hat * w
            prod.weight.div_(sd.to(w.dtype))
        after = prod(probe).float()
        expect = before / sd
        if not torch.allclose(after, expect, rtol=1e-4, atol=1e-5 * float(expect.abs().max())):
            for n, t in saved.items():
                getattr(prod, n).copy_(t)
            return f"{type(prod).__name__}'s output is not divided by the scales when its weight is (unknown norm)"
        for c in grp.consumers:
            lin = model.get_submodule(c)
            lin.weight.mul_(sd.to(lin.weight.dtype).unsqueeze(0))
    return None


def _scaled_stats(st: LayerStats, cols: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> LayerStats:
    """The statistics of a layer whose weight became ``W diag(cols)`` (input divided by ``cols``) or
    ``diag(1/rows) W`` (output divided by ``rows``)."""
    H, g, g2, am = st.hessian, st.grad, st.grad_sq, getattr(st, "act_mean", None)
    if cols is not None:
        c = cols.float()
        H = H / (c.unsqueeze(1) * c.unsqueeze(0)) if H is not None else None
        g = g / c.unsqueeze(0) if g is not None else None
        g2 = g2 / c.square().unsqueeze(0) if g2 is not None else None
        am = am / c if am is not None else None
    if rows is not None:
        r = rows.float()
        g = g * r.unsqueeze(1) if g is not None else None
        g2 = g2 * r.square().unsqueeze(1) if g2 is not None else None
    return dataclasses.replace(st, hessian=H, grad=g, grad_sq=g2, act_mean=am)
