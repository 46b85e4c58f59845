"""MoLALinear: a linear layer with E LoRA experts and a top-k router, the mixture applied by one
``torch.ops.lorakern.multi_lora`` call (MoLA, Gao et al., arXiv 2402.08562).

Per token: ``p = softmax(x R^T)`` over the E experts, the top k kept and renormalised to weights ``w``,
``y = base(x) + sum_{e in top-k} w_e * (alpha / r_e) * B_e A_e x``. The router's choice becomes the
per-token entries of a :class:`~lorakern.multilora.LoRABatch` (one segment per expert) built on the
activations' device without a host round trip, and the experts live in the layer's
:class:`~lorakern.multilora.LayerBank` (dense fp16/bf16/fp32 or LoRAQuant-compressed, any ranks), so a
layer costs one router matmul and one multi-adapter kernel, with no Python loop over experts.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats.linear_like import linear_shape
from ..formats.mola import MoLALayer
from ..multilora.bank import LayerBank
from ..multilora.batch import LoRABatch
from ..ops.registry import eager_cpu, eager_helper

__all__ = ["MoLALinear", "mixture_batch", "mola_expert_loop", "route_top_k"]


def route_top_k(x: torch.Tensor, router: torch.Tensor, k: int, return_probs: bool = False):
    """MoLA's router: ``softmax(x R^T)`` in fp32 (fp64 when x or R is fp64), the top ``k`` experts per token, weights renormalised to sum 1.

    Args:
        x: ``[T, K]`` activations (any float dtype).
        router: ``[E, K]`` router weight (``nn.Linear(K, E, bias=False).weight``).
        k: experts per token, ``1 <= k <= E``.

    Returns:
        ``(ids int64 [T, k], weights [T, k])``, plus the full ``probs [T, E]`` with ``return_probs``
        (for a load-balancing loss); differentiable in ``x`` and ``router`` through the weights.
        Experts are ranked by their logits, exact ties to the lower index (a stable sort, on every device and in
        ``lk_route_top_k``). Non-finite logits are refused on the eager CPU path only (elsewhere a check would
        synchronise the device): there they give NaN weights, as torch's own softmax does.
    """
    E = router.shape[0]
    if x.dim() != 2 or router.dim() != 2 or x.shape[1] != router.shape[1]:
        raise ValueError(f"lorakern: route_top_k takes x [T, K] and router [E, K], got {tuple(x.shape)} and "
                         f"{tuple(router.shape)}")
    if not 1 <= k <= E:
        raise ValueError(f"lorakern: top_k={k} must be in [1, {E}] (the layer's experts)")
    dt = torch.promote_types(torch.promote_types(x.dtype, router.dtype), torch.float32)  # fp32, or fp64 if given
    logits = x.to(dt) @ router.to(dt).t()
    probs = torch.softmax(logits, dim=-1)
    # rank by the logits (as lk_route_top_k does), not the probabilities: exp() can round two different logits to
    # one probability; a stable sort sends exact ties to the lower expert (topk's tie order is unspecified)
    ids = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    top = probs.gather(-1, ids)
    w = top / top.sum(-1, keepdim=True)
    return (ids, w, probs) if return_probs else (ids, w)


def mixture_batch(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> LoRABatch:
    """The :class:`LoRABatch` of a top-k routing: ``ids int64 [T, k]`` (each in ``[0, E)``, distinct per
    row) with ``weights fp32 [T, k]``; one segment per expert (empty ones included), built with device ops
    only (no ``.item()``, no host copy: the same on CPU, CUDA and under torch.compile). The caller
    guarantees the ids' range (the router's top-k does)."""
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    tokens = torch.div(order, k, rounding_mode="floor")
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).index_add_(
        0, flat, torch.ones_like(flat))
    starts = torch.cumsum(counts, 0) - counts
    segments = torch.stack([torch.arange(num_experts, device=ids.device), starts, counts], 1)
    # max_count: a token meets an expert at most once, so T bounds every segment (a host-known launch bound)
    return LoRABatch(T, tokens, weights.reshape(-1)[order].float().contiguous(), segments, T,
                     list(range(num_experts)), mixture=k > 1)


def mola_expert_loop(x: torch.Tensor, base: torch.Tensor, layer: MoLALayer, top_k: int,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The reference formulation (MoLA's published code): route, then loop over experts in Python, each
    adding ``w * scale * (x A^T) B^T`` to the tokens that chose it. ``x [T, K]``, ``base [T, N]``; computed in
    ``dtype`` (fp64 for tests, fp32 for the benchmark's peer). Dense experts only."""
    ids, w = route_top_k(x, layer.router, min(top_k, layer.num_experts))
    y = base.to(dtype).clone()
    xd = x.to(dtype)
    for e, ex in enumerate(layer.experts):
        hit = ids == e
        rows = hit.any(-1).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        we = (w * hit).sum(-1)[rows].to(dtype)
        A, B = ex.A.to(dtype), ex.B.to(dtype)
        y.index_add_(0, rows, (we * float(ex.scale))[:, None] * ((xd[rows] @ A.t()) @ B.t()))
    return y


