"""Who runs each op: backends register their kernels next to each function, and the eager CPU fast
path has one owner.

``@kernel("quant_matmul", "cpu", eager=True)`` registers a function as the op's kernel for a device
type with torch's dispatcher (``torch.library.register_kernel``) and, with ``eager=True``, also as
the op's eager fast path: :func:`call` runs it directly for plain CPU tensors outside
``torch.compile``, skipping the dispatcher's round trip (about 13 us a call, a tenth of a SmolLM2
decode step). Tensor subclasses (fake tensors, ...), other devices and traced code go through
``torch.ops.lorakern.<op>``, so torch.compile sees the registered custom op.

Stateful helpers that only make sense on the eager CPU path (an adapter or bank validated once, its
pointers kept) register with ``@helper(name)`` and are fetched with :func:`eager_helper`.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["call", "eager_cpu", "eager_helper", "helper", "kernel"]

_EAGER: dict[str, Callable] = {}
_HELPERS: dict[str, Callable] = {}


def eager_cpu(x: torch.Tensor) -> bool:
    """True when ``x`` may take the eager CPU fast path: a plain CPU tensor, not under torch.compile."""
    return type(x) is torch.Tensor and x.device.type == "cpu" and not torch.compiler.is_compiling()


def _needs_grad(x: torch.Tensor, args) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args))


def kernel(op: str, device: str, eager: bool = False):
    """Decorator: register ``fn`` as ``lorakern::op``'s kernel for ``device`` (``eager=True``: also the
    eager fast path of :func:`call`)."""
    def register(fn):
        torch.library.register_kernel(f"lorakern::{op}", device, fn)
        if eager:
            _EAGER[op] = fn
        return fn
    return register


def helper(name: str):
    """Decorator: register an eager-CPU-only helper (a class or function) under ``name``."""
    def register(obj):
        _HELPERS[name] = obj
        return obj
    return register


def eager_helper(name: str):
    """The helper registered under ``name`` (KeyError naming the registered ones if none)."""
    try:
        return _HELPERS[name]
    except KeyError:
        raise KeyError(f"lorakern: no eager helper {name!r} (registered: {sorted(_HELPERS)})") from None


def call(op: str, x: torch.Tensor, *args):
    """``torch.ops.lorakern.<op>(x, *args)``, through the eager fast path when :func:`eager_cpu` (x) and no
    argument needs a gradient (autograd lives behind the dispatcher)."""
    fn = _EAGER.get(op) if eager_cpu(x) and not _needs_grad(x, args) else None
    if fn is not None:
        return fn(x, *args)
    return getattr(torch.ops.lorakern, op)(x, *args)
