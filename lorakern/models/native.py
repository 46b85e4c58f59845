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
:class:`~lorakern.nn.QuantLinear` or :class:`~lorakern.nn.GWQLinear` (bare, or inside the
:class:`~lorakern.nn.MultiLoRALinear` / :class:`~lorakern.nn.MultiLoRASlicesLinear` of one adapter bank,
:func:`lorakern.attach_adapters`) and the norms transformers' ``LlamaRMSNorm``. The C record (``lk_decoder_layer``
in C, ``_C.DecoderLayerRecord`` in Python) holds the tensors' addresses and each projection's bank; it is rebuilt
whenever a layer's tensors are no longer the ones it was built from or a bank changed (``LayerBank.version``).
With a bank, each step passes the batch the model's :class:`~lorakern.nn.MultiLoRAContext` holds for the step's
sequences (``adapter_names=`` of ``generate``, a mixture, or none), and the C step adds each sequence's adapters
to every projection with the multi-adapter kernels, as the modules on transformers' path do.

The models around the layers change class too: ``LlamaForCausalLM`` becomes ``NativeLlamaForCausalLM`` and
``LlamaModel`` ``NativeLlamaModel``. When every decoder layer qualifies, their decode step is one C++ call,
``lk_decoder_stack_step``: the embedding lookup (a tied ``QuantEmbedding``'s packed rows), the rotary embedding,
every decoder layer, the final RMSNorm and a quantized output head; and ``prepare_inputs_for_generation`` hands
the step the 2-D padding mask instead of building transformers' 4-D mask for the static cache. Measured on
SmolLM2-135M (2 threads, this machine): per-layer calls left ~4.5 ms of Python a token around ~9 ms of kernels
(after each step has streamed ~90 MB of weights through the caches, Python runs cold), the 4-D mask ~1 ms; the
stack step leaves ~0.2 ms of Python in the forward. Anything it does not take (output_hidden_states,
output_attentions, forward hooks on the modules it covers, another cache, a layer that does not qualify, other
arguments) goes to transformers' forward, whose layers still take their own native step where they can.
"""
from __future__ import annotations

import functools
import inspect
import operator
import weakref

import torch
from torch import nn

from .._native import native
from ..nn import GWQLinear, MultiLoRALinear, MultiLoRASlicesLinear, QuantLinear

__all__ = ["disable_native_decode", "enable_native_decode", "native_decode_layers"]

# the keyword arguments LlamaModel.forward gets from generate() that the stack step understands; any other
# keyword (output_hidden_states, return_dict=False, flash-attention kwargs, ...) sends the call to transformers
_STACK_KWARGS = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds",
                           "use_cache", "return_dict"})


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


# the output slices of the fused projections the record reads, in lk_projection order: qkv (q, k, v), o, gate_up
# (gate, up), down
_PROJ_SLICES = (3, 1, 2, 1)


def _parts(p: nn.Module) -> tuple:
    """(the quantized layer, its banks per output slice or None, the bank's context) of a projection: a bare layer,
    or one inside an adapter bank's :class:`MultiLoRALinear` / :class:`MultiLoRASlicesLinear`."""
    t = type(p)
    if t is MultiLoRALinear:
        return p.base, [p.bank], p.context
    if t is MultiLoRASlicesLinear:
        return p.base, p.banks, p.context
    return p, None, None


def _eligible(layer: nn.Module) -> str | None:
    """None when ``layer`` (a decoder layer) can run natively, else the reason it cannot."""
    m = _llama()
    attn_t, mlp_t = _fused_types()
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn_t is None or type(attn) is not attn_t:
        return "its attention is not a fused LlamaAttention (fuse_projections)"
    if mlp_t is None or type(mlp) is not mlp_t:
        return "its MLP is not a fused LlamaMLP (fuse_projections)"
    contexts = set()
    for p, slices in zip((attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj), _PROJ_SLICES):
        q, banks, ctx = _parts(p)
        if type(q) not in (QuantLinear, GWQLinear):
            return (f"a projection is a {type(p).__name__}, not a QuantLinear or GWQLinear (alone or in an adapter "
                    "bank's MultiLoRALinear)")
        if q.qweight.device.type != "cpu":
            return "its weights are not on the CPU"
        if banks is not None:
            if len(banks) != slices:
                return "an adapter bank's slices do not match the fused projection"
            if any(lb is not None and lb.device.type != "cpu" for lb in banks):
                return "an adapter bank is not on the CPU"
            contexts.add(id(ctx))
    if len(contexts) > 1:
        return "its projections' adapters belong to different banks"
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
        wrappers = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        parts = [_parts(p) for p in wrappers]
        projs = tuple(q for q, _, _ in parts)
        # the adapter banks, in lk_projection order (q, k, v, o, gate, up, down), and the context naming the step's
        # adapters; each bank's pointers are prepared once per bank change (LayerBank.prepared)
        banks = []
        for (q, bs, _), n in zip(parts, _PROJ_SLICES):
            banks += bs if bs is not None else [None] * n
        self.banks = [lb for lb in banks if lb is not None]
        self.bank_versions = [lb.version for lb in self.banks]
        self.context = next((c for _, bs, c in parts if bs is not None), None)
        self.prepared = [lb.prepared() if lb is not None else None for lb in banks]
        adapters = [list(pb.view) if pb is not None else [] for pb in self.prepared] if self.banks else []
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
        for w, (q, bs, ctx) in zip(wrappers, parts):
            if bs is not None:
                banks_attr = "banks" if type(w) is MultiLoRASlicesLinear else "bank"
                checks += [(w._modules, "base", q), (w.__dict__, "context", ctx),
                           (w.__dict__, banks_attr, w.__dict__[banks_attr])]
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
            norms[1].data_ptr(), weights, outliers, biases, adapters)

    def current(self, layer: nn.Module) -> bool:
        """Whether ``layer`` still holds the very modules and tensors (at the same addresses) the record was built
        from: dictionary lookups only (this runs once per layer and token)."""
        for d, k, v in self.checks:
            if d.get(k) is not v:
                return False
        for t, ptr in self.pointers:
            if t.data_ptr() != ptr:
                return False
        if [lb.version for lb in self.banks] != self.bank_versions:
            return False  # an adapter added or removed: the slabs may have moved
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


def _record_of(layer) -> "_Record | None":
    """The layer's current record (built or rebuilt as needed), or None when the layer does not qualify."""
    rec = _RECORDS.get(layer)
    if rec is None or not rec.current(layer):
        if _eligible(layer) is not None:
            _RECORDS.pop(layer, None)  # do not keep replaced modules alive
            return None
        rec = _RECORDS[layer] = _Record(layer)
    return rec


def _static_kv_len(keys, values, B: int, Hkv: int, D: int) -> int | None:
    """max_len of a static cache layer whose keys and values the C step can use in place (fp32, CPU, contiguous,
    [B, Hkv, max_len, D] both), else None."""
    if (keys.dtype != torch.float32 or values.dtype != torch.float32 or keys.shape != values.shape
            or keys.device.type != "cpu" or values.device.type != "cpu" or keys.dim() != 4
            or tuple(keys.shape[:2]) != (B, Hkv) or keys.shape[3] != D
            or not keys.is_contiguous() or not values.is_contiguous()):
        return None
    return keys.shape[2]


def _batch_args(context, B: int):
    """The adapter batch of a decode step of B sequences as the step bindings take it (segments, count, tokens,
    weights, entries addresses), () for none, or None when it is not one the C step takes (not on the CPU, other
    dtypes)."""
    if context is None:
        return ()
    b = context.for_shape((B, 1))  # (ValueError for a batch naming another number of sequences, as the modules)
    if b is None:
        return ()
    seg, tok, w = b.segments, b.tokens, b.weights
    if (seg.dtype != torch.int64 or tok.dtype != torch.int64 or w.dtype != torch.float32
            or seg.device.type != "cpu" or tok.device.type != "cpu" or w.device.type != "cpu"
            or not (seg.is_contiguous() and tok.is_contiguous() and w.is_contiguous())):
        return None
    return seg.data_ptr(), seg.shape[0], tok.data_ptr(), w.data_ptr(), tok.shape[0]


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
    rec = _record_of(layer)
    if rec is None:
        return None
    B = hidden_states.shape[0]
    H, Hq, Hkv, D, _ = rec.dims
    keys, values = cl.keys, cl.values
    L = _static_kv_len(keys, values, B, Hkv, D)
    if L is None or hidden_states.shape[2] != H:
        return None
    pos = int(cl.cumulative_length)
    if pos >= L:
        return None  # transformers raises its own error for a full static cache
    cos, sin = position_embeddings
    if (cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1:] != (1, D) or sin.shape != cos.shape
            or cos.dtype != torch.float32 or sin.dtype != torch.float32):
        return None  # (one row: every sequence at the same position)
    km = _key_mask(attention_mask, B, L)
    if km is False:
        return None
    bargs = _batch_args(rec.context, B)
    if bargs is None:
        return None
    x = hidden_states.contiguous()
    cos, sin = cos.expand(B, 1, D).contiguous(), sin.expand(B, 1, D).contiguous()
    y = torch.empty_like(x)
    native().decoder_layer_step(rec.record, x.data_ptr(), B, cos.data_ptr(), sin.data_ptr(), pos, keys.data_ptr(),
                                values.data_ptr(), L, km.data_ptr() if km is not None else 0, y.data_ptr(),
                                torch.get_num_threads(), *bargs)
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


