"""Training MoLA adapters (Gao et al., "Higher Layers Need More LoRA Experts", arXiv 2402.08562).

Every target projection of decoder layer l gets E_l LoRA experts (PEFT's initialisation: A Kaiming-uniform,
B zero) and a router ``Linear(in, E_l, bias=False)`` (nn.Linear's initialisation); per token the router's
softmax picks the top k experts, their probabilities renormalised are the mixing weights. The training path
computes every expert's shrink in one matmul (the experts' A stacked) and weights each expert's columns by
its routing weight (zero when not chosen), so no Python loop over experts runs and autograd reaches the
router through the weights; tests check it equals the served path (:class:`lorakern.nn.MoLALinear`, one
multi-adapter kernel call) and autograd through the per-expert reference loop. An optional Switch-style
load-balancing loss (Fedus et al. 2021: ``E * sum_e f_e P_e``, f_e the fraction of routing slots given to e,
P_e its mean probability), averaged over the adapted layers and scaled by ``aux_loss_coef`` (1e-3 in MoLA),
is added to the task loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...formats.lora import LoraLayer
from ...formats.mola import MoLAAdapter, MoLAConfig, MoLALayer, allocate_experts, layer_index
from ...nn.mola_linear import route_top_k
from .trainer import TrainConfig, answer_loss, encode_examples, frozen, injected, mixture_examples, optimize

__all__ = ["MoLATrainConfig", "TrainableMoLA", "mola_targets", "train_mola_adapter"]


@dataclass
class MoLATrainConfig(TrainConfig):
    """:class:`TrainConfig` plus MoLA's fields: ``allocation`` (a name of
    :data:`~lorakern.formats.mola.ALLOCATIONS`, ``"a-b-c-d"``, group counts or per-layer counts; see
    :func:`~lorakern.formats.mola.allocate_experts`), ``top_k`` and ``aux_loss_coef`` (0 disables the
    load-balancing loss). ``rank`` and ``alpha`` are every expert's. With ``top_k = 1`` (or a layer of one
    expert) the renormalised weight is always 1, so the task loss gives the router no gradient: it then learns
    only through the load-balancing term."""

    allocation: object = "2-4-6-8"
    top_k: int = 2
    aux_loss_coef: float = 1e-3
    rank: int = 8
    alpha: float = 16.0

    def __post_init__(self):
        super().__post_init__()
        if self.top_k < 1 or self.aux_loss_coef < 0:
            raise ValueError(f"invalid MoLA training config {self}")


class TrainableMoLA(nn.Module):
    """``base(x) + sum_{e in top-k} w_e * scale * (x A_e^T) B_e^T`` with trainable router and experts.

    Args:
        base: the frozen linear layer.
        num_experts: E; rank: every expert's r; alpha: scale = alpha / r; top_k: capped at E.
        gen: the generator of the initial weights.

    After a forward pass in training mode, ``aux`` holds the layer's load-balancing term (a scalar tensor).
    """

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, alpha: float, top_k: int,
                 gen: torch.Generator):
        super().__init__()
        K, N = base.in_features, base.out_features
        self.base, self.E, self.r, self.scale = base, num_experts, rank, alpha / rank
        self.top_k = min(top_k, num_experts)
        bound = 1.0 / math.sqrt(K)  # kaiming_uniform_(a=sqrt(5)): nn.Linear's and PEFT's initialisation
        self.router = nn.Parameter((torch.rand(num_experts, K, generator=gen) * 2 - 1) * bound)
        self.A = nn.Parameter((torch.rand(num_experts * rank, K, generator=gen) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(N, num_experts * rank))
        self.aux = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x2 = x.reshape(-1, self.A.shape[1])
        ids, w, probs = route_top_k(x2, self.router, self.top_k, return_probs=True)
        dense = torch.zeros(x2.shape[0], self.E, dtype=w.dtype, device=x.device).scatter(1, ids, w)
        cols = dense.repeat_interleave(self.r, dim=1) * self.scale  # each expert's rank columns, its weight
        delta = ((x2.to(self.A.dtype) @ self.A.t()) * cols.to(self.A.dtype)) @ self.B.t()
        if self.training:  # every position of the batch counts (padding and prompt tokens too)
            if ids.numel():
                frac = torch.zeros(self.E, device=x.device).index_add_(
                    0, ids.reshape(-1), torch.ones(ids.numel(), device=x.device)) / ids.numel()
                self.aux = self.E * (frac * probs.mean(0)).sum()
            else:
                self.aux = self.router.sum() * 0
        return y + delta.view(*y.shape).to(y.dtype)

    def to_layer(self) -> MoLALayer:
        """The trained router and experts as a :class:`MoLALayer` (copies)."""
        r = self.r
        return MoLALayer(self.router.detach().clone(),
                         [LoraLayer(self.A[e * r:(e + 1) * r].detach().clone(),
                                    self.B[:, e * r:(e + 1) * r].detach().clone(), self.scale)
                          for e in range(self.E)])


def _num_layers(model: nn.Module) -> int:
    """The model's decoder layers: ``config.num_hidden_layers``, else one past the largest ``layers.<i>``."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n is None:
        idx = [layer_index(name) for name, _ in model.named_modules() if _has_layer(name)]
        if not idx:
            raise ValueError("lorakern: cannot tell the model's number of decoder layers")
        n = max(idx) + 1
    return int(n)


