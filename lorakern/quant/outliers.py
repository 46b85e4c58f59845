"""Outlier selection: sensitivity scores and an exact per-matrix or per-row budget.

Scores (higher = keep in fp16):

* ``"grad"``     ``|g|``, g the mean gradient of the calibration loss (GWQ's paper).
* ``"grad_w"``   ``|g * w|``: the first-order change of the loss if w were zeroed.
* ``"grad_w2"``  ``mean_i (g_i * w)^2`` over calibration samples i: the diagonal
  Fisher estimate of the second-order change (needs per-sample squares; it is a
  different ranking from ``grad_w`` because the mean is over squares).
* ``"hessian"``  ``w^2 / [H^-1]_kk`` (SpQR's / OBS saliency).
* ``"magnitude"`` ``|w|``.
* ``"random"``   uniform noise (a control).
"""
from __future__ import annotations

import torch

__all__ = ["SCORES", "outlier_scores", "select_outliers", "outlier_budget"]

SCORES = ("grad", "grad_w", "grad_w2", "hessian", "magnitude", "random")


def outlier_scores(score: str, w: torch.Tensor, *, grad: torch.Tensor | None = None,
                   grad_sq: torch.Tensor | None = None, hinv_diag: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 ``[N, K]`` sensitivity of every weight under ``score`` (see the module doc)."""
    w = w.detach().float()
    if score == "grad" or score == "grad_w":
        if grad is None or grad.shape != w.shape:
            raise ValueError(f"score {score!r} needs the mean gradient of shape {tuple(w.shape)}")
        return grad.float().abs() if score == "grad" else (grad.float() * w).abs()
    if score == "grad_w2":
        if grad_sq is None or grad_sq.shape != w.shape:
            raise ValueError(f"score 'grad_w2' needs the mean squared gradient of shape {tuple(w.shape)}")
        return grad_sq.float() * w.square()
    if score == "hessian":
        if hinv_diag is None or hinv_diag.shape != (w.shape[1],):
            raise ValueError(f"score 'hessian' needs diag(H^-1) of shape ({w.shape[1]},)")
        return w.square() / hinv_diag.float().clamp_min(1e-30).unsqueeze(0)
    if score == "magnitude":
        return w.abs()
    if score == "random":
        return torch.rand(w.shape, generator=generator)
    raise ValueError(f"unknown outlier score {score!r} (one of {SCORES})")


def outlier_budget(N: int, K: int, frac: float, per_row: bool) -> int:
    """Number of outliers kept: round(frac * N * K), or N * round(frac * K) per row."""
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"outlier fraction must be in [0, 1), got {frac}")
    return N * int(round(frac * K)) if per_row else int(round(frac * N * K))


def select_outliers(scores: torch.Tensor, frac: float, per_row: bool = False) -> torch.Tensor:
    """Bool mask of exactly :func:`outlier_budget` entries with the highest scores
    (ties broken by position), over the whole matrix or per output row."""
    N, K = scores.shape
    if not torch.isfinite(scores).all():
        raise ValueError("outlier scores contain NaN or Inf")
    mask = torch.zeros(N, K, dtype=torch.bool)
    k = outlier_budget(N, K, frac, per_row)
    if k == 0:
        return mask
    if per_row:
        idx = torch.topk(scores.float(), k // N, dim=1, sorted=False).indices
        mask.scatter_(1, idx, True)
    else:
        idx = torch.topk(scores.float().reshape(-1), k, sorted=False).indices
        mask.view(-1)[idx] = True
    return mask
