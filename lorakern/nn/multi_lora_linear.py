"""MultiLoRALinear: a linear layer plus a bank of adapters, each token of a batch with its own
adapter (or a weighted mixture), applied by ``torch.ops.lorakern.multi_lora``."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ..multilora.bank import AdapterBank, LayerBank, apply_slices
from ..multilora.batch import LoRABatch
from ..formats.linear_like import linear_shape

__all__ = ["MultiLoRAContext", "MultiLoRALinear", "MultiLoRASlicesLinear"]


class MultiLoRAContext:
    """The batch every :class:`MultiLoRALinear` of a model reads: set once per forward pass (per sample
    or per token), expanded to a layer's token count once and cached for the other layers."""

    def __init__(self, bank: AdapterBank):
        self.bank = bank
        self.batch: LoRABatch | None = None
        self._cache: dict = {}

    def set(self, adapters=None, weights=None) -> None:
        """Per-sample (or per-token) adapters: names or ids, ``None``/``'__base__'``/-1 for none; or
        ``[n, k]`` ids/names with ``weights [n, k]`` for mixtures. ``adapters=None`` clears."""
        self._cache = {}
        self.batch = None if adapters is None else self.bank.batch(adapters, weights)

    @contextmanager
    def use(self, adapters=None, weights=None):
        """``with ctx.use(names): model(...)``; ``None`` keeps what is set (nested calls)."""
        if adapters is None:
            yield self
            return
        saved = (self.batch, self._cache)
        self.set(adapters, weights)
        try:
            yield self
        finally:
            self.batch, self._cache = saved

    def batch_for(self, x: torch.Tensor, banks: list) -> LoRABatch | None:
        """The batch for activations ``x [..., K]`` (:meth:`for_shape` of its leading shape) on ``x``'s device, or
        None when no adapter applies.

        Raises:
            RuntimeError: one of ``banks`` (LayerBanks; ``None`` entries skipped) is on another device than ``x``.
        """
        b = self.for_shape(tuple(x.shape[:-1]))
        if b is None:
            return None
        other = next((lb.device for lb in banks if lb is not None and lb.device.type != x.device.type), None)
        if other is not None:
            raise RuntimeError(f"lorakern: the adapter bank is on {other}, the activations on {x.device}: "
                               "detach_adapters, move the model, then attach_adapters again (device= chooses "
                               "the bank's device)")
        return b if b.tokens.device == x.device else b.to(x.device)

    def for_shape(self, lead: tuple) -> LoRABatch | None:
        """The batch for activations of leading shape ``lead`` (``[B, S]``: per-sample batches repeat over S)."""
        if self.batch is None or not self.batch.segments.shape[0]:
            return None
        # under torch.compile the cache is neither read nor written: a traced write would change what the
        # next call's guards see and recompile the graph every time
        b = None if torch.compiler.is_compiling() else self._cache.get(lead)
        if b is None:
            T = math.prod(lead)
            n = self.batch.num_tokens
            if n == T:
                b = self.batch
            elif len(lead) >= 2 and lead[0] == n:
                b = self.batch.repeat_tokens(T // n)
            else:
                raise ValueError(f"lorakern: the adapter batch names {n} samples/tokens, the activations are "
                                 f"{tuple(lead)} (one adapter name per sample, as PEFT's adapter_names)")
            if not torch.compiler.is_compiling():
                self._cache[lead] = b
        return b


class MultiLoRALinear(nn.Module):
    """``y = base(x) + sum over the token's adapters of w * scale * (x A^T) B^T``.

    Args:
        base: the wrapped linear layer (``nn.Linear``, :class:`QuantLinear`, :class:`GWQLinear`, ...).
        bank: this layer's :class:`~lorakern.multilora.LayerBank`.
        context: the model's :class:`MultiLoRAContext` (which adapter each token uses).

    With no batch set (or every token on ``'__base__'``) it is exactly ``base``.
    """

    def __init__(self, base: nn.Module, bank: LayerBank, context: MultiLoRAContext):
        super().__init__()
        shape = linear_shape(base)
        if (bank.N, bank.K) != shape:
            raise ValueError(f"lorakern: bank layer {(bank.N, bank.K)} does not match the module {shape}")
        self.base, self.bank, self.context = base, bank, context
        self.out_features, self.in_features = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        b = self.context.batch_for(x, [self.bank])
        if b is None:
            return y
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        out = self.bank.apply(x2, y2.to(x.dtype), b)
        return out.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        live = int((self.bank.table[:, 0] != 0).sum()) if self.bank.num_slots else 0
        return f"in={self.in_features}, out={self.out_features}, adapters={live}"


class MultiLoRASlicesLinear(nn.Module):
    """Projections that read one input, fused into one layer (q/k/v, gate/up: :func:`lorakern.models.fuse_projections`),
    each output slice with its own bank: ``y[:, slice i] = base(x)[:, slice i] + slice i's adapters``.

    Args:
        base: the fused linear layer ``[sum of the slices' N, K]`` (a :class:`QuantLinear` / :class:`GWQLinear`).
        banks: one :class:`~lorakern.multilora.LayerBank` per slice, in the order of the base's rows, of one
            :class:`~lorakern.multilora.AdapterBank` (``None``: no adapter touches that slice).
        context: the model's :class:`MultiLoRAContext`.
        widths: each slice's output features.

    Outputs equal the separate :class:`MultiLoRALinear` layers side by side (the same kernels on the same rows).

    Raises:
        ValueError: the banks' shapes do not tile the base's output or differ in input features.
    """

    def __init__(self, base: nn.Module, banks: list, context: MultiLoRAContext, widths: list[int]):
        super().__init__()
        shape = linear_shape(base)
        if shape is None or len(banks) != len(widths) or all(b is None for b in banks):
            raise ValueError("lorakern: MultiLoRASlicesLinear needs a linear base, one width per bank and at least "
                             "one bank")
        if sum(widths) != shape[0] or any(b is not None and (b.N, b.K) != (w, shape[1]) for b, w in zip(banks, widths)):
            raise ValueError(f"lorakern: slices {[None if b is None else (b.N, b.K) for b in banks]} of widths "
                             f"{list(widths)} do not tile the base's output {shape}")
        self.base, self.banks, self.context, self.widths = base, list(banks), context, [int(w) for w in widths]
        self.out_features, self.in_features = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        b = self.context.batch_for(x, self.banks)
        if b is None:
            return y
        x2, y2 = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features).to(x.dtype)
        if all(lb is not None for lb in self.banks):
            out = apply_slices(self.banks, x2, y2, b)
        else:  # a slice without adapters keeps the base's columns
            parts, c = [], 0
            for lb, w in zip(self.banks, self.widths):
                part = y2[:, c: c + w]
                parts.append(part if lb is None else lb.apply(x2, part.contiguous(), b))
                c += w
            out = torch.cat(parts, 1)
        return out.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slices={len(self.banks)}"
