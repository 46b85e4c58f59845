"""The generator's condition: task vectors projected onto the directions that tell tasks apart.

A task vector averages the base model's states over a few examples, so it carries
both the task and the particular examples drawn: on the default SmolLM2 task set,
two draws of 32 examples of one task land about half as far apart as two different
tasks (raw vectors, z-scored). Conditioning a generator on the raw vector makes it
follow the drawn numbers. :class:`ConditionProjection` keeps what separates tasks:
Fisher's linear discriminant analysis (LDA; Fisher 1936, the multi-class form of
Rao 1948) fitted on several draws of examples per training task, i.e. the
directions ``w`` that maximise between-task over within-task variance, with the
within-task covariance shrunk towards a multiple of the identity
(``(1 - shrinkage) * S_w + shrinkage * tr(S_w) / D * I``; Friedman 1989's
regularized discriminant analysis) because there are fewer draws than dimensions.
Coordinates are scaled so that a task's vector moves by about one unit per
coordinate between draws of examples.

This departs from ICM-LoRA (Shao et al., 2025), which feeds the raw in-context vector
to the CVAE; the measured effect is in :mod:`lorakern.apps.icm.pipeline`.
"""
from __future__ import annotations

import torch

__all__ = ["ConditionProjection", "split_draws"]


def split_draws(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-fitting split of one task's draws ``[V, D]``: ``(even draws, odd draws)`` for V >= 4, the projection
    fitted on the first and :meth:`ConditionProjection.fresh_draw_model` measured on the second. With fewer
    draws both are all of them (the noise model then underestimates how far fresh draws land)."""
    return (v[0::2], v[1::2]) if v.shape[0] >= 4 else (v, v)


class ConditionProjection:
    """``projection(v)``: ``((v - mean) / std) @ weight``; ``v`` ``[..., D]`` float32 -> ``[..., d]``.

    Attributes: ``mean``, ``std`` float32 ``[D]``; ``weight`` float32 ``[D, d]``. The constructor raises
    ValueError on other shapes or dtypes, NaN/Inf, or a std that is not positive.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor):
        D = mean.shape[0] if mean.dim() == 1 else -1
        if mean.dim() != 1 or std.shape != (D,) or weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
            raise ValueError(f"need mean, std [D] and weight [D, d], got {tuple(mean.shape)}, {tuple(std.shape)}, "
                             f"{tuple(weight.shape)}")
        ts = (mean, std, weight)
        if any(t.dtype not in (torch.float32, torch.float64) for t in ts):
            raise ValueError(f"projection tensors must be float32, got {[t.dtype for t in ts]}")
        if not all(torch.isfinite(t).all() for t in ts) or not bool((std > 0).all()):
            raise ValueError("projection statistics must be finite with positive std")
        self.mean, self.std, self.weight = (t.float().contiguous() for t in ts)

    @property
    def in_dim(self) -> int:
        """Size ``D`` of the task vectors it reads."""
        return self.mean.shape[0]

    @property
    def out_dim(self) -> int:
        """Number ``d`` of task coordinates it writes."""
        return self.weight.shape[1]

    @classmethod
    def fit(cls, draws: list[torch.Tensor], dim: int | None = None, shrinkage: float = 0.5) -> "ConditionProjection":
        """LDA on task vectors: ``draws[t]`` is ``[V_t, D]``, the vectors of task ``t`` from ``V_t >= 2`` draws of
        examples. ``dim``: coordinates kept (default and at most ``len(draws) - 1``). Raises ValueError on fewer
        than two tasks, a task with fewer than two draws, mixed sizes or a shrinkage outside (0, 1]."""
        if len(draws) < 2:
            raise ValueError("LDA needs at least two tasks")
        D = draws[0].shape[-1]
        if any(v.dim() != 2 or v.shape[1] != D or v.shape[0] < 2 for v in draws):
            raise ValueError(f"each task needs [V >= 2, {D}] task vectors, got {[tuple(v.shape) for v in draws]}")
        if not all(torch.isfinite(v).all() for v in draws):
            raise ValueError("task vectors have NaN or Inf values")
        if not 0 < shrinkage <= 1:
            raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
        most = min(len(draws) - 1, D)
        dim = most if dim is None else dim
        if type(dim) is not int or not 1 <= dim <= most:
            raise ValueError(f"dim must be an integer in 1..{most} (tasks - 1, at most the vectors' size), got {dim!r}")
        allv = torch.cat(draws).double()
        mean = allv.mean(0)
        std = allv.std(0, unbiased=False)
        std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12)
        zs = [(v.double() - mean) / std for v in draws]
        centers = torch.stack([z.mean(0) for z in zs])
        within = torch.cat([z - c for z, c in zip(zs, centers)])
        Sw = within.T @ within / within.shape[0]
        Sw = (1 - shrinkage) * Sw + shrinkage * torch.trace(Sw) / D * torch.eye(D, dtype=Sw.dtype)
        counts = torch.tensor([float(z.shape[0]) for z in zs], dtype=torch.float64)
        mu = (centers * counts[:, None]).sum(0) / counts.sum()
        Sb = ((centers - mu).T * counts) @ (centers - mu) / counts.sum()
        evals, evecs = torch.linalg.eigh(Sw)
        inv_sqrt = evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T
        _, U = torch.linalg.eigh(inv_sqrt @ Sb @ inv_sqrt)
        W = inv_sqrt @ U[:, -dim:].flip(1)  # largest between/within ratio first
        # unit spread between draws along every coordinate (of the unshrunk within-task covariance)
        spread = (within @ W).std(0, unbiased=False).clamp_min(1e-12)
        return cls(mean.float(), std.float(), (W / spread).float())

    def fresh_draw_model(self, draws: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Where fresh draws of examples land: ``(centres [tasks, d], chol [d, d])``, the mean projected vector of
        each task's ``draws[t]`` (``[V_t >= 2, D]``) and the Cholesky factor of the pooled covariance around them,
        so that ``centres[t] + chol @ N(0, I)`` is distributed like a new draw of task ``t``. Pass draws the
        projection was not fitted on: its own sit closer to their centres than new ones (LDA fits their noise)."""
        if not draws or any(v.dim() != 2 or v.shape[0] < 2 or v.shape[1] != self.in_dim for v in draws):
            raise ValueError(f"need [V >= 2, {self.in_dim}] task vectors per task, got "
                             f"{[tuple(v.shape) for v in draws]}")
        proj = [self(v) for v in draws]
        centres = torch.stack([c.mean(0) for c in proj])
        resid = torch.cat([c - c.mean(0) for c in proj]).double()
        dof = sum(c.shape[0] - 1 for c in proj)
        cov = resid.T @ resid / dof + 1e-6 * torch.eye(resid.shape[1], dtype=torch.float64)
        return centres, torch.linalg.cholesky(cov).float()

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """Task coordinates (float32 ``[..., d]``) of task vectors ``v`` ``[..., D]``; ValueError on another D."""
        if v.shape[-1] != self.in_dim:
            raise ValueError(f"expected task vectors of {self.in_dim} values, got {tuple(v.shape)}")
        return ((v.float() - self.mean) / self.std) @ self.weight

    def num_bytes(self) -> int:
        """Bytes of ``mean``, ``std`` and ``weight`` as saved (float32)."""
        return 4 * (self.mean.numel() + self.std.numel() + self.weight.numel())

    def tensors(self, prefix: str = "cond.") -> dict[str, torch.Tensor]:
        """``{prefix}mean``, ``{prefix}std``, ``{prefix}weight``, as a generator file stores them."""
        return {f"{prefix}mean": self.mean, f"{prefix}std": self.std, f"{prefix}weight": self.weight}
