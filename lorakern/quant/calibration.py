"""Calibration statistics for GPTQ, GWQ and the outlier baselines.

* :func:`calibration_windows` -- n token windows from WikiText-2 ``valid.txt``.
* :func:`collect_statistics` -- in one pass per sample: the gradient of the
  next-token loss for every target Linear weight (its mean over samples, and the
  mean of its elementwise square for the Fisher-style score) and the Hessian of
  each layer's inputs, ``H = 2/n * sum X^T X`` (GPTQ's).

Memory: one backward at a time (one sample), so activations are those of a
single window; the accumulators are fp32 and per target weight: the gradient
mean (+ its square mean when asked) and the ``K x K`` Hessians. For a 1B-parameter
model that is ~4 GB per gradient accumulator plus torch's own ``.grad`` (4 GB),
and at most a few GB of Hessians: inside 24 GiB. Non-target parameters never
get gradients (``requires_grad`` is switched off for them during the pass).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.wikitext import read_wikitext, token_windows
from ..formats.linear_like import is_conv1d, linear_shape

__all__ = ["LayerStats", "calibration_windows", "collect_statistics"]


def calibration_windows(tokenizer, n: int = 8, seqlen: int = 512, split: str = "valid") -> torch.Tensor:
    """``[n, seqlen]`` token ids: the first ``n`` non-overlapping windows of the split (default valid.txt)."""
    if n < 1 or seqlen < 2:
        raise ValueError(f"need n >= 1 windows of seqlen >= 2 tokens, got n={n}, seqlen={seqlen}")
    return token_windows(tokenizer, read_wikitext(split), seqlen, n)


@dataclass
class LayerStats:
    """Statistics of one Linear layer over the calibration samples.

    Attributes:
        grad: mean over samples of dL/dW (fp32, [N, K]), or None.
        grad_sq: mean over samples of (dL/dW)^2 elementwise, or None.
        hessian: 2/n * sum over all tokens of x x^T (fp32, [K, K]), or None.
        act_mean: mean over all tokens of |x| per input channel (fp32, [K]; AWQ's activation scale), or None.
        nsamples: samples seen.
        tokens: input rows (tokens) seen by the Hessian hook.
    """

    grad: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    act_mean: torch.Tensor | None = None
    nsamples: int = 0
    tokens: int = 0


def collect_statistics(model: nn.Module, windows: torch.Tensor, names: list[str], *, gradients: bool = True,
                       grad_squares: bool = False, hessians: bool = True, act_means: bool = False,
                       progress: bool = True) -> dict[str, LayerStats]:
    """Gradients and/or input Hessians of the Linear layers ``names`` of a causal LM.

    Args:
        model: a Hugging Face causal LM (called as ``model(ids, labels=ids)``).
        windows: ``[n, seqlen]`` token ids; one forward (and backward) per row.
        names: module names of ``nn.Linear`` or transformers ``Conv1D`` layers (gradients are
            returned as ``[out, in]`` for both).

    A layer the calibration never reaches (an extra head, an expert no token is routed to) has
    ``tokens == 0`` and ``grad``/``grad_sq`` None: callers must not quantize it with data it lacks.
        gradients: accumulate the mean gradient of the next-token loss.
        grad_squares: also accumulate the mean squared per-sample gradient.
        hessians: accumulate ``H = 2/n_tokens * X^T X`` of each layer's inputs.
        act_means: accumulate the mean ``|x|`` per input channel (AWQ).
    """
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be [n >= 1, seqlen], got {tuple(windows.shape)}")
    mods = {n: model.get_submodule(n) for n in names}
    for n, m in mods.items():
        if not (isinstance(m, nn.Linear) or is_conv1d(m)):
            raise TypeError(f"{n} is {type(m).__name__}, not nn.Linear or Conv1D")
    stats = {n: LayerStats() for n in names}
    hooks = []
    for n, m in mods.items():
        st = stats[n]
        if hessians:
            K = linear_shape(m)[1]
            st.hessian = torch.zeros(K, K, dtype=torch.float32)
        if act_means:
            st.act_mean = torch.zeros(linear_shape(m)[1], dtype=torch.float32)

        def hook(mod, inp, out, st=st):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            st.tokens += x.shape[0]
            if st.hessian is not None:
                x = x.float()
                st.hessian.addmm_(x.t(), x)
            if st.act_mean is not None:
                st.act_mean.add_(x.float().abs().sum(0))
        hooks.append(m.register_forward_hook(hook))
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if gradients or grad_squares:
            for m in mods.values():
                m.weight.requires_grad_(True)
                m.weight.grad = None
        n = windows.shape[0]
        for i in tqdm(range(n), desc="calibrate", disable=not progress, leave=False):
            ids = windows[i:i + 1]
            if gradients or grad_squares:
                loss = model(ids, labels=ids).loss
                loss.backward()
                for name, m in mods.items():
                    g, st = m.weight.grad, stats[name]
                    if g is None:  # the layer took no part in this sample's loss
                        continue
                    if is_conv1d(m):
                        g = g.t()
                    if gradients:
                        st.grad = g.float().clone() if st.grad is None else st.grad.add_(g)
                    if grad_squares:
                        st.grad_sq = g.float().square() if st.grad_sq is None else st.grad_sq.addcmul_(g, g)
                    m.weight.grad = None
            else:
                with torch.no_grad():
                    model(ids)
        for st in stats.values():
            st.nsamples = n
            if st.tokens == 0:  # never reached: no statistics rather than zeros
                st.hessian = st.grad = st.grad_sq = st.act_mean = None
            if st.grad is not None:
                st.grad.div_(n)
            if st.grad_sq is not None:
                st.grad_sq.div_(n)
            if st.hessian is not None:
                st.hessian.mul_(2.0 / max(st.tokens, 1))
            if st.act_mean is not None:
                st.act_mean.div_(max(st.tokens, 1))
    finally:
        for h in hooks:
            h.remove()
        for p, r in saved.items():
            p.requires_grad_(r)
            p.grad = None
        model.train(was_training)
    return stats