_data_ptr, _version, _shape = torch.Tensor.data_ptr, operator.attrgetter("_version"), operator.attrgetter("shape")
_training = operator.attrgetter("training")
_pre_hooks, _hooks = operator.attrgetter("_forward_pre_hooks"), operator.attrgetter("_forward_hooks")
_keys_of, _values_of = operator.attrgetter("keys"), operator.attrgetter("values")
_lengths_of = operator.attrgetter("cumulative_length")
_bank_version = operator.attrgetter("version")
def _capture_hook(hook) -> bool:
    """Whether ``hook`` is one of transformers' output-capturing hooks (installed for good on the layers the first
    time hidden states or attentions are asked for; they record nothing unless a capture is active, and the stack
    step declines every call that asks for one)."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


_C_ROPE_TYPES = ("default", "linear", "llama3")  # a fixed inv_freq; "dynamic" and others change it with the length

# Bumped whenever any module anywhere gets a submodule, buffer or parameter assigned (torch's global registration
# hooks: ``module.x = ...``, ``register_buffer``, ``add_module``, ``ModuleList.__setitem__``): a run of decode
# steps re-checks its stack when it moved.
_MUTATIONS = [0]


def _count_mutation(module, name, value):
    if not torch.compiler.is_compiling():  # (inside a traced forward, a counter would be a guard: recompiles)
        _MUTATIONS[0] += 1


@functools.cache
def _count_mutations() -> None:
    """Install the counting hooks (once, at the first enable_native_decode: importing lorakern installs nothing)."""
    for register in ("register_module_module_registration_hook", "register_module_buffer_registration_hook",
                     "register_module_parameter_registration_hook"):
        getattr(torch.nn.modules.module, register)(_count_mutation)


class _Stack:
    """The C record of a model's decoder stack (``lk_decoder_stack``) and what it was built from.

    ``current()`` is the per-step check that nothing it points into was replaced: every module, buffer and
    parameter it reads is compared by identity where it is stored, every address and the norms' versions, in
    C-level loops (``map``): after the step has streamed the weights through the caches, Python runs cold, and
    per-layer checks in Python cost ~1.3 ms a token on SmolLM2.
    """

    def __init__(self, owner: nn.Module, llama: nn.Module, records: tuple, head: nn.Module | None):
        self.records = records
        keep, checks = [], []
        for r in records:
            checks += r.checks
        layers = llama.layers
        checks += [(llama._modules, "layers", layers)]
        checks += [(layers._modules, k, v) for k, v in layers._modules.items()]
        for name in ("embed_tokens", "norm", "rotary_emb"):
            checks.append((llama._modules, name, llama._modules.get(name)))
        if owner is not llama:
            checks += [(owner._modules, "model", llama), (owner._modules, "lm_head", owner._modules.get("lm_head"))]
        tensors = [t for r in records for t, _ in r.pointers]
        versioned = [w for r in records for w in r.norm_sources]
        self.banks = [lb for r in records for lb in r.banks]
        self.bank_versions = list(map(_bank_version, self.banks))
        self.context = next((r.context for r in records if r.context is not None), None)  # (one: _stack_of)
        # the embedding lookup, in C when the table is a QuantEmbedding
        from ..nn.quant_embedding import QuantEmbedding
        emb = llama.embed_tokens
        embed = []
        if type(emb) is QuantEmbedding and emb.dtype == torch.float32 and emb.scale == 1.0 and emb.qweight.device.type == "cpu" \
                and all(getattr(emb, n).is_contiguous() for n in ("qweight", "scales", "zeros")):
            embed = [emb.qweight.data_ptr(), emb.scales.data_ptr(), emb.zeros.data_ptr(), emb.num_embeddings,
                     emb.embedding_dim, emb.bits, emb.group_size]
            checks += [(emb._buffers, n, emb._buffers[n]) for n in ("qweight", "scales", "zeros")]
            tensors += [emb.qweight, emb.scales, emb.zeros]
        self.c_embed = bool(embed)
        # the rotary embedding, in C for the types whose inv_freq is fixed
        rot = llama.rotary_emb
        inv = getattr(rot, "inv_freq", None)
        D = records[0].dims[3]
        self.c_rope = (getattr(rot, "rope_type", None) in _C_ROPE_TYPES and isinstance(inv, torch.Tensor)
                       and inv.dtype == torch.float32 and inv.device.type == "cpu" and inv.dim() == 1
                       and inv.numel() * 2 == D and inv.is_contiguous()
                       and isinstance(getattr(rot, "attention_scaling", None), (int, float)))
        if self.c_rope:
            checks.append((rot._buffers, "inv_freq", inv))
            tensors.append(inv)
            versioned.append(inv)
        # the final norm, in C when it is transformers' RMSNorm in fp32
        norm = llama.norm
        self.c_norm = (type(norm) is _llama().LlamaRMSNorm and norm.weight.dtype == torch.float32
                       and norm.weight.device.type == "cpu" and norm.weight.is_contiguous()
                       and norm.weight.shape == (records[0].dims[0],))
        if self.c_norm:
            checks.append((norm._parameters, "weight", norm.weight))
            tensors.append(norm.weight)
            versioned.append(norm.weight)
        # the output head, in C when it is a QuantLinear after a C norm (else it runs in Python after the step)
        hw = []
        self.c_head = False
        if self.c_norm and head is not None and type(head) is QuantLinear and head.qweight.device.type == "cpu" \
                and all(getattr(head, n).is_contiguous() for n in ("qweight", "scales", "zeros")) \
                and head.in_features == records[0].dims[0]:
            hw = [head.qweight.data_ptr(), head.scales.data_ptr(), head.zeros.data_ptr(), head.out_features,
                  head.in_features, head.bits, head.group_size]
            checks += [(head._buffers, n, v) for n, v in head._buffers.items()]
            tensors += [t for t in head._buffers.values() if t is not None]
            self.c_head = True
        hb = 0
        if self.c_head and head.bias is not None:
            b = head.bias.detach().to(torch.float32).contiguous()
            keep.append(b)
            hb = b.data_ptr()
            versioned.append(head.bias)
        self.out_features = head.out_features if self.c_head else records[0].dims[0]
        self._keep = keep
        self.dicts = [c[0] for c in checks]
        self.keys = [c[1] for c in checks]
        self.values = [c[2] for c in checks]
        self.tensors = tensors
        self.ptrs = list(map(_data_ptr, tensors))
        # the storages the C record points into stay alive as long as it does, whatever happens to the modules
        self._storages = [t.untyped_storage() for t in tensors] + [t.untyped_storage() for r in records for t in r._keep]
        self.versioned = versioned
        self.versions = list(map(_version, versioned))
        self.modules = list(owner.modules())
        self.hook_counts = (list(map(len, map(_hooks, self.modules))), list(map(len, map(_pre_hooks, self.modules))))
        self.user_hooks = any(not _capture_hook(h) for m in self.modules
                              for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
        self.layer_modules = list(layers)[:len(records)]
        self.stack = native().DecoderStackRecord(
            [r.record for r in records], embed, inv.data_ptr() if self.c_rope else 0,
            float(rot.attention_scaling) if self.c_rope else 1.0, norm.weight.data_ptr() if self.c_norm else 0,
            float(norm.variance_epsilon) if self.c_norm else 0.0, hw, hb)
        self.cache = None  # the cache last checked (see cache_pointers)
        self.run = None  # (cache, pos, B, _MUTATIONS) of the last step (its pointers: self.cache): _stack_step

    def current(self) -> bool:
        mm = torch.nn.modules.module
        return (not self.user_hooks and not mm._global_forward_hooks and not mm._global_forward_pre_hooks
                and all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.values))
                and list(map(_data_ptr, self.tensors)) == self.ptrs
                and list(map(_version, self.versioned)) == self.versions
                and list(map(_bank_version, self.banks)) == self.bank_versions
                and not any(map(_training, self.layer_modules))
                and list(map(len, map(_hooks, self.modules))) == self.hook_counts[0]
                and list(map(len, map(_pre_hooks, self.modules))) == self.hook_counts[1])

    def same_cache_tensors(self, cache_layers) -> bool:
        """Whether the cache's layers hold the very tensors the last full check saw (beam search's reorder_cache
        replaces them)."""
        c = self.cache
        return (all(map(operator.is_, map(_keys_of, cache_layers), c[2]))
                and all(map(operator.is_, map(_values_of, cache_layers), c[3]))
                and all(map(operator.is_, map(_lengths_of, cache_layers), c[4])))

    def cache_pointers(self, cache, B: int):
        """(lengths, keys, values addresses, max_len) of ``cache``'s layers, or None when they are not static
        fp32 layers of this stack's shapes; the result of the last cache's full check is reused while its layers
        keep the same tensors, shapes and addresses."""
        n = len(self.records)
        cls = getattr(cache, "layers", None)
        if cls is None or len(cls) < n:
            return None
        cls = cls[:n]
        try:
            ks, vs, cs = list(map(_keys_of, cls)), list(map(_values_of, cls)), list(map(_lengths_of, cls))
        except AttributeError:  # a layer not yet initialised has no keys
            return None
        c = self.cache
        if (c is not None and c[0] is cache and c[1] == B and self.same_cache_tensors(cls)
                and list(map(_data_ptr, ks)) == c[5][1] and list(map(_data_ptr, vs)) == c[5][2]
                and list(map(_data_ptr, cs)) == c[5][0] and list(map(_shape, ks)) == c[6]
                and list(map(_shape, vs)) == c[6]):
            return c[5]
        static = _static_layer()
        if any(type(l) is not static or not l.is_initialized for l in cls):
            return None
        lens = [_static_kv_len(k, v, B, r.dims[2], r.dims[3]) for r, k, v in zip(self.records, ks, vs)]
        L = lens[0]
        if L is None or any(x != L for x in lens) or any(
                c.dtype != torch.int64 or c.device.type != "cpu" or c.numel() != 1 for c in cs):
            return None
        out = (list(map(_data_ptr, cs)), list(map(_data_ptr, ks)), list(map(_data_ptr, vs)), L,
               [t.untyped_storage() for t in ks + vs + cs])  # (their storages stay alive with the pointers)
        self.cache = (cache, B, ks, vs, cs, out, list(map(_shape, ks)))
        return out


# model (LlamaForCausalLM or LlamaModel) -> its _Stack (outside the module state, as _RECORDS)
_STACKS: "weakref.WeakKeyDictionary[nn.Module, _Stack]" = weakref.WeakKeyDictionary()


def _stack_of(owner: nn.Module, llama: nn.Module, head: nn.Module | None) -> "_Stack | None":
    """``owner``'s current stack (rebuilt when anything it reads changed), or None when a layer does not qualify."""
    st = _STACKS.get(owner)
    if st is not None and st.current() and len(st.records) == llama.config.num_hidden_layers:
        return st
    _STACKS.pop(owner, None)  # (a stale stack would keep replaced weights and the last cache alive)
    if llama.training or torch.nn.modules.module._global_forward_hooks \
            or torch.nn.modules.module._global_forward_pre_hooks:
        return None
    n = llama.config.num_hidden_layers
    layers, cls = llama.layers, _native_class()
    if len(layers) < n:
        return None
    records = []
    for i in range(n):
        layer = layers[i]
        if type(layer) is not cls or layer.training or layer.self_attn.layer_idx != i:
            return None
        rec = _record_of(layer)
        if rec is None:
            return None
        records.append(rec)
    if len({id(r.context) for r in records if r.context is not None}) > 1:
        return None  # the layers' adapters belong to different banks
    st = _Stack(owner, llama, tuple(records), head)
    if not st.current():  # hooks, or a layer in training mode
        return None
    _STACKS[owner] = st
    return st


