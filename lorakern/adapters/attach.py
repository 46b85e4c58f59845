"""Attach one adapter to a model's layers (LoRALinear), and take it off again."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..formats.linear_like import linear_shape
from ..models.checkpoint import install_save_pretrained
from ..models.decode import forget_compiled_call
from ..models.fuse import is_fused, unfuse_projections
from ..multilora.bank import AdapterBank
from ..nn import ADAPTER_MODULES
from ..nn.lora_linear import LoRALinear
from ..nn.multi_lora_linear import MultiLoRAContext, MultiLoRALinear, MultiLoRASlicesLinear
from ..nn.swap import replace_module
from .loading import load_adapter
from .peft_io import LoraAdapter, check_base_weights
from .qalora import is_qalora, qalora_wrappers, refuse_qalora

__all__ = ["ModelAdapterBank", "apply_adapter", "attach_adapter", "attach_adapters", "detach_adapter",
           "detach_adapters"]


class ModelAdapterBank(AdapterBank):
    """The bank :func:`attach_adapters` gives a model (``model.lorakern_bank``): an
    :class:`~lorakern.multilora.AdapterBank` that also loads adapter paths (:func:`load_adapter`) and checks
    the base-weight copies a PEFT adapter carries against its model (:func:`check_base_weights`)."""

    def __init__(self, model: nn.Module, layers: dict, dtype: torch.dtype, device):
        super().__init__(layers, dtype=dtype, device=device)
        self._model = model

    def adapter_layers(self, adapter, name: str) -> dict:
        adapter = load_adapter(adapter)
        refuse_qalora(adapter, f"adapter {name!r}")
        return super().adapter_layers(adapter, name)

    def check_base_weights(self, adapter: LoraAdapter, name: str) -> None:
        check_base_weights(self._model, adapter, f"adapter {name!r}")


def _layers(adapter, model=None) -> dict:
    adapter = load_adapter(adapter)
    if isinstance(adapter, LoraAdapter):
        if model is not None:
            check_base_weights(model, adapter)
        return adapter.layers
    if isinstance(adapter, dict):
        return adapter
    raise TypeError(f"expected a LoraAdapter or a dict of module name -> layer, got {type(adapter).__name__}")


def adapter_target(model: nn.Module, name: str, what: str = "the adapter") -> nn.Module:
    """The module ``name`` of ``model`` an adapter (LoRA, a bank, MoLA) is to wrap.

    Raises:
        ValueError: the model has no such module, it already carries an adapter (:data:`~lorakern.nn.ADAPTER_MODULES`),
            or it is not linear (``nn.Linear``, transformers' ``Conv1D``, lorakern's quantized layers).
    """
    parent = name.rpartition(".")[0]
    try:
        if parent and is_fused(model.get_submodule(parent)):  # prepare_decode fused it: give the layers back
            unfuse_projections(model.get_submodule(parent))
        mod = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"lorakern: {what}: the model has no module {name!r} (an adapter for another model?)") from None
    if isinstance(mod, ADAPTER_MODULES):
        raise ValueError(f"lorakern: {what}: {name} already carries an adapter ({type(mod).__name__}); detach it first")
    if linear_shape(mod) is None:
        raise ValueError(f"lorakern: {what}: {name} is a {type(mod).__name__}, not a linear layer")
    return mod


def attach_adapter(model: nn.Module, adapter, dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """Replace each adapted module of ``model`` by a :class:`LoRALinear` around it (a
    :class:`~lorakern.nn.QALoRALinear` for a QA-LoRA adapter: ``use_qalora`` in its config).

    ``adapter`` is a :class:`LoraAdapter` (floating point; stored in ``dtype``), a dict
    ``{module name: LoraLayer | CompressedLoRA}`` (e.g. from
    :func:`~lorakern.adapters.load_compressed_adapter`) or a path of either. Module names are
    relative to ``model`` (PEFT's names without ``base_model.model.``). Returns the replaced
    modules, for :func:`detach_adapter`. Every name is checked before anything changes.

    Raises:
        ValueError: a module the model lacks, one that is not linear (``nn.Linear``, transformers'
            ``Conv1D``, lorakern's layers) or already carries an adapter, shapes that do not fit,
            or base-weight copies that differ from the model's (:func:`check_base_weights`).
    """
    adapter = load_adapter(adapter)
    layers = _layers(adapter, model)
    targets = {}
    for name, layer in layers.items():
        targets[name] = (adapter_target(model, name), layer)
    if is_qalora(adapter):  # QALoRALinear: A on group-pooled inputs
        return swap_in(model, qalora_wrappers(adapter, {n: mod for n, (mod, _) in targets.items()}))
    wrapped = {}
    for name, (mod, layer) in targets.items():
        wrapped[name] = LoRALinear(mod, layer, dtype=dtype)  # validates shapes before any swap
    return swap_in(model, wrapped)


def swap_in(model: nn.Module, wrapped: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put adapter-carrying modules (built and checked by the caller) in place; returns the modules they
    replace, for :func:`detach_adapter`. The model's ``save_pretrained`` then refuses while they are attached,
    and transformers' cached compiled step is dropped (its modules change)."""
    install_save_pretrained(model)
    forget_compiled_call(model)
    return {name: replace_module(model, name, new) for name, new in wrapped.items()}


def detach_adapter(model: nn.Module, old: dict[str, nn.Module]) -> None:
    """Undo :func:`attach_adapter` (``old`` is what it returned; also what :func:`swap_in` returned)."""
    for name, mod in old.items():
        replace_module(model, name, mod)
    forget_compiled_call(model)


@contextmanager
def attached(attach, model: nn.Module, adapter, dtype: torch.dtype):
    """``attach(model, adapter, dtype)`` for the ``with`` block, :func:`detach_adapter` after it."""
    old = attach(model, adapter, dtype)
    try:
        yield model
    finally:
        detach_adapter(model, old)


def apply_adapter(model: nn.Module, adapter, dtype: torch.dtype = torch.float32):
    """``with apply_adapter(model, adapter): ...`` runs the model with the adapter attached."""
    return attached(attach_adapter, model, adapter, dtype)


def attach_adapters(model: nn.Module, adapters: dict, dtype: torch.dtype = torch.float16, device=None):
    """Give ``model`` a bank of adapters, one per sample of a batch (PEFT's mixed-adapter batches).

    ``adapters``: ``{name: PEFT directory | compressed adapter path | LoraAdapter | {module: layer}}``.
    Every module any adapter touches becomes a :class:`~lorakern.nn.MultiLoRALinear`; an adapter that
    does not touch a module adds nothing there. Afterwards ``model(..., adapter_names=[...])`` and
    ``model.generate(..., adapter_names=[...])`` take one name per sample, ``"__base__"`` for none,
    exactly as with PEFT. Returns the :class:`ModelAdapterBank` (also ``model.lorakern_bank``); adapters
    (objects or paths) can be added to and removed from it later (for the same modules). Everything is loaded and checked
    before the model changes. :func:`detach_adapters` undoes it.
    """
    if getattr(model, "lorakern_bank", None) is not None:
        raise ValueError("lorakern: the model already has an adapter bank; detach_adapters first")
    if not isinstance(adapters, dict) or not adapters:
        raise TypeError("lorakern: adapters must be a non-empty dict {name: adapter or path}")
    loaded = {}
    for name, a in adapters.items():
        a = load_adapter(a)
        refuse_qalora(a, f"adapter {name!r}")
        if isinstance(a, LoraAdapter):
            check_base_weights(model, a, f"adapter {name!r}")
            a = a.layers
        loaded[name] = dict(a)
    shapes = {}
    for name, layers in loaded.items():
        for mname in layers:
            shapes[mname] = linear_shape(adapter_target(model, mname, f"adapter {name!r}"))
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    bank = ModelAdapterBank(model, dict(sorted(shapes.items())), dtype=dtype, device=device)
    for name, layers in loaded.items():
        bank.check_layers(name, layers)
    for name, layers in loaded.items():
        bank.add(name, layers)
    ctx = MultiLoRAContext(bank)
    old = swap_in(model, {mname: MultiLoRALinear(model.get_submodule(mname), lb, ctx)
                          for mname, lb in bank.layers.items()})
    # the class's forward and generate looked up at each call (prepare_decode may change the model's class to one with
    # a native decode step afterwards), or the instance's own if something already wrapped them
    own_fwd, own_gen = model.__dict__.get("forward"), model.__dict__.get("generate")

    def fwd(*args, **kwargs):
        return own_fwd(*args, **kwargs) if own_fwd is not None else type(model).forward(model, *args, **kwargs)

    def gen(*args, **kwargs):
        return own_gen(*args, **kwargs) if own_gen is not None else type(model).generate(model, *args, **kwargs)
    has_gen = own_gen is not None or hasattr(type(model), "generate")

    def resolve(adapter_names, args, kwargs):
        """(adapters, weights) for ctx.use: PEFT-style names, or a routed mixture for "auto"."""
        if isinstance(adapter_names, str) and adapter_names == "auto":
            return _routed(model, args, kwargs)
        _check_names(adapter_names, _batch_size(args, kwargs))
        return adapter_names, None

    def forward(*args, adapter_names=None, **kwargs):
        adapters, weights = resolve(adapter_names, args, kwargs)
        with ctx.use(adapters, weights):
            return fwd(*args, **kwargs)

    def generate(*args, adapter_names=None, **kwargs):
        weights = None
        if adapter_names is not None:
            adapter_names, weights = resolve(adapter_names, args, kwargs)  # once per request, not per token
            # generate repeats every sample max(num_beams, num_return_sequences) times, sample by sample
            # (transformers' _expand_inputs_for_generation); PEFT repeats the names by num_beams
            gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
            beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
            nret = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
            k = max(int(beams), int(nret))
            adapter_names = [n for n in adapter_names for _ in range(k)]
            if weights is not None:
                weights = weights.repeat_interleave(k, 0)
        with ctx.use(adapter_names, weights):
            return gen(*args, **kwargs)

    model.forward = forward
    if has_gen:
        model.generate = generate
    model.lorakern_bank, model.lorakern_context = bank, ctx
    # the names only: each MultiLoRALinear holds the module it replaced, and prepare_decode may fuse them (the
    # originals kept here would be stale copies of the fused weights)
    model._lorakern_restore = (sorted(old), own_fwd, own_gen)
    return bank


def _routed(model, args, kwargs):
    """``adapter_names="auto"``: the model's router (:func:`lorakern.apps.dlp.attach_router`) picks each sample's
    adapters and weights from its prompt; returns bank ids ``[B, k]`` (-1 padded) and weights ``[B, k]``."""
    router = getattr(model, "lorakern_router", None)
    if router is None:
        raise ValueError("lorakern: adapter_names='auto' needs a router: lorakern.apps.dlp.attach_router(model, router)")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor):
        raise ValueError("lorakern: adapter_names='auto' routes on input_ids; none were given")
    names, weights = router.route(model, ids, kwargs.get("attention_mask"))
    bank = model.lorakern_bank
    bank_ids = [[bank.id(n) if n is not None else -1 for n in row] for row in names]
    return bank_ids, weights


def _batch_size(args, kwargs) -> int | None:
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(x, torch.Tensor):
            return x.shape[0]
    return None


def _check_names(names, batch: int | None) -> None:
    """PEFT's rule: ``adapter_names`` is a list with one entry per sample of the batch."""
    if names is None:
        return
    if not isinstance(names, (list, tuple)):
        raise TypeError(f"lorakern: adapter_names must be a list with one adapter name per sample, got "
                        f"{type(names).__name__} (per-token assignment: model.lorakern_context.use)")
    if batch is not None and len(names) != batch:
        raise ValueError(f"lorakern: Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(names)} and {batch} respectively (one adapter name per sample, as PEFT; per-token "
                         "assignment: model.lorakern_context.use)")


def detach_adapters(model: nn.Module) -> None:
    """Undo :func:`attach_adapters`: the modules the bank wrapped, forward and generate come back (a layer that
    :func:`lorakern.models.fuse_projections` fused since stays fused, with its fused projection unwrapped)."""
    names, fwd, gen = model.__dict__.pop("_lorakern_restore")
    ctx = model.__dict__.get("lorakern_context")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if is_fused(parent):  # its projections' wrappers, fused or not, under their current names
            for n, child in list(parent.named_children()):
                if type(child) in (MultiLoRALinear, MultiLoRASlicesLinear) and child.context is ctx:
                    setattr(parent, n, child.base)
            continue
        mod = parent._modules.get(attr)
        if type(mod) is MultiLoRALinear and mod.context is ctx:
            replace_module(model, name, mod.base)
    forget_compiled_call(model)
    for attr in ("forward", "generate", "lorakern_bank", "lorakern_context", "lorakern_router"):
        model.__dict__.pop(attr, None)
    if fwd is not None:  # what wrapped them before attach_adapters
        model.forward = fwd
    if gen is not None:
        model.generate = gen
