"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each
column's rounding error over the columns not yet quantized through the inverse
Hessian of the layer inputs.

Implemented as in the reference code (damping
``percdamp * mean(diag H)``, the upper Cholesky factor of ``H^-1``, lazy batch
updates in blocks of 128 columns, optional act-order (columns by decreasing
``H_ii``)), with one departure: the reference code sets the weights of dead inputs
(``H_ii = 0``: always zero in the calibration text) to zero, destroying them for any
other text; here they keep their round-to-nearest values (their ``H`` rows are
decoupled, so they spread no error and receive none). Group parameters are computed when a group's first column is reached
(from the error-updated weights); with act-order they are computed up front from
the original weights ("static groups"), so groups stay contiguous along K and the
packed format needs no column permutation.

With an outlier mask (GWQ / SpQR), masked weights are kept exactly: they are
left out of every group's statistics, contribute no rounding error, and the
caller stores ``w - dequant(q)`` at those positions, where ``w`` is the weight
after the updates from earlier columns (returned as ``w_final``).
"""
from __future__ import annotations

import torch

from .rtn import rtn_params

__all__ = ["gptq_quantize", "inverse_hessian_diag", "prepare_hessian"]


def prepare_hessian(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped fp32 copy of H with dead inputs set to 1; returns (H, dead mask)."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"Hessian must be square, got {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("Hessian has NaN or Inf values")
    H = H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    return H, dead


def _cholesky_inverse_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding damping until H is positive definite."""
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    extra = 0.0
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        extra = max(extra * 10, 1e-6 * float(torch.diag(H).mean()))
    raise ValueError("the Hessian is not positive definite even with extra damping")


def inverse_hessian_diag(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """diag(H^-1) of the damped Hessian (SpQR's saliency denominator)."""
    Hd, _ = prepare_hessian(H, percdamp)
    U = _cholesky_inverse_upper(Hd)
    return (U * U).sum(0)  # H^-1 = U^T U


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, *, percdamp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, exclude: torch.Tensor | None = None):
    """Quantize ``w [N, K]`` with GPTQ.

    Args:
        w: dense weight; H: ``[K, K]`` Hessian of the layer inputs (2/n X^T X).
        bits, group_size: the group-wise asymmetric format.
        percdamp: damping as a fraction of mean(diag H).
        block_size: columns per lazy batch update.
        act_order: process columns by decreasing H_ii (static groups).
        exclude: bool ``[N, K]`` outlier mask: kept exactly (see the module doc).

    Returns:
        ``(codes uint8 [N, K], scales fp16 [N, K/G], zeros fp16 [N, K/G], w_final fp32 [N, K])``
        where ``w_final`` holds each weight as it was when its column was quantized.
    """
    N, K = w.shape
    if H.shape != (K, K):
        raise ValueError(f"Hessian is {tuple(H.shape)}, expected {(K, K)}")
    if K % group_size:
        raise ValueError(f"K={K} is not a multiple of group_size={group_size}")
    if block_size % group_size:
        raise ValueError(f"block_size={block_size} must be a multiple of group_size={group_size}")
    W = w.detach().float().clone()
    if not torch.isfinite(W).all():
        raise ValueError("weight has NaN or Inf values")
    Hd, dead = prepare_hessian(H, percdamp)
    # dead inputs (always zero in calibration) keep their values: rounded to nearest, no error spread
    ex = exclude.to(torch.bool) if exclude is not None else torch.zeros(N, K, dtype=torch.bool)
    if ex.shape != (N, K):
        raise ValueError(f"exclude mask is {tuple(ex.shape)}, expected {(N, K)}")
    qmax = (1 << bits) - 1
    ng = K // group_size
    scales = torch.empty(N, ng, dtype=torch.float16)
    zeros = torch.empty(N, ng, dtype=torch.float16)
    if act_order:
        perm = torch.argsort(torch.diag(Hd), descending=True)
        scales[:], zeros[:] = rtn_params(W, bits, group_size, ex)  # static groups
    else:
        perm = torch.arange(K)
    invperm = torch.argsort(perm)
    W = W[:, perm]
    exp_ = ex[:, perm]
    Hd = Hd[perm][:, perm]
    U = _cholesky_inverse_upper(Hd)
    Q = torch.zeros(N, K, dtype=torch.float32)
    Wf = torch.zeros(N, K, dtype=torch.float32)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:  # a group starts: parameters from the updated weights
                s16, z16 = rtn_params(W1[:, i:i + group_size], bits, group_size, exp_[:, i1 + i:i1 + i + group_size])
                scales[:, g], zeros[:, g] = s16[:, 0], z16[:, 0]
            s, z = scales[:, g].float(), zeros[:, g].float()
            wc = W1[:, i]
            q = torch.clamp(torch.round(wc / s + z), 0, qmax)
            deq = s * (q - z)
            err = (wc - deq) / U1[i, i]
            err = torch.where(exp_[:, i1 + i], torch.zeros_like(err), err)  # outliers are kept exactly
            Q[:, i1 + i] = q
            Wf[:, i1 + i] = wc
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    Q = Q[:, invperm].to(torch.uint8)
    Wf = Wf[:, invperm]
    return Q, scales, zeros, Wf