def _stack_mask(attention_mask, B: int, L: int, pos: int):
    """The key mask [B, L] (uint8, 1 = attend) of a decode step at position ``pos``, None for none, False when the
    mask is of a kind the stack step does not take: transformers' 4-D [B, 1, 1, L] masks (what generate passes
    with a static cache) or a 2-D padding mask [B, pos + 1] (1 = attend)."""
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor):
        return None if attention_mask is None else False
    if attention_mask.dim() == 4:
        return _key_mask(attention_mask, B, L)
    if (attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, pos + 1)
            or attention_mask.device.type != "cpu" or attention_mask.dtype.is_floating_point):
        return False
    km = torch.zeros((B, L), dtype=torch.uint8)
    km[:, :pos + 1] = attention_mask != 0
    return km


def _stack_step(owner: nn.Module, llama: nn.Module, head: nn.Module | None, kwargs: dict):
    """One decode step through lk_decoder_stack_step: (output [B, 1, out], stack, cache) where out is the head's
    width when the stack ran the head and the hidden size otherwise, or None when the step does not apply."""
    if not _STACK_KWARGS.issuperset(kwargs) or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
        return None
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or owner.training:
        return None
    cfg = llama.config
    if (getattr(cfg, "output_hidden_states", False) or getattr(cfg, "output_attentions", False)
            or ("return_dict" not in kwargs and getattr(owner.config, "return_dict", True) is False)):
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if cache is None or (ids is None) == (embeds is None):
        return None  # (both or neither: transformers raises its error)
    if ids is not None:
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1 or ids.device.type != "cpu"
                or ids.dtype != torch.int64):
            return None
        B = ids.shape[0]
    elif isinstance(embeds, torch.Tensor) and embeds.dim() == 3 and embeds.shape[1] == 1:
        B = embeds.shape[0]
    else:
        return None
    if B == 0:
        return None
    cache_layers = getattr(cache, "layers", None)
    if not cache_layers or not isinstance(getattr(cache_layers[0], "cumulative_length", None), torch.Tensor):
        return None
    pos = int(cache_layers[0].cumulative_length)
    # A run of decode steps on one cache (each step at the position after the last one's, no module, buffer or
    # parameter assigned anywhere since) reuses the last step's checks; the first step of a run checks everything
    # (_Stack.current, cache_pointers). What else changes a model during a run (direct writes to a module's
    # _modules / _buffers dicts, ``tensor.data =``, hooks registered on a module) is seen at the next run; the C
    # record's storages are held, so it never reads freed memory.
    st = _STACKS.get(owner)
    run = st.run if st is not None else None
    n = len(st.records) if st is not None else 0
    if (run is not None and run[0] is cache and run[1] == pos - 1 and run[2] == B and run[3] == _MUTATIONS[0]
            and not torch.nn.modules.module._global_forward_hooks
            and not torch.nn.modules.module._global_forward_pre_hooks
            and len(cache_layers) >= n and st.same_cache_tensors(cache_layers[:n])):
        ptrs = st.cache[5]
    else:
        if st is not None:
            st.run = None
        st = _stack_of(owner, llama, head)
        if st is None:
            return None
        ptrs = st.cache_pointers(cache, B)
        if ptrs is None:
            return None
    H, _, _, D, _ = st.records[0].dims
    x = None  # (the C step looks ids up when x is NULL)
    if ids is not None:
        ids = ids.contiguous()
        if not st.c_embed:
            x = llama.embed_tokens(ids)
    else:
        x = embeds
    if x is not None:
        if (not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != H
                or x.dtype != torch.float32 or x.device.type != "cpu"):
            return None
        x = x.contiguous()
    lengths, keys, values, L, _ = ptrs
    if pos >= L:
        return None  # transformers raises its own error for a full static cache
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and (not isinstance(position_ids, torch.Tensor) or position_ids.dtype != torch.int64
                                     or position_ids.device.type != "cpu"
                                     or tuple(position_ids.shape) not in ((B, 1), (1, 1))):
        return None
    cos = sin = positions = None
    if st.c_rope:
        if position_ids is not None:
            positions = position_ids.expand(B, 1).contiguous()
            if int(positions.min()) < 0:
                return None  # (transformers takes them; the C step refuses them)
    else:
        if position_ids is None:
            position_ids = torch.full((1, 1), pos, dtype=torch.long)
        cos, sin = llama.rotary_emb(torch.empty(0), position_ids)
        if cos.dim() != 3 or cos.shape[1:] != (1, D) or cos.shape[0] not in (1, B) or sin.shape != cos.shape \
                or cos.dtype != torch.float32 or sin.dtype != torch.float32:
            return None
        cos, sin = cos.expand(B, 1, D).contiguous(), sin.expand(B, 1, D).contiguous()
    km = _stack_mask(kwargs.get("attention_mask"), B, L, pos)
    if km is False:
        return None
    bargs = _batch_args(st.context, B)
    if bargs is None:
        return None
    y = torch.empty((B, 1, st.out_features), dtype=torch.float32)
    native().decoder_stack_step(
        st.stack, B, ids.data_ptr() if x is None else 0, x.data_ptr() if x is not None else 0,
        positions.data_ptr() if positions is not None else 0, cos.data_ptr() if cos is not None else 0,
        sin.data_ptr() if sin is not None else 0, lengths, keys, values, L, km.data_ptr() if km is not None else 0,
        y.data_ptr(), torch.get_num_threads(), *bargs)
    st.run = (cache, pos, B, _MUTATIONS[0])
    if not st.c_norm:
        y = llama.norm(y)
    return y, st, cache