class MoLALinear(nn.Module):
    """A linear layer with a MoLA mixture of LoRA experts (inference; training uses
    :func:`lorakern.apps.train.train_mola_adapter`).

    Args:
        base: the wrapped linear layer (``nn.Linear``, :class:`QuantLinear`, :class:`GWQLinear`, ...).
        layer: the router and experts (:class:`~lorakern.formats.mola.MoLALayer`; validated here).
        top_k: experts per token (capped at the layer's expert count).
        dtype: storage dtype of dense experts in the bank (fp16 by default; compressed experts keep their codes).

    ``forward(x [..., K]) -> [..., N]`` in the base's output dtype; the router runs in fp32 (its buffer stays
    usable after ``.half()``). Moving the model does not move the expert bank: detach, move, attach.

    Raises:
        ValueError: the layer does not fit ``base`` or is malformed.
    """

    def __init__(self, base: nn.Module, layer: MoLALayer, top_k: int = 2, dtype: torch.dtype = torch.float16):
        super().__init__()
        shape = linear_shape(base)
        if shape is None:
            raise ValueError(f"lorakern: MoLALinear wraps a linear layer, got {type(base).__name__}")
        layer.validate()
        if tuple(layer.shape) != tuple(shape):
            raise ValueError(f"lorakern: MoLA layer {tuple(layer.shape)} does not match the module {shape}")
        if int(top_k) < 1:
            raise ValueError(f"lorakern: top_k must be >= 1, got {top_k}")
        self.base = base
        self.out_features, self.in_features = shape
        self.num_experts = layer.num_experts
        self.top_k = min(int(top_k), self.num_experts)
        device = next((p.device for p in base.parameters()), None) or \
            next((b.device for b in base.buffers()), torch.device("cpu"))
        self.register_buffer("router", layer.router.detach().to(device, torch.float32).contiguous())
        self._ids = list(range(self.num_experts))
        self.bank = LayerBank(self.out_features, self.in_features, dtype, device)
        for e, ex in enumerate(layer.experts):
            self.bank.set(e, ex)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return y
        out = self.add_experts(x2, y.reshape(-1, self.out_features).to(x.dtype))
        return out.view(y.shape).to(y.dtype)

    def route(self, x2: torch.Tensor) -> LoRABatch:
        """The :class:`LoRABatch` of the router's top-k choice for ``x2 [T, K]``: one C++ call on eager CPU
        (``lk_route_top_k``), torch ops elsewhere (any device, torch.compile; the same entries)."""
        if self.bank.device.type != x2.device.type or self.router.device.type != x2.device.type:
            raise RuntimeError(f"lorakern: MoLA experts are on {self.bank.device}, router on {self.router.device}, "
                               f"activations on {x2.device}: detach the MoLA adapter, move the model, attach it again")
        if eager_cpu(x2) and self.bank.device.type == "cpu":
            T = x2.shape[0]
            router = self.router if self.router.dtype == torch.float32 else self.router.float()  # (after .half())
            logits = torch.mm(x2 if x2.dtype == torch.float32 else x2.float(), router.t())
            seg, tok, w = eager_helper("route_top_k")(logits, self.top_k)
            return LoRABatch(T, tok, w, seg, T, self._ids, mixture=self.top_k > 1)
        ids, w = route_top_k(x2, self.router, self.top_k)
        return mixture_batch(ids, w, self.num_experts)

    def add_experts(self, x2: torch.Tensor, base2: torch.Tensor) -> torch.Tensor:
        """``base2 [T, N] + the routed mixture of experts applied to x2 [T, K]`` (one dtype): the adapter part of
        :meth:`forward`, one multi-adapter kernel call."""
        return self.bank.apply(x2, base2, self.route(x2))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}"
