"""LoRALinear: any linear layer (torch, QuantLinear, GWQLinear) plus one LoRA adapter,
either plain floating point or LoRAQuant-compressed."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..formats.lora import LORA_PARTS, CompressedLoRA
from ..formats.linear_like import linear_shape
from .quant_linear import QuantLinear
from .storage import FormatBuffers

#: a compressed adapter's buffers: codes, fp16 scales and zeros of each part, in the ops' order
_BUFFERS = tuple(f"lora_{part}_{t}" for part in LORA_PARTS for t in ("codes", "scales", "zeros"))

__all__ = ["LoRALinear"]


class LoRALinear(FormatBuffers):
    """``y = base(x) + scale * (x A^T) B^T``.

    Args:
        base: an ``nn.Linear``, :class:`QuantLinear` or :class:`GWQLinear` (anything
            with ``in_features`` / ``out_features`` mapping ``[..., in] -> [..., out]``).
        adapter: a floating-point adapter (an object with ``A [r, in]``, ``B [out, r]``
            and ``scale``, e.g. :class:`lorakern.adapters.LoraLayer`), or a
            :class:`~lorakern.quant.CompressedLoRA`.
        dtype: storage dtype of a floating-point adapter (default float16; the
            product runs in x's dtype).

    A compressed adapter runs ``torch.ops.lorakern.lora_mixed`` (shrink over the
    high codes and the 1-bit signs, an fp32 rank-r intermediate, expand), fused
    with the base matmul in ``torch.ops.lorakern.quant_matmul_lora`` when the base
    is a :class:`QuantLinear`: one call, each weight read once.
    """

    def __init__(self, base: nn.Module, adapter, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.base = base
        self._prepared = None  # PreparedLoRA: the adapter validated once for eager CPU calls
        shape = linear_shape(base)
        if shape is None:
            raise ValueError(f"lorakern: a {type(base).__name__} is not a linear layer")
        self.out_features, self.in_features = shape
        if isinstance(adapter, CompressedLoRA):
            if adapter.shape != (self.out_features, self.in_features):
                raise ValueError(f"adapter is for a {adapter.shape} weight, the layer is "
                                 f"{(self.out_features, self.in_features)}")
            self.compressed = True
            self.rank, self.h, self.scale = adapter.rank, adapter.h, float(adapter.scale)
            self.bits_high = adapter.bits_high
            self.group_a, self.group_b = adapter.group_sizes
            dev = _device_of(base)
            for name, t in zip(_BUFFERS, adapter.op_tensors(dev)):
                self.register_buffer(name, t)
        else:
            A, B = adapter.A, adapter.B
            if A.dim() != 2 or B.dim() != 2 or A.shape[1] != self.in_features or B.shape[0] != self.out_features \
                    or A.shape[0] != B.shape[1]:
                raise ValueError(f"adapter A {tuple(A.shape)} / B {tuple(B.shape)} do not fit a "
                                 f"{self.in_features} -> {self.out_features} layer")
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise ValueError("adapter weights contain NaN or Inf")
            self.compressed = False
            self.rank, self.scale = A.shape[0], float(adapter.scale)
            dev = _device_of(base)
            self.register_buffer("lora_A", A.detach().to(dev, dtype).contiguous())
            self.register_buffer("lora_B", B.detach().to(dev, dtype).contiguous())

    def __setattr__(self, name, value):
        if name.startswith("lora_"):  # a replaced adapter buffer is validated again at the next call
            self.__dict__["_prepared"] = None
        super().__setattr__(name, value)

    def format_buffer_names(self) -> tuple[str, ...]:
        """A compressed adapter's codes and fp16 scales keep their dtypes; a float adapter follows casts."""
        return _BUFFERS if self.compressed else ()

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(), ...: new buffers
        self.__dict__["_prepared"] = None
        return super()._apply(fn, *args, **kwargs)

    def adapter_tensors(self) -> list[torch.Tensor]:
        """The compressed adapter's 12 op tensors (:meth:`~lorakern.formats.lora.CompressedLoRA.op_tensors`)."""
        return [getattr(self, name) for name in _BUFFERS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compressed:
            t = x @ self.lora_A.to(x.dtype).t()
            return self.base(x) + (t @ self.lora_B.to(x.dtype).t()) * self.scale
        b = self.base
        if ops.eager_cpu(x):
            # eager CPU: the kernels without the dispatcher round trip; the adapter is validated once, and
            # again after its buffers are replaced (__setattr__, _apply)
            p = self._prepared
            if p is None:
                p = self._prepared = ops.eager_helper("prepared_lora")(
                    self.adapter_tensors(), self.bits_high, self.group_a, self.group_b, self.out_features,
                    self.in_features, self.scale)
            if type(b) is QuantLinear:
                return p.quant_matmul_lora(x, b.qweight, b.scales, b.zeros, b.bits, b.group_size, b.bias)
            return p.lora_mixed(x, b(x))
        args = (self.adapter_tensors(), self.bits_high, self.group_a, self.group_b, self.scale)
        if type(b) is QuantLinear:
            return torch.ops.lorakern.quant_matmul_lora(x, b.qweight, b.scales, b.zeros, b.bits, b.group_size,
                                                        b.bias, *args)
        return torch.ops.lorakern.lora_mixed(x, b(x), *args)

    def extra_repr(self) -> str:
        kind = f"compressed h={self.h} bits_high={self.bits_high}" if self.compressed else "float"
        return f"rank={self.rank}, scale={self.scale:g}, {kind}"


def _device_of(m: nn.Module) -> torch.device:
    for t in (*m.parameters(), *m.buffers()):
        return t.device
    return torch.device("cpu")
