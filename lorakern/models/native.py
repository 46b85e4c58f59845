"""The native decode step: each decoder layer of a quantized Llama-family model in one C++ call per token.

A compiled SmolLM2 decode step spends most of its time outside the kernels: 121 quantized matmuls a token cost
~4.7 ms through the C ABI, while torch's dispatcher, the ops' Python wrappers, inductor's generated code around
them and dynamo's guards add ~9 ms more (issue 14's profile). Here a decoder layer is one call,
``lk_decoder_layer_step`` (C ABI, csrc/src/decoder_layer.cpp): RMSNorm, the fused q/k/v projection, the rotary
embedding, the key/value write into transformers' static cache, attention over the cached positions, the output
projection, RMSNorm, the fused gate/up projection, SiLU gating, the down projection and both residuals — the
same computation as transformers' ``LlamaDecoderLayer`` (modeling_llama.py), in fp32, with lorakern's kernels for
the projections.

It stays a drop-in for ``generate``: :func:`enable_native_decode` changes the class of each eligible decoder
layer to a subclass whose ``forward`` takes the native path when it applies and otherwise calls transformers' own
``forward`` (prefill, training, gradients, other caches, adapters attached, ``torch.compile`` tracing). The
native path applies to one new token per sequence (``hidden_states [B, 1, hidden]``, fp32, CPU, no gradient)
with transformers' ``StaticCache`` (:func:`lorakern.prepare_decode` sets it) and a boolean or additive
attention mask, or none. Layers qualify when their attention is a fused ``LlamaAttention`` and their MLP a fused
``LlamaMLP`` with SiLU (:func:`lorakern.models.fuse_projections`), every projection a
:class:`~lorakern.nn.QuantLinear` or :class:`~lorakern.nn.GWQLinear` and the norms transformers'
``LlamaRMSNorm``. The C record (``lk_decoder_layer`` in C, ``_C.DecoderLayerRecord`` in Python) holds the
tensors' addresses; it is rebuilt whenever a layer's tensors are no longer the ones it was built from.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

from .._native import native
from ..nn import GWQLinear, QuantLinear

__all__ = ["disable_native_decode", "enable_native_decode", "native_decode_layers"]


@functools.cache
def _llama():
    from transformers.models.llama import modeling_llama
    return modeling_llama


@functools.cache
def _static_layer():
    from transformers.cache_utils import StaticLayer
    return StaticLayer


def _fused_types():
    from .fuse import _FUSED_CLASSES
    m = _llama()
    return _FUSED_CLASSES.get(m.LlamaAttention), _FUSED_CLASSES.get(m.LlamaMLP)


def _eligible(layer: nn.Module) -> str | None:
    """None when ``layer`` (a decoder layer) can run natively, else the reason it cannot."""
    m = _llama()
    attn_t, mlp_t = _fused_types()
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn_t is None or type(attn) is not attn_t:
        return "its attention is not a fused LlamaAttention (fuse_projections)"
    if mlp_t is None or type(mlp) is not mlp_t:
        return "its MLP is not a fused LlamaMLP (fuse_projections)"
    for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        if type(p) not in (QuantLinear, GWQLinear):
            return f"a projection is a {type(p).__name__}, not a QuantLinear or GWQLinear (an adapter is attached?)"
        if p.qweight.device.type != "cpu":
            return "its weights are not on the CPU"
    for n in (layer.input_layernorm, layer.post_attention_layernorm):
        if type(n) is not m.LlamaRMSNorm or n.weight.dtype != torch.float32:
            return "a norm is not an fp32 LlamaRMSNorm"
    if layer.post_attention_layernorm.variance_epsilon != layer.input_layernorm.variance_epsilon:
        return "its two RMSNorms have different epsilons"
    if getattr(mlp, "config", None) is None or mlp.config.hidden_act != "silu":
        return "its MLP's activation is not SiLU"
    if attn.lorakern_split != [attn.config.num_attention_heads * attn.head_dim,
                               attn.config.num_key_value_heads * attn.head_dim,
                               attn.config.num_key_value_heads * attn.head_dim]:
        return "its q/k/v widths do not match the config's heads"
    return None


class _Record:
    """The C record of one decoder layer and the tensors it points into."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        cfg = attn.config
        projs = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        norms = (layer.input_layernorm.weight.detach().contiguous(),
                 layer.post_attention_layernorm.weight.detach().contiguous())
        self.norm_sources = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        self.norm_versions = tuple(w._version for w in self.norm_sources)
        self._keep = list(norms)
        weights, outliers, biases = [], [], []
        for p in projs:
            for name in ("qweight", "scales", "zeros"):
                if not getattr(p, name).is_contiguous():
                    raise ValueError(f"lorakern: native decode needs contiguous projection tensors ({name})")
            weights.append([p.qweight.data_ptr(), p.scales.data_ptr(), p.zeros.data_ptr(), p.out_features,
                            p.in_features, p.bits, p.group_size])
            if type(p) is GWQLinear:
                rp, ci, va = (t.contiguous() for t in (p.row_ptr, p.col_idx, p.values))
                self._keep += [rp, ci, va]
                outliers.append([rp.data_ptr(), ci.data_ptr(), va.data_ptr(), va.numel()])
            else:
                outliers.append([])
            if p.bias is not None:
                b = p.bias.detach().to(torch.float32).contiguous()
                self._keep.append(b)
                biases.append(b.data_ptr())
            else:
                biases.append(0)
        self.dims = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim,
                     mlp.gate_up_proj.out_features // 2)
        # what current() compares: each module and tensor by identity where it is stored, and every address
        checks = [(layer._modules, "self_attn", attn), (layer._modules, "mlp", mlp),
                  (layer._modules, "input_layernorm", layer.input_layernorm),
                  (layer._modules, "post_attention_layernorm", layer.post_attention_layernorm),
                  (attn._modules, "qkv_proj", attn.qkv_proj), (attn._modules, "o_proj", attn.o_proj),
                  (mlp._modules, "gate_up_proj", mlp.gate_up_proj), (mlp._modules, "down_proj", mlp.down_proj)]
        for p in projs:
            checks += [(p._buffers, n, p._buffers[n]) for n in p._buffers]
        checks += [(n._parameters, "weight", n._parameters["weight"])
                   for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        self.checks = checks
        # and the addresses: a tensor can keep its object and get new storage (``param.data = ...`` in
        # Module._apply, ``share_memory()``, ``.set_()``)
        self.pointers = [(t, t.data_ptr()) for p in projs for t in p._buffers.values() if t is not None]
        self.pointers += [(w, w.data_ptr()) for w in self.norm_sources]
        self.record = native().DecoderLayerRecord(
            list(self.dims), float(layer.input_layernorm.variance_epsilon), float(attn.scaling), norms[0].data_ptr(),
            norms[1].data_ptr(), weights, outliers, biases)

    def current(self, layer: nn.Module) -> bool:
        """Whether ``layer`` still holds the very modules and tensors (at the same addresses) the record was built
        from: dictionary lookups only (this runs once per layer and token)."""
        for d, k, v in self.checks:
            if d.get(k) is not v:
                return False
        for t, ptr in self.pointers:
            if t.data_ptr() != ptr:
                return False
        return tuple(w._version for w in self.norm_sources) == self.norm_versions


# layer -> its _Record, outside the module's state: copies and pickles of a model never carry addresses
_RECORDS: "weakref.WeakKeyDictionary[nn.Module, _Record]" = weakref.WeakKeyDictionary()


_LAST_MASK = (None, None, None)  # (mask, (B, L, version), converted): every layer of a step gets the same mask


def _key_mask(mask, B: int, L: int):
    """The attention mask as uint8 [B, L] (1 = attend), or None for no mask; False when it is of a kind the native
    path does not take."""
    if mask is None:
        return None
    global _LAST_MASK
    key = (B, L, getattr(mask, "_version", None))
    last = _LAST_MASK  # one read: another thread may replace it
    if last[0] is mask and last[1] == key:
        return last[2]
    out = _convert_mask(mask, B, L)
    _LAST_MASK = (mask, key, out)
    return out


def _convert_mask(mask, B: int, L: int):
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[0] != B or mask.shape[1] != 1 \
            or mask.shape[2] != 1 or mask.shape[3] != L or mask.device.type != "cpu":
        return False
    m = mask[:, 0, 0, :]
    if mask.dtype == torch.bool:
        return m.contiguous().view(torch.uint8)
    if mask.dtype.is_floating_point:
        return (m == 0).view(torch.uint8).contiguous()
    return False


def _native_step(layer, hidden_states, attention_mask, cache, position_embeddings):
    """The layer's output through lk_decoder_layer_step, or None when the native path does not apply."""
    if (cache is None or position_embeddings is None or not isinstance(hidden_states, torch.Tensor)
            or hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or hidden_states.dtype != torch.float32
            or hidden_states.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or layer.training):
        return None
    idx = layer.self_attn.layer_idx
    layers = getattr(cache, "layers", None)
    if layers is None or idx >= len(layers) or type(layers[idx]) is not _static_layer():
        return None
    cl = layers[idx]
    if not cl.is_initialized:
        return None
    rec = _RECORDS.get(layer)
    if rec is None or not rec.current(layer):
        if _eligible(layer) is not None:
            _RECORDS.pop(layer, None)  # do not keep replaced modules alive
            return None
        rec = _RECORDS[layer] = _Record(layer)
    B = hidden_states.shape[0]
    H, Hq, Hkv, D, _ = rec.dims
    keys, values = cl.keys, cl.values
    if (keys.dtype != torch.float32 or values.dtype != torch.float32 or keys.shape != values.shape
            or keys.device.type != "cpu" or values.device.type != "cpu"
            or keys.dim() != 4 or tuple(keys.shape[:2]) != (B, Hkv) or keys.shape[3] != D
            or not keys.is_contiguous() or not values.is_contiguous() or hidden_states.shape[2] != H):
        return None
    L = keys.shape[2]
    pos = int(cl.cumulative_length)
    if pos >= L:
        return None  # transformers raises its own error for a full static cache
    cos, sin = position_embeddings
    if cos.shape != (B, 1, D) or sin.shape != (B, 1, D) or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        return None
    km = _key_mask(attention_mask, B, L)
    if km is False:
        return None
    x = hidden_states.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty_like(x)
    native().decoder_layer_step(rec.record, x.data_ptr(), B, cos.data_ptr(), sin.data_ptr(), pos, keys.data_ptr(),
                                values.data_ptr(), L, km.data_ptr() if km is not None else 0, y.data_ptr(),
                                torch.get_num_threads())
    cl.cumulative_length.add_(1)
    return y


def _native_forward(self, hidden_states, *args, **kwargs):
    """``LlamaDecoderLayer.forward``, one C++ call per decode step where it applies (module docstring). The
    arguments go on to transformers' forward unchanged (the cache's keyword is ``cache`` from transformers 5.x on,
    ``past_key_values`` before)."""
    if not args and not kwargs.get("output_attentions"):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        y = _native_step(self, hidden_states, kwargs.get("attention_mask"), cache, kwargs.get("position_embeddings"))
        if y is not None:
            return y
    return _llama().LlamaDecoderLayer.forward(self, hidden_states, *args, **kwargs)


@functools.cache
def _native_class():
    base = _llama().LlamaDecoderLayer
    return type("NativeLlamaDecoderLayer", (base,), {
        "forward": _native_forward, "__module__": __name__, "__qualname__": "NativeLlamaDecoderLayer",
        "__doc__": "LlamaDecoderLayer whose decode steps run as one C++ call (lorakern.models.native)."})


def __getattr__(name: str):
    """``NativeLlamaDecoderLayer`` by name (pickle finds a native layer's class here)."""
    if name == "NativeLlamaDecoderLayer":
        return _native_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def native_decode_layers(model: nn.Module) -> tuple[int, int, list[str]]:
    """(decoder layers of ``model`` that run natively now, decoder layers in all, the reasons the others do not)."""
    try:
        base = _llama().LlamaDecoderLayer
    except ImportError:
        return 0, 0, ["transformers' Llama model is not importable"]
    layers = [m for m in model.modules() if isinstance(m, base)]
    reasons = []
    n = 0
    for l in layers:
        why = _eligible(l) if type(l) is _native_class() else "native decode is not enabled on it"
        if why is None:
            n += 1
        else:
            reasons.append(why)
    return n, len(layers), sorted(set(reasons))


def enable_native_decode(model: nn.Module) -> int:
    """Give every Llama decoder layer of ``model`` the native decode step; returns how many are eligible now.

    Layers change class (``NativeLlamaDecoderLayer``, a subclass of transformers' ``LlamaDecoderLayer``) and keep
    their modules and state; a layer that is not eligible (module docstring) when a step runs takes transformers'
    path, so attaching an adapter later stays correct. Use :func:`lorakern.prepare_decode` (``native=True``) for
    the static cache this path needs. :func:`disable_native_decode` undoes it.
    """
    try:
        base = _llama().LlamaDecoderLayer
    except ImportError:
        return 0
    if _fused_types()[0] is None:  # this transformers' attention is not fused (fuse.py): no layer can qualify
        return 0
    cls = _native_class()
    for m in model.modules():
        if type(m) is base:
            m.__class__ = cls
    return native_decode_layers(model)[0]


def disable_native_decode(model: nn.Module) -> int:
    """Give the decoder layers of ``model`` transformers' own forward back; returns how many changed."""
    try:
        cls = _native_class()
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if type(m) is cls:
            m.__class__ = _llama().LlamaDecoderLayer
            _RECORDS.pop(m, None)
            n += 1
    return n
