"""AWQ: activation-aware weight quantization (Lin et al., "AWQ: Activation-aware Weight Quantization for
On-Device LLM Compression and Acceleration", MLSys 2024; reference code mit-han-lab/llm-awq,
``awq/quantize/auto_scale.py`` and ``auto_clip.py``).

Two searches on calibration activations, both by grid as in the reference code:

* :func:`search_scales` -- one scale per input channel for the layers that read the same input:
  ``s = s_X ** alpha``, ``s_X`` the mean ``|x|`` of each channel, normalised by ``sqrt(max s * min s)``,
  ``alpha`` on the grid ``0, 1/20, ..., 19/20`` chosen to minimise the layers' output error when each
  weight is quantized as ``Q(W diag(s)) diag(s)^-1``. The caller folds ``1/s`` into whatever produces the
  input (an RMSNorm's weight, the previous linear's rows) and quantizes ``W diag(s)``; ``alpha = 0``
  (``s = 1``) is plain RTN, so on the calibration data the result is never worse than RTN.
* :func:`search_clip` -- per output row and group, the clipping range ``[-r m, r m]`` (``m`` the group's
  largest ``|w|``, ``r`` in ``1, 0.95, ..., 0.55``) that minimises that group's output error.

One departure from the reference code, for generality: the error measured is each linear layer's own output
error on the calibration inputs, ``tr(dW H dW^T)`` with ``H = X^T X`` the input second moment GPTQ also
uses, summed over the layers that share the input; the reference code measures the error at the output of
the whole attention or MLP block for q/k/v and gate/up (for o_proj and down_proj it is the layer's own, as
here). The Hessian form needs no activations kept in memory and no model-specific block code.

The quantizer inside both searches is lorakern's group-wise asymmetric RTN (:func:`~lorakern.quant.rtn_params`
with fp16 scales and zeros), the one the weight is finally stored with.
"""
from __future__ import annotations

import torch

from .rtn import round_codes, rtn_params

__all__ = ["AWQ_GRID", "CLIP_GRID", "CLIP_MAX_SHRINK", "awq_scales", "clip_weight", "fake_quantize",
           "output_error", "search_clip", "search_scales"]

AWQ_GRID = 20           # alpha in {0, 1/20, ..., 19/20} (llm-awq's n_grid)
CLIP_GRID = 20          # clipping ratios 1 - i/20 ...
CLIP_MAX_SHRINK = 0.5   # ... for i < 20 * 0.5: down to 0.55 (llm-awq's max_shrink)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``dequant(RTN(w))`` in fp32 ``[N, K]``, exactly what lorakern stores (fp16 scales and zeros). Entries
    in ``exclude`` (bool ``[N, K]``: GWQ outliers, stored exactly) are left out of the group ranges and returned
    unchanged."""
    N, K = w.shape
    w = w.float()
    s, z = rtn_params(w, bits, group_size, exclude)
    q = round_codes(w, s, z, bits).float().reshape(N, K // group_size, group_size)
    out = ((q - z.float().unsqueeze(-1)) * s.float().unsqueeze(-1)).reshape(N, K)
    return out if exclude is None else torch.where(exclude, w, out)


def output_error(dw: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T)``: the summed squared output error of a weight error ``dW [N, K]`` on inputs whose
    second moment is ``H [K, K]`` (float)."""
    return float(((dw @ hessian) * dw).sum())


def awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-channel scales ``s_X ** alpha / sqrt(max * min)`` for the mean ``|x|`` per channel
    ``act_mean [K]`` (fp32; channels never active get the floor 1e-4 before the power, as in llm-awq)."""
    s = act_mean.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def search_scales(weights: list[torch.Tensor], hessian: torch.Tensor, act_mean: torch.Tensor, bits: int,
                  group_size: int, grid: int = AWQ_GRID) -> tuple[torch.Tensor, float, list[float]]:
    """AWQ's scale search for the layers ``weights`` (each ``[N_i, K]``) that read the same input.

    Args:
        weights: the layers' float weights in ``[out, in]`` layout.
        hessian: ``[K, K]`` second moment of their common input over the calibration tokens.
        act_mean: ``[K]`` mean ``|x|`` per input channel over the same tokens.
        bits, group_size: the quantization the weights will get (RTN in the search).
        grid: number of ``alpha`` values, ``i / grid`` for ``i < grid``.

    Returns:
        ``(scales [K] fp32, alpha, errors)``: the best scales (multiply the weights' columns by them, divide
        the input by them), their ``alpha``, and the summed output error at every grid point (index 0 is RTN).

    Raises:
        ValueError: shapes that disagree, no weights, a non-finite Hessian or activation mean.
    """
    if not weights:
        raise ValueError("search_scales needs at least one weight")
    K = act_mean.shape[0]
    if act_mean.dim() != 1 or hessian.shape != (K, K) or any(w.dim() != 2 or w.shape[1] != K for w in weights):
        raise ValueError(f"weights [N, {K}], hessian [{K}, {K}] and act_mean [{K}] must agree, got "
                         f"{[tuple(w.shape) for w in weights]}, {tuple(hessian.shape)}, {tuple(act_mean.shape)}")
    if not (torch.isfinite(hessian).all() and torch.isfinite(act_mean).all()):
        raise ValueError("the Hessian or the activation means have NaN or Inf values")
    H = hessian.float()
    ws = [w.detach().float() for w in weights]
    errors, best = [], (float("inf"), None, 0.0)
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(act_mean, alpha)
        err = sum(output_error(fake_quantize(w * s, bits, group_size) / s - w, H) for w in ws)
        errors.append(err)
        if err < best[0]:
            best = (err, s, alpha)
    if best[1] is None:
        raise ValueError("AWQ scale search: every grid point gave a non-finite error")
    return best[1], best[2], errors


def search_clip(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                exclude: torch.Tensor | None = None, grid: int = CLIP_GRID,
                max_shrink: float = CLIP_MAX_SHRINK) -> torch.Tensor:
    """AWQ's clipping search: per output row and group, the largest ``|w|`` kept, ``[N, K / group_size]``
    fp32 (at most the group's own maximum; clip ``w`` with :func:`clip_weight`).

    The error of a group is ``dw_g H_gg dw_g^T`` with ``H_gg`` the group's diagonal block of ``hessian``
    (the group's contribution to the output, as llm-awq's ``auto_clip`` measures it on sampled tokens).
    ``exclude`` marks entries stored exactly (outliers): left out of the maxima and of the error.
    """
    N, K = w.shape
    G = K // group_size
    w = w.detach().float()
    H = hessian.float()
    Hb = torch.stack([H[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                      for g in range(G)])                                     # [G, gs, gs]
    wa = w.abs() if exclude is None else w.abs().masked_fill(exclude, 0.0)
    org_max = wa.reshape(N, G, group_size).amax(-1)                          # [N, G]
    best_err = torch.full((N, G), float("inf"))
    best_max = org_max.clone()
    for i in range(max(1, int(grid * max_shrink))):
        m = org_max * (1 - i / grid)
        wc = clip_weight(w, m, group_size, exclude)
        dw = (fake_quantize(wc, bits, group_size, exclude) - w).reshape(N, G, group_size)
        err = torch.einsum("ngk,gkl,ngl->ng", dw, Hb, dw)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, m, best_max)
    return best_max


def clip_weight(w: torch.Tensor, max_abs: torch.Tensor, group_size: int,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` clamped to ``[-max_abs, max_abs]`` per row and group (``max_abs [N, K / group_size]``); entries in
    ``exclude`` unchanged."""
    N, K = w.shape
    m = max_abs.float().repeat_interleave(group_size, dim=1)
    out = torch.maximum(torch.minimum(w.float(), m), -m)
    return out if exclude is None else torch.where(exclude, w.float(), out)