def _has_layer(name: str) -> bool:
    try:
        layer_index(name)
        return True
    except ValueError:
        return False


def mola_targets(model: nn.Module, cfg: MoLATrainConfig) -> tuple[list[str], list[int]]:
    """The target ``nn.Linear`` names inside the model's decoder layers and the experts of every layer.

    Raises:
        ValueError: no target inside a decoder layer, or a target in a layer the allocation does not cover."""
    counts = allocate_experts(cfg.allocation, _num_layers(model))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in cfg.targets
             and _has_layer(n)]
    if not names:
        raise ValueError(f"lorakern: no nn.Linear named {cfg.targets} inside the model's decoder layers")
    for name in names:
        if layer_index(name) >= len(counts):
            raise ValueError(f"lorakern: {name} is in layer {layer_index(name)}, the allocation covers "
                             f"{len(counts)} layers")
    return names, counts


def train_mola_adapter(model, tokenizer, tasks, cfg: MoLATrainConfig | None = None, progress: bool = True,
                       data_seed: int = 1_000_003) -> MoLAAdapter:
    """Train a MoLA adapter on a mixture of ``tasks`` (:class:`~lorakern.apps.train.Task`; every step's batch
    spread evenly over them, as :func:`~lorakern.apps.train.train_mixture_adapter` does for plain LoRA).

    Routers and experts are trained with AdamW (the shared loop: warm-up, cosine decay, clipping, a progress
    bar), the loss being the answer tokens' cross entropy plus ``aux_loss_coef`` times the mean
    load-balancing term. Fixed seeds: ``cfg.seed`` for the weights, ``data_seed`` for the examples.

    Returns:
        the :class:`MoLAAdapter` (dense fp32 experts); serve it with :func:`lorakern.adapters.attach_mola`,
        save it with :func:`lorakern.adapters.save_mola_adapter`. The model is left unchanged.
    """
    cfg = cfg or MoLATrainConfig()
    tasks = list(tasks)
    if not tasks:
        raise ValueError("train_mola_adapter needs at least one task")
    torch.manual_seed(cfg.seed)
    names, counts = mola_targets(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    make = lambda name, base: TrainableMoLA(base, counts[layer_index(name)], cfg.rank, cfg.alpha,  # noqa: E731
                                            cfg.top_k, gen)
    with frozen(model), injected(model, names, make) as mods:
        params = [p for m in mods.values() for p in (m.router, m.A, m.B)]

        def loss_fn(step):
            items = mixture_examples(tasks, cfg.batch_size, data_seed + 7919 * cfg.seed + 101 * step)
            loss = answer_loss(model, *encode_examples(tokenizer, items))
            if cfg.aux_loss_coef:
                loss = loss + cfg.aux_loss_coef * torch.stack([m.aux for m in mods.values()]).mean()
            return loss
        model.train()
        optimize(params, cfg, loss_fn, f"train MoLA {_alloc_name(cfg.allocation)}", progress)
        names = ",".join(t.name for t in tasks)
        config = MoLAConfig(tuple(counts), tuple(cfg.targets), cfg.rank, cfg.alpha, cfg.top_k, cfg.aux_loss_coef)
        adapter = MoLAAdapter(config, {n: m.to_layer() for n, m in mods.items()},
                              {"lorakern_task": names, "lorakern_description": f"MoLA on a mixture of {names}"})
    return adapter


def _alloc_name(a) -> str:
    return a if isinstance(a, str) else "-".join(str(int(v)) for v in a)