@functools.cache
def _output_types():
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
    field = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
    return BaseModelOutputWithPast, CausalLMOutputWithPast, field


# transformers' classes and their native subclasses, set when the subclasses are made (plain dict lookups: the
# forwards below also run under dynamo, which warns about functools.cache'd calls)
_CLASSES: dict = {}


def _native_model_forward(self, *args, **kwargs):
    """``LlamaModel.forward``: a decode step runs the decoder stack and the final norm as one C++ call where it
    applies (module docstring); otherwise transformers' forward with the same arguments."""
    if not args and type(self) is _CLASSES["model"]:
        out = _stack_step(self, self, None, kwargs)
        if out is not None:
            base_out, _, field = _output_types()
            return base_out(**{"last_hidden_state": out[0], field: out[2]})
    _end_run(self)
    return _CLASSES["model_base"].forward(self, *args, **kwargs)


def _end_run(owner):
    """A step on transformers' path ends the run of native steps: the next native step checks everything."""
    st = _STACKS.get(owner)
    if st is not None:
        st.run = None


def _native_causal_lm_forward(self, *args, **kwargs):
    """``LlamaForCausalLM.forward``: a decode step (one new token per sequence, no labels) runs the embedding
    lookup, the decoder stack, the final norm and a quantized output head as one C++ call where it applies
    (module docstring); otherwise transformers' forward with the same arguments. (A forward bound while the model
    was native, as attach_adapters keeps it, stays correct after disable_native_decode: it only checks the class.)"""
    if not args and kwargs.get("labels") is None and type(self) is _CLASSES["lm"]:
        keep = kwargs.get("logits_to_keep", 0)
        if type(keep) is int and keep >= 0:
            rest = {k: v for k, v in kwargs.items() if k not in ("labels", "logits_to_keep")}
            head = self._modules.get("lm_head")
            out = _stack_step(self, self.model, head, rest)
            if out is not None:
                y, st, cache = out
                logits = y if st.c_head else head(y)
                _, lm_out, field = _output_types()
                return lm_out(**{"logits": logits, field: cache})
    _end_run(self)
    return _CLASSES["lm_base"].forward(self, *args, **kwargs)


