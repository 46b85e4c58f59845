"""Fused projections for decoding: an attention layer's q/k/v in one quantized matmul, an MLP's gate/up in one.

At batch 1 a SmolLM2 decode step makes 211 small kernel calls; each pays a fixed cost (torch's dispatcher,
the op's Python wrapper, quantizing the activations, OpenMP's fork/join) that is several times the 576 x 576
kernel itself. The three projections of an attention layer read the same input, and so do an MLP's gate and
up projections: stacking their packed rows (the format is row-wise, docs/formats.md) gives one layer with the
same rows, so one call computes exactly what the separate calls did (the same rows, the same int8 activation
codes: bit-identical outputs). That removes 3 of the 7 calls per decoder layer.

Which layers fuse: transformers' ``LlamaAttention`` (SmolLM2, Llama, and every model that reuses it) and the
gated MLPs of the form ``down(act(gate(x)) * up(x))`` (``LlamaMLP``, ``Gemma3MLP``, ``MistralMLP``,
``Qwen2MLP``), when all their projections are lorakern :class:`~lorakern.nn.QuantLinear` /
:class:`~lorakern.nn.GWQLinear` of one bits/group size, alone or inside the
:class:`~lorakern.nn.MultiLoRALinear` of an adapter bank (:func:`lorakern.attach_adapters`; the fused projection is a
:class:`~lorakern.nn.MultiLoRASlicesLinear`, each bank over its own rows). A projection that carries another kind
of adapter, or an unquantized one, leaves its layer unfused (still correct, just not faster). The fused module keeps its class's
other attributes; only ``forward`` changes (a subclass made once per class) and the projections become one
``qkv_proj`` / ``gate_up_proj``.

:func:`unfuse_projections` gives the separate layers back (attaching an adapter to a fused projection and
saving a model do it themselves; :func:`lorakern.prepare_decode` fuses).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn

from ..formats.outliers import GWQWeight, SparseOutliers
from ..formats.quantized import QuantizedWeight
from ..nn import GWQLinear, MultiLoRALinear, MultiLoRASlicesLinear, QuantLinear
from .decode import forget_compiled_call

__all__ = ["fuse_projections", "is_fused", "unfuse_projections", "unfused"]

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """transformers' ``LlamaAttention.forward`` (5.x) with q/k/v from one fused call."""
    from transformers.models.llama.modeling_llama import (ALL_ATTENTION_FUNCTIONS, apply_rotary_pos_emb,
                                                          eager_attention_forward)
    if cache is None and "past_key_values" in kwargs:  # the argument's name before transformers 5.40
        cache = kwargs.pop("past_key_values")
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = self.qkv_proj(hidden_states).split(self.lorakern_split, dim=-1)
    query_states = q.reshape(hidden_shape).transpose(1, 2)
    key_states = k.reshape(hidden_shape).transpose(1, 2)
    value_states = v.reshape(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                eager_attention_forward)
    attn_output, attn_weights = attention_interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _mlp_forward(self, x):
    """``down(act(gate(x)) * up(x))`` with gate and up from one fused call."""
    gate, up = self.gate_up_proj(x).split(self.lorakern_split, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


@functools.cache
def _fusable_classes() -> dict[type, tuple[tuple[str, ...], str, object]]:
    """Module class -> (the projections it reads, the fused module's name, the fused forward)."""
    import importlib
    import inspect
    out = {}
    for mod, attn, mlp in (("llama", "LlamaAttention", "LlamaMLP"), ("gemma3", None, "Gemma3MLP"),
                           ("mistral", None, "MistralMLP"), ("qwen2", None, "Qwen2MLP")):
        try:
            m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
        except ImportError:
            continue
        if attn and hasattr(m, attn) and "cache" in inspect.signature(getattr(m, attn).forward).parameters:
            # the fused forward is transformers 5.x's (``cache=``, ``cache.update(..., kwargs=)``); older
            # versions keep their attention unfused
            out[getattr(m, attn)] = (_QKV, "qkv_proj", _attention_forward)
        if hasattr(m, mlp):
            out[getattr(m, mlp)] = (_GATE_UP, "gate_up_proj", _mlp_forward)
    return out


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type, forward) -> type:
    if cls not in _FUSED_CLASSES:
        name = f"Fused{cls.__name__}"
        _FUSED_CLASSES[cls] = type(name, (cls,), {
            "forward": forward, "__doc__": f"{cls.__name__} with its projections fused (lorakern.models.fuse).",
            "__module__": __name__, "__qualname__": name})
    return _FUSED_CLASSES[cls]


def __getattr__(name: str):
    """``Fused<Class>`` by name (pickle finds a fused layer's class here, in any process)."""
    for cls, (_, _, forward) in _fusable_classes().items():
        if name == f"Fused{cls.__name__}":
            return _fused_class(cls, forward)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_fused(module: nn.Module) -> bool:
    """Whether ``module`` is an attention or MLP layer :func:`fuse_projections` fused."""
    return type(module) in _FUSED_CLASSES.values()


def _stack(layers: list[nn.Module]) -> nn.Module | None:
    """One layer holding ``layers``' rows in order, or None when they cannot share a call. Projections with adapter
    banks (:class:`MultiLoRALinear`, of one model's bank) give a :class:`MultiLoRASlicesLinear` around the stacked
    bases, each bank over its own rows."""
    if any(type(l) is MultiLoRALinear for l in layers):
        ctx = next(l.context for l in layers if type(l) is MultiLoRALinear)
        if any(type(l) is MultiLoRALinear and l.context is not ctx for l in layers):
            return None
        bases = [l.base if type(l) is MultiLoRALinear else l for l in layers]
        stacked = _stack_weights(bases)
        if stacked is None:
            return None
        return MultiLoRASlicesLinear(stacked, [l.bank if type(l) is MultiLoRALinear else None for l in layers], ctx,
                                     [l.out_features for l in layers])
    return _stack_weights(layers)


