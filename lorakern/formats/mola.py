"""MoLA adapter records: per adapted projection a router and E_l LoRA experts (Gao et al., "Higher Layers Need
More LoRA Experts", arXiv 2402.08562).

Data definitions and their checks only; files are read and written by :mod:`lorakern.adapters.mola`, the
mixture is applied by :class:`lorakern.nn.MoLALinear` and trained by :mod:`lorakern.apps.train.mola`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .lora import CompressedLoRA, LoraLayer

__all__ = ["ALLOCATIONS", "MoLAAdapter", "MoLAConfig", "MoLALayer", "allocate_experts", "layer_index"]

#: the paper's allocations over four groups of layers (bottom to top)
ALLOCATIONS = {"2-4-6-8": (2, 4, 6, 8), "8-6-4-2": (8, 6, 4, 2), "8-2-2-8": (8, 2, 2, 8), "5-5-5-5": (5, 5, 5, 5)}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(module: str) -> int:
    """The decoder layer a module name belongs to (``model.layers.7.self_attn.q_proj`` -> 7).

    Raises:
        ValueError: the name holds no ``layers.<i>.`` part.
    """
    m = _LAYER.search(module)
    if m is None:
        raise ValueError(f"lorakern: {module!r} is not inside a decoder layer ('layers.<i>.')")
    return int(m.group(1))


def allocate_experts(allocation, num_layers: int) -> list[int]:
    """Expert counts per decoder layer.

    Args:
        allocation: a name of :data:`ALLOCATIONS` (``"2-4-6-8"``), a string ``"a-b-c-d"`` or a sequence of
            counts over equal groups of layers (any number of groups <= ``num_layers``), or a list of
            ``num_layers`` counts (one per layer).
        num_layers: decoder layers of the model.

    Groups split the layers as evenly as possible, lower groups first taking the extra layer
    (30 layers in four groups: 8, 8, 7, 7).

    Raises:
        ValueError: a count < 1, more groups than layers, or a malformed string.
    """
    if isinstance(allocation, str):
        try:
            counts = [int(v) for v in allocation.split("-")]
        except ValueError:
            raise ValueError(f"lorakern: allocation {allocation!r} is not like '2-4-6-8'") from None
    else:
        counts = [int(v) for v in allocation]
    if not counts or min(counts) < 1:
        raise ValueError(f"lorakern: expert counts must be >= 1, got {counts}")
    if num_layers < 1 or len(counts) > num_layers:
        raise ValueError(f"lorakern: {len(counts)} groups for {num_layers} layers")
    q, rem = divmod(num_layers, len(counts))
    out = []
    for g, c in enumerate(counts):
        out += [c] * (q + (g < rem))
    return out


@dataclass(frozen=True)
class MoLAConfig:
    """What a MoLA adapter is (``mola_config.json``).

    Attributes:
        experts_per_layer: E_l for every decoder layer l (length = the model's layers).
        target_modules: projection names adapted in every layer (``q_proj``, ..., ``down_proj``).
        rank: the experts' default rank (each expert's own rank is its tensors' rank).
        alpha: LoRA alpha; an expert of rank r is scaled by ``alpha / r`` (PEFT's rule).
        top_k: experts mixed per token (2 in the paper); a layer with fewer experts uses all of them.
        aux_loss_coef: the Switch-style load-balancing coefficient used in training (recorded only).
    """

    experts_per_layer: tuple[int, ...]
    target_modules: tuple[str, ...]
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    aux_loss_coef: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "experts_per_layer", tuple(int(e) for e in self.experts_per_layer))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.experts_per_layer or min(self.experts_per_layer) < 1:
            raise ValueError(f"lorakern: MoLA needs >= 1 expert per layer, got {self.experts_per_layer}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"lorakern: MoLA target_modules must be non-empty names, got {self.target_modules}")
        if int(self.rank) < 1 or int(self.top_k) < 1:
            raise ValueError(f"lorakern: MoLA rank and top_k must be >= 1, got {self.rank}, {self.top_k}")
        if not (float(self.alpha) > 0 and float(self.alpha) < float("inf")):
            raise ValueError(f"lorakern: MoLA alpha must be a positive finite number, got {self.alpha}")
        if not (0 <= float(self.aux_loss_coef) < float("inf")):
            raise ValueError(f"lorakern: aux_loss_coef must be >= 0, got {self.aux_loss_coef}")

    def to_json(self) -> dict:
        return {"experts_per_layer": list(self.experts_per_layer), "target_modules": list(self.target_modules),
                "rank": int(self.rank), "lora_alpha": float(self.alpha), "top_k": int(self.top_k),
                "aux_loss_coef": float(self.aux_loss_coef)}

    @classmethod
    def from_json(cls, d: dict) -> "MoLAConfig":
        """Raises ValueError / TypeError naming the bad field."""
        if not isinstance(d, dict):
            raise TypeError("lorakern: a MoLA config must be a JSON object")
        unknown = set(d) - {"experts_per_layer", "target_modules", "rank", "lora_alpha", "top_k", "aux_loss_coef",
                            "format", "format_version", "base_model_name_or_path"}
        if unknown:
            raise ValueError(f"lorakern: MoLA config fields not supported: {sorted(unknown)}")
        for k in ("experts_per_layer", "target_modules"):
            if not isinstance(d.get(k), list):
                raise TypeError(f"lorakern: MoLA config {k!r} must be a list")
        for k in ("rank", "top_k"):
            if not isinstance(d.get(k, 1), int) or isinstance(d.get(k, 1), bool):
                raise TypeError(f"lorakern: MoLA config {k!r} must be an integer")
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in d["experts_per_layer"]):
            raise TypeError("lorakern: MoLA config 'experts_per_layer' must hold integers")
        return cls(tuple(d["experts_per_layer"]), tuple(d["target_modules"]), d.get("rank", 8),
                   float(d.get("lora_alpha", 16.0)), d.get("top_k", 2), float(d.get("aux_loss_coef", 0.0)))


@dataclass
class MoLALayer:
    """One adapted projection ``[N, K]``: ``router`` ``[E, K]`` (a bias-free Linear(K, E); floating, served in
    fp32) and E experts
    (:class:`LoraLayer` with ``A [r_e, K]``, ``B [N, r_e]``, ``scale``; or :class:`CompressedLoRA`)."""

    router: torch.Tensor
    experts: list = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)`` of the adapted projection."""
        e = self.experts[0]
        return tuple(e.shape) if isinstance(e, CompressedLoRA) else (e.B.shape[0], e.A.shape[1])

    def ranks(self) -> list[int]:
        return [e.rank if isinstance(e, CompressedLoRA) else e.A.shape[0] for e in self.experts]

    def validate(self, where: str = "MoLA layer") -> None:
        """Raises ValueError/TypeError if the router and experts do not form one ``[N, K]`` layer."""
        if not self.experts:
            raise ValueError(f"lorakern: {where}: no experts")
        r = self.router
        if not isinstance(r, torch.Tensor) or not r.dtype.is_floating_point or r.dim() != 2:
            raise TypeError(f"lorakern: {where}: the router must be a 2-D floating tensor [E, K]")
        for i, e in enumerate(self.experts):  # the kinds first: `shape` reads expert 0
            if isinstance(e, CompressedLoRA):
                continue
            if not isinstance(e, LoraLayer):
                raise TypeError(f"lorakern: {where}: expert {i} is a {type(e).__name__}")
            if not isinstance(e.A, torch.Tensor) or not isinstance(e.B, torch.Tensor) or e.A.dim() != 2 \
                    or e.B.dim() != 2:
                raise ValueError(f"lorakern: {where}: expert {i}'s A and B must be 2-D tensors")
        N, K = self.shape
        if tuple(r.shape) != (len(self.experts), K):
            raise ValueError(f"lorakern: {where}: router {tuple(r.shape)} does not match {len(self.experts)} experts "
                             f"of in_features {K}")
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"lorakern: {where}: the router contains NaN or Inf")
        for i, e in enumerate(self.experts):
            if isinstance(e, CompressedLoRA):
                if tuple(e.shape) != (N, K):
                    raise ValueError(f"lorakern: {where}: expert {i} is for {tuple(e.shape)}, expert 0 for {(N, K)}")
                continue
            A, B = e.A, e.B
            if A.shape[1] != K or B.shape[0] != N or A.shape[0] != B.shape[1] or A.shape[0] < 1:
                raise ValueError(f"lorakern: {where}: expert {i} A {tuple(A.shape)} / B {tuple(B.shape)} does not "
                                 f"fit {(N, K)}")
            if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
                raise ValueError(f"lorakern: {where}: expert {i} contains NaN or Inf")

    @property
    def compressed(self) -> bool:
        return any(isinstance(e, CompressedLoRA) for e in self.experts)


@dataclass
class MoLAAdapter:
    """A MoLA adapter: its config and ``{module name: MoLALayer}`` (names relative to the model, e.g.
    ``model.layers.0.self_attn.q_proj``), plus free-form string metadata."""

    config: MoLAConfig
    layers: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Every layer valid, in a decoder layer the config covers, with that layer's expert count and a
        target module's name. Raises ValueError/TypeError naming the layer."""
        if not self.layers:
            raise ValueError("lorakern: a MoLA adapter without layers")
        L = len(self.config.experts_per_layer)
        for name, layer in self.layers.items():
            layer.validate(name)
            li = layer_index(name)
            if li >= L:
                raise ValueError(f"lorakern: {name}: layer {li} but the config lists {L} layers")
            if layer.num_experts != self.config.experts_per_layer[li]:
                raise ValueError(f"lorakern: {name}: {layer.num_experts} experts, the config says "
                                 f"{self.config.experts_per_layer[li]} for layer {li}")
            if name.split(".")[-1] not in self.config.target_modules:
                raise ValueError(f"lorakern: {name} is not one of the target modules {self.config.target_modules}")

    def num_parameters(self) -> int:
        """Trainable parameters: routers plus dense experts' A and B."""
        n = 0
        for layer in self.layers.values():
            N, K = layer.shape
            n += layer.router.numel() + sum(r * (N + K) for r in layer.ranks())
        return n