_PREPARE_KWARGS = frozenset({"use_cache", "return_dict", "position_ids", "logits_to_keep"})


def _native_prepare_inputs(self, input_ids, *args, **kwargs):
    """``prepare_inputs_for_generation`` (transformers' GenerationMixin): while a run of native decode steps goes on
    (the last step on this cache was native), the next step's inputs are the last tokens, the cache, the 2-D
    padding mask and the positions as they are; transformers' version would also build a 4-D mask for the static
    cache each step (~1 ms a token on SmolLM2 here), which the stack step does not need. Anything else goes to
    transformers' version."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    st = _STACKS.get(self)
    if st is not None and kwargs.get("is_first_iteration"):
        st.run = None  # a new generate call: its first decode step checks everything again
    if (not args and st is not None and st.run is not None and cache is not None and st.run[0] is cache
            and not kwargs.get("is_first_iteration") and kwargs.get("inputs_embeds") is None
            and kwargs.get("next_sequence_length") == 1 and isinstance(input_ids, torch.Tensor)
            and input_ids.dim() == 2):
        mask = kwargs.get("attention_mask")
        rest = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "attention_mask",
                                                               "inputs_embeds", "is_first_iteration",
                                                               "next_sequence_length")}
        if (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2)) and _PREPARE_KWARGS.issuperset(rest):
            out = {"input_ids": input_ids[:, -1:].contiguous(), "cache": cache}
            pids = rest.pop("position_ids", None)
            if pids is not None:
                out["position_ids"] = pids[..., -1:].contiguous()
            if mask is not None:
                out["attention_mask"] = mask
            out.update(rest)
            return out
    return _llama().LlamaForCausalLM.prepare_inputs_for_generation(self, input_ids, *args, **kwargs)


@functools.cache
def _native_model_class():
    base = _CLASSES["model_base"] = _llama().LlamaModel
    cls = _CLASSES["model"] = type("NativeLlamaModel", (base,), {
        "forward": _native_model_forward, "__module__": __name__, "__qualname__": "NativeLlamaModel",
        "__doc__": "LlamaModel whose decode steps run the decoder stack as one C++ call (lorakern.models.native)."})
    return cls


def _signed(fn, like):
    """``fn`` under ``like``'s signature (generate() validates its keyword arguments against the signatures of
    ``forward`` and ``prepare_inputs_for_generation``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    wrapper.__signature__ = inspect.signature(like)
    del wrapper.__wrapped__
    return wrapper