def _stack_weights(layers: list[nn.Module]) -> nn.Module | None:
    """The quantized layers' rows stacked in one layer of their type, or None when they cannot share a call."""
    if not all(type(l) in (QuantLinear, GWQLinear) for l in layers):
        return None
    first = layers[0]
    if any((l.bits, l.group_size, l.in_features, l.qweight.device) != (first.bits, first.group_size,
                                                                       first.in_features, first.qweight.device)
           for l in layers):
        return None
    dense = QuantizedWeight(torch.cat([l.qweight for l in layers]), torch.cat([l.scales for l in layers]),
                            torch.cat([l.zeros for l in layers]), first.bits, first.group_size)
    bias = None
    if any(l.bias is not None for l in layers):
        bias = torch.cat([l.bias if l.bias is not None else torch.zeros(l.out_features, device=l.qweight.device)
                          for l in layers])
    if all(type(l) is QuantLinear for l in layers):
        return QuantLinear(dense, bias)
    parts = [l.weight_gwq.outliers if type(l) is GWQLinear else SparseOutliers.empty(l.out_features, l.in_features,
                                                                                       l.qweight.device)
             for l in layers]
    outliers = SparseOutliers.vstack(parts)
    return GWQLinear(GWQWeight(dense, outliers), bias)


def _split(fused_layer: nn.Module, widths: list[int], parts: list[tuple[type, bool]]) -> list[nn.Module]:
    """The separate layers back from a stacked one (rows in order; each of its original type, with a bias only
    where it had one; a slice with a bank in its :class:`MultiLoRALinear` again)."""
    if type(fused_layer) is MultiLoRASlicesLinear:
        layers = _split(fused_layer.base, widths, parts)
        return [l if lb is None else MultiLoRALinear(l, lb, fused_layer.context)
                for l, lb in zip(layers, fused_layer.banks)]
    out, n0 = [], 0
    bias = fused_layer.bias
    for width, (kind, with_bias) in zip(widths, parts):
        rows = slice(n0, n0 + width)
        dense = QuantizedWeight(fused_layer.qweight[rows].clone(), fused_layer.scales[rows].clone(),
                                fused_layer.zeros[rows].clone(), fused_layer.bits, fused_layer.group_size)
        b = bias[rows].clone() if bias is not None and with_bias else None
        if kind is GWQLinear:
            rp = fused_layer.row_ptr[n0: n0 + width + 1]
            j0, j1 = int(rp[0]), int(rp[-1])
            outliers = SparseOutliers((rp - j0).to(torch.int32), fused_layer.col_idx[j0:j1].clone(),
                                      fused_layer.values[j0:j1].clone(), (width, fused_layer.in_features))
            out.append(GWQLinear(GWQWeight(dense, outliers), b))
        else:
            out.append(QuantLinear(dense, b))
        n0 += width
    return out


def fuse_projections(model: nn.Module) -> int:
    """Fuse every attention layer's q/k/v and every gated MLP's gate/up projections of ``model`` (see the
    module docstring for which); returns how many layers were fused. Outputs are unchanged (the same rows
    through the same kernel); the model's ``forward`` and ``generate`` work as before.

    Layers with an adapter other than a bank's (:func:`lorakern.attach_adapters`), an unquantized projection, or
    projections of different bits / group sizes stay as they are. A projection's bias is kept (zeros for one without, when another has one)."""
    classes = _fusable_classes()
    count = 0
    for module in list(model.modules()):
        spec = classes.get(type(module))
        if spec is None:
            continue
        names, fused_name, forward = spec
        layers = [getattr(module, n, None) for n in names]
        if any(l is None for l in layers):
            continue
        stacked = _stack(layers)
        if stacked is None:
            continue
        module.lorakern_split = [l.out_features for l in layers]  # the forward's split
        module.lorakern_parts = [(type(b), b.bias is not None)  # what unfusing gives back
                                 for b in (l.base if type(l) is MultiLoRALinear else l for l in layers)]
        for n in names:
            delattr(module, n)
        setattr(module, fused_name, stacked)
        module.__class__ = _fused_class(type(module), forward)
        count += 1
    if count:
        forget_compiled_call(model)
    return count


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections` on every fused layer of ``model`` (or on ``model`` itself when it is a
    fused layer); returns how many layers were unfused."""
    return len(_unfuse(model))


def _unfuse(model: nn.Module) -> list[nn.Module]:
    classes = _fusable_classes()
    done = []
    for module in list(model.modules()):
        if not is_fused(module):
            continue
        base = type(module).__mro__[1]
        names, fused_name, _ = classes[base]
        parts = _split(getattr(module, fused_name), module.lorakern_split, module.lorakern_parts)
        delattr(module, fused_name)
        for n, layer in zip(names, parts):
            setattr(module, n, layer)
        del module.lorakern_split, module.lorakern_parts
        module.__class__ = base
        done.append(module)
    if done:
        forget_compiled_call(model)
    return done


@contextmanager
def unfused(model: nn.Module):
    """The model with its projections separate inside the block; the layers that were fused are fused again
    after it."""
    done = _unfuse(model)
    try:
        yield model
    finally:
        for module in done:
            fuse_projections(module)
        if done:
            forget_compiled_call(model)

