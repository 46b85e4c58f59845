"""Fast decoding through transformers' own ``generate``: a static KV cache and ``torch.compile`` of the decode
step, with lorakern's ops and modules inside the compiled graph (custom ops with fake implementations, so
no graph breaks at the quantized layers or at the adapter bank)."""
from __future__ import annotations

import torch
from torch import nn

from .instance_method import InstanceMethod

__all__ = ["forget_compiled_call", "prepare_decode"]


def forget_compiled_call(model: nn.Module) -> None:
    """Drop the decode step transformers compiled and cached on ``model`` (``_compiled_call``). It is bound to
    the model object it was made for, and ``copy.deepcopy`` carries it along: a copy that lorakern then
    quantizes or gives adapters would otherwise keep running the original's compiled forward. Called by
    :func:`prepare_decode`, :func:`lorakern.quantize_model` and the adapter attach/detach functions."""
    for k in ("_compiled_call", "_last_compile_config"):
        model.__dict__.pop(k, None)


def prepare_decode(model: nn.Module, *, compile: bool = True, fullgraph: bool = True, threads: int | None = None,
                   fuse: bool = True, native: bool | None = None):
    """Set ``model`` up so that ``model.generate(...)`` decodes fast; returns the model.

    * KV cache: transformers' static cache (``generation_config.cache_implementation = "static"``): fixed
      shapes, so one compiled decode step serves every position.
    * ``compile=True``: transformers compiles the decode step at the first ``generate`` (its ``CompileConfig``,
      allowed on CPU here; ``mode="default"``: CUDA graphs do not apply to CPU tensors). The first call pays the
      compilation (about 40 s for SmolLM2-135M on 2 cores); later calls with the same batch size and cache
      length reuse it. ``fullgraph=True`` makes any graph break an error instead of a silent slow path.
    * ``fuse=True``: each attention layer's q/k/v and each gated MLP's gate/up projections become one
      quantized matmul (:func:`lorakern.models.fuse.fuse_projections`: bit-identical outputs, 3 fewer kernel
      calls per decoder layer; an adapter bank's projections fuse too, each bank over its own columns; layers
      with other adapters stay apart). Attaching an adapter to a fused projection, or saving the model, gives the
      separate layers back by itself.
    * Sliding-window attention (Gemma 3's local layers), when compiling: the static cache keeps every position
      for those layers too (:func:`_static_cache_full_length`, installed as ``model._prepare_static_cache``;
      ``compile=False`` removes it); their attention mask still limits each query to its window, so the result
      is the same. transformers' own sliding-window static layer counts its length in a Python int that
      ``torch.compile`` specializes on, so every decode step recompiled until dynamo's recompile limit. The
      cost: those layers' KV memory and attention (masked) grow with the whole cache length instead of the
      window, which is small at the lengths these CPU models decode.
    * ``threads``: ``torch.set_num_threads`` (lorakern's C++ kernels use the same count); None keeps torch's
      choice, one thread per physical core.
    * ``native``: each decoder layer's decode step as one C++ call (:mod:`lorakern.models.native`: quantized,
      fused Llama-family layers, bare or with an adapter bank's projections, whose adapters the step applies per
      sequence). ``None`` (default): native when every decoder layer qualifies
      after fusing, else not. A model with native layers is not compiled (the native step replaces the compiled one,
      and dynamo would trace transformers' path instead): with ``native=True`` layers that do not qualify run
      transformers' eager forward. Attach adapters before this call: a layer that stops qualifying later takes
      transformers' eager path.

    Works with quantized models (:func:`lorakern.quantize_model`) and with adapter banks
    (:func:`lorakern.attach_adapters`: ``generate(..., adapter_names=[...])``); it stays a drop-in: nothing
    but ``generation_config`` changes (and, for a compiled sliding-window model, the static-cache builder).

    Raises:
        TypeError: ``model`` has no ``generation_config`` (not a transformers generative model).
    """
    gc = getattr(model, "generation_config", None)
    if gc is None:
        raise TypeError("lorakern: prepare_decode needs a transformers model with a generation_config")
    forget_compiled_call(model)
    if fuse:
        from .fuse import fuse_projections  # (fuse imports this module)
        fuse_projections(model)
    from .native import disable_native_decode, enable_native_decode, native_decode_layers
    if native is not False:
        enable_native_decode(model)
        n, total, _ = native_decode_layers(model)
        if native is None and (total == 0 or n < total):
            disable_native_decode(model)
        elif n:
            compile = False
    else:
        disable_native_decode(model)
    if threads is not None:
        torch.set_num_threads(int(threads))
    gc.cache_implementation = "static"
    if isinstance(model.__dict__.get("_prepare_static_cache"), InstanceMethod):
        del model.__dict__["_prepare_static_cache"]  # an earlier compiled preparation's (below)
    if compile:
        if _has_sliding_layers(model):
            model._prepare_static_cache = InstanceMethod(_static_cache_full_length, model)
        from transformers import CompileConfig  # optional dependency (lorakern[models])
        cc = CompileConfig(fullgraph=fullgraph, dynamic=False, mode="default")
        cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
        gc.compile_config = cc
        gc.disable_compile = False
    else:
        gc.compile_config = None
        gc.disable_compile = True
    return model


def _has_sliding_layers(model: nn.Module) -> bool:
    """Whether transformers' static cache would give any layer of ``model`` a sliding window (``layer_types``, or
    ``sliding_window`` in the config as Mistral's has it)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return False
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (ImportError, AttributeError, TypeError):
        return False
    return "sliding_attention" in types


def _static_cache_full_length(model: nn.Module, *args, **kwargs):
    """transformers' ``generate`` static-cache builder (``_prepare_static_cache``, arguments passed through), with
    every sliding-window layer (``StaticSlidingWindowLayer``, exactly that class) replaced by a full-length
    ``StaticLayer``: the first tracks its length in a Python int that torch.compile guards on (one recompilation
    per decode step), the second in a tensor. The sliding-window mask is built from absolute positions
    (``get_mask_sizes`` of a static layer: the whole cache, offset 0), so each query still sees only its window.
    The length is the cache's full-attention layers' (or, with none, the length the builder recorded); without
    either the cache is returned as built. A layer the builder initialized early (chunked prefill) is initialized
    likewise."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer
    cache = type(model)._prepare_static_cache(model, *args, **kwargs)
    inner = getattr(cache, "self_attention_cache", cache)
    full = [layer.max_cache_len for layer in inner.layers if type(layer) is StaticLayer]
    length = max(full) if full else getattr(model, "_previous_max_cache_length", None)
    if not isinstance(length, int) or length <= 0:
        return cache
    for i, layer in enumerate(inner.layers):
        if type(layer) is StaticSlidingWindowLayer:
            new = StaticLayer(max_cache_len=length)
            if layer.is_initialized:
                new.lazy_initialization(layer.keys, layer.values)
            inner.layers[i] = new
    return cache