@functools.cache
def _native_causal_lm_class():
    base = _CLASSES["lm_base"] = _llama().LlamaForCausalLM
    cls = _CLASSES["lm"] = type("NativeLlamaForCausalLM", (base,), {
        "forward": _signed(_native_causal_lm_forward, base.forward),
        "prepare_inputs_for_generation": _signed(_native_prepare_inputs, base.prepare_inputs_for_generation),
        "__module__": __name__, "__qualname__": "NativeLlamaForCausalLM",
        "__doc__": "LlamaForCausalLM whose decode steps run as one C++ call (lorakern.models.native)."})
    return cls


def __getattr__(name: str):
    """``NativeLlamaDecoderLayer``, ``NativeLlamaModel`` and ``NativeLlamaForCausalLM`` by name (pickle finds the classes here)."""
    if name == "NativeLlamaDecoderLayer":
        return _native_class()
    if name == "NativeLlamaModel":
        return _native_model_class()
    if name == "NativeLlamaForCausalLM":
        return _native_causal_lm_class()
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
    path, so attaching an adapter later stays correct. Each ``LlamaModel`` and ``LlamaForCausalLM`` in ``model``
    becomes a ``NativeLlamaModel`` / ``NativeLlamaForCausalLM`` (subclasses), whose decode steps run the whole
    decoder stack (with the embedding lookup, the final norm and a quantized head) in one C++ call when every layer
    qualifies. Use :func:`lorakern.prepare_decode` (``native=True``) for the static cache
    this path needs. :func:`disable_native_decode` undoes it.
    """
    try:
        base = _llama().LlamaDecoderLayer
    except ImportError:
        return 0
    if _fused_types()[0] is None:  # this transformers' attention is not fused (fuse.py): no layer can qualify
        return 0
    _count_mutations()
    swaps = {base: _native_class(), _llama().LlamaModel: _native_model_class(),
             _llama().LlamaForCausalLM: _native_causal_lm_class()}
    try:  # transformers keys the outputs its capture_outputs can record (output_hidden_states) on the class name
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
    except ImportError:
        registry = None
    for m in model.modules():
        cls = swaps.get(type(m))
        if cls is not None:
            flags = registry.get(m) if registry is not None else None
            m.__class__ = cls
            if flags:
                registry[m] = flags
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
        elif type(m) is _native_model_class():
            m.__class__ = _llama().LlamaModel
            _STACKS.pop(m, None)
        elif type(m) is _native_causal_lm_class():
            m.__class__ = _llama().LlamaForCausalLM
            _STACKS.pop(m, None)
    return n
