"""QALoRALinear: a quantized layer plus an unmerged QA-LoRA adapter (arXiv 2309.14717)."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..formats.linear_like import linear_shape
from ..formats.quantized import QuantizedWeight
from ..ops.reference import qalora_pool
from ..quant.qalora import merge_qalora
from .gwq_linear import GWQLinear
from .quant_linear import QuantLinear

__all__ = ["QALoRALinear"]


class QALoRALinear(nn.Module):
    """``y = base(x) + scale * (pool_G(x) A^T) B^T``, ``pool_G`` the mean of x over each group of G inputs.

    Args:
        base: the layer (a :class:`QuantLinear` / :class:`GWQLinear` with group size G to serve fused and
            merge; any linear layer with ``in_features`` divisible by G to apply the adapter).
        A: ``[r, in_features / G]`` float, B: ``[out_features, r]`` float (stored fp32), scale: ``alpha / r``.
        group_size: G (default: the base's group size).

    With a :class:`QuantLinear` of group size G on CPU or CUDA and no gradient needed, ``forward`` runs one
    ``torch.ops.lorakern.quant_matmul_qalora`` call (base and adapter fused; on CPU the pooled input is the
    int8-quantized activations the base kernel uses, so the result is the merged layer's up to the merged
    zeros' fp16 rounding). Otherwise the base runs, then the adapter in torch (differentiable).
    :meth:`merged` folds the adapter into the zeros (:func:`lorakern.quant.qalora.merge_qalora`).

    Raises:
        ValueError: shapes that do not fit, G not dividing in_features, NaN/Inf in the adapter.
    """

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float, group_size: int | None = None):
        super().__init__()
        shape = linear_shape(base)
        if shape is None:
            raise ValueError(f"lorakern: a {type(base).__name__} is not a linear layer")
        self.out_features, self.in_features = shape
        G = group_size if group_size is not None else getattr(base, "group_size", None)
        if not isinstance(G, int) or G < 1 or self.in_features % G:
            raise ValueError(f"lorakern: QA-LoRA group size {G!r} must divide in_features={self.in_features}")
        self.group_size = G
        ng = self.in_features // G
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != ng or B.shape[0] != self.out_features \
                or A.shape[0] != B.shape[1]:
            raise ValueError(f"lorakern: QA-LoRA A {tuple(A.shape)} / B {tuple(B.shape)} do not fit a "
                             f"{self.in_features} -> {self.out_features} layer with groups of {G} (A must be "
                             f"[r, {ng}], B [{self.out_features}, r])")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError("lorakern: QA-LoRA adapter weights contain NaN or Inf")
        self.base = base
        self.rank, self.scale = A.shape[0], float(scale)
        dev = next((t.device for t in (*base.parameters(), *base.buffers())), torch.device("cpu"))
        self.register_buffer("lora_A", A.detach().to(dev, torch.float32, copy=True).contiguous())  # own copies
        self.register_buffer("lora_B", B.detach().to(dev, torch.float32, copy=True).contiguous())
        self._bt = None  # B^T contiguous, built once for the fused op
        #: run base and adapter as one fused op where possible (False: the adapter in torch on the exact input)
        self.fused = True

    def _apply(self, fn, *args, **kwargs):
        self._bt = None
        return super()._apply(fn, *args, **kwargs)

    def _fused(self, x: torch.Tensor) -> bool:
        b = self.base
        return (self.fused and type(b) is QuantLinear and b.group_size == self.group_size and x.device.type in ("cpu", "cuda")
                and not (torch.is_grad_enabled() and x.requires_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x):
            b = self.base
            B = self.lora_B
            if torch.compiler.is_compiling():
                bt = B.t().contiguous()
            else:  # B^T built once, again whenever B changes (in place too: its version counter moves)
                key = (B.data_ptr(), B._version, B.device)
                if self._bt is None or self._bt[0] != key:
                    self._bt = (key, B.t().contiguous())
                bt = self._bt[1]
            return ops.quant_matmul_qalora(x, b.qweight, b.scales, b.zeros, b.bits, b.group_size, b.bias,
                                           self.lora_A, bt, self.scale)
        t = qalora_pool(x, self.group_size) @ self.lora_A.to(x.dtype).t()
        return self.base(x) + (t @ self.lora_B.to(x.dtype).t()) * self.scale

    def merged(self) -> nn.Module:
        """A new :class:`QuantLinear` / :class:`GWQLinear` with the adapter folded into its fp16 zeros (codes,
        scales, outliers and bias shared with the base).

        Raises:
            TypeError: the base is not a quantized layer; ValueError: its group size differs from the
                adapter's, or the merge is impossible (:func:`~lorakern.quant.qalora.merged_zeros`).
        """
        b = self.base
        if not isinstance(b, (QuantLinear, GWQLinear)):
            raise TypeError(f"lorakern: QA-LoRA merges into a quantized layer's zeros, not a {type(b).__name__}")
        if b.group_size != self.group_size:
            raise ValueError(f"lorakern: the adapter pools groups of {self.group_size} but the base is quantized in "
                             f"groups of {b.group_size}: it cannot be folded into the zeros")
        w = merge_qalora(QuantizedWeight(b.qweight, b.scales, b.zeros, b.bits, b.group_size), self.lora_A,
                         self.lora_B, self.scale)
        if isinstance(b, QuantLinear):
            return QuantLinear(w, b.bias)
        g = b.weight_gwq
        return GWQLinear(type(g)(w, g.outliers), b.bias)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, group_size={self.group_size}"
