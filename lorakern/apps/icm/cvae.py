"""The conditional VAE of ICM-LoRA, over an adapter's coefficients in a principal basis.

A conditional VAE (Sohn, Lee and Yan, 2015, "Learning Structured Output Representation using Deep
Conditional Generative Models") as ICM-LoRA uses it.

ICM-LoRA (Shao et al., 2025) trains a CVAE whose encoder reads a whole flattened adapter
and whose decoder writes one, conditioned on a task vector. This CVAE keeps that
structure (encoder ``q(z | x, c)``, decoder ``p(x | z, c)``, loss = reconstruction +
``beta`` * KL to ``N(0, I)``) but reads and writes the ``k`` coefficients of the adapter
in an :class:`~lorakern.apps.icm.basis.AdapterBasis` instead of its ``L`` values, and
its encoder and decoder are small MLPs.

Why (measured on the default SmolLM2 task set, 20 seen tasks, rank-2 q/v adapters of
115,200 values): the paper's convolutional decoder, sized to a 1-D signal of 115,200
values, had 10.0 M parameters (40 MB, 4.3x the adapters it stood for) and, because its
filters are shared across positions, could not place task-specific weights without a
linear head added beside it; the adapters' spread lives in about as many directions as
there are tasks, and a 3-bit basis of 20 directions reconstructs each seen adapter to
10% relative error with its exact match kept within the evaluation's noise. So the
decoder is sized to the adapters' real degrees of freedom rather than to their length.

Coefficients are standardized per direction (``coef_std``); the reconstruction loss
weights each direction by its variance, so it equals the mean squared error in the
normalized adapter space (up to the basis' quantization).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["AdapterCVAE", "CVAEConfig"]

MAX_SIZE = 1 << 16  # bound on every width, so that a hostile config cannot ask for a huge model


@dataclass
class CVAEConfig:
    """Shape of an :class:`AdapterCVAE`: ``coef_dim`` (basis directions), ``cond_dim`` (condition coordinates),
    ``latent`` (z), ``hidden`` (MLP width), ``beta`` (KL weight)."""

    coef_dim: int
    cond_dim: int
    latent: int = 8
    hidden: int = 64
    beta: float = 1e-3

    def __post_init__(self):
        sizes = (self.coef_dim, self.cond_dim, self.latent, self.hidden)
        if not all(type(v) is int and 1 <= v <= MAX_SIZE for v in sizes):
            raise ValueError(f"CVAE sizes must be integers in 1..{MAX_SIZE}, got {self}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")

    def to_dict(self) -> dict:
        """The config as a JSON-able dict (the generator file's ``cvae_config``)."""
        return asdict(self)


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, o))


class AdapterCVAE(nn.Module):
    """``forward(x, c) -> (reconstruction, mu, logvar)`` on coefficients ``x`` ``[B, coef_dim]`` and conditions
    ``c`` ``[B, cond_dim]``; ``decode(z, c)``; ``loss(x, c)``. ``coef_std`` (a buffer, ``[coef_dim]``) scales the
    coefficients: the MLPs see and predict ``x / coef_std``."""

    def __init__(self, cfg: CVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = _mlp(cfg.coef_dim + cfg.cond_dim, cfg.hidden, 2 * cfg.latent)
        self.decoder = _mlp(cfg.latent + cfg.cond_dim, cfg.hidden, cfg.coef_dim)
        self.register_buffer("coef_std", torch.ones(cfg.coef_dim))

    def _check(self, x: torch.Tensor | None, c: torch.Tensor) -> None:
        if c.dim() != 2 or c.shape[1] != self.cfg.cond_dim:
            raise ValueError(f"condition must be [batch, {self.cfg.cond_dim}], got {tuple(c.shape)}")
        if x is not None and (x.dim() != 2 or x.shape != (c.shape[0], self.cfg.coef_dim)):
            raise ValueError(f"coefficients must be [{c.shape[0]}, {self.cfg.coef_dim}], got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of ``z`` ``[B, latent]``."""
        self._check(x, c)
        mu, logvar = self.encoder(torch.cat([x / self.coef_std, c], 1)).chunk(2, 1)
        return mu, logvar.clamp(-20, 10)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Coefficients ``[B, coef_dim]`` from latents ``z`` ``[B, latent]`` and conditions ``c``."""
        self._check(None, c)
        if z.shape != (c.shape[0], self.cfg.latent):
            raise ValueError(f"z must be [{c.shape[0]}, {self.cfg.latent}], got {tuple(z.shape)}")
        return self.decoder(torch.cat([z, c], 1)) * self.coef_std

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        """``(reconstruction [B, coef_dim], mu, logvar [B, latent])``; z is sampled in training mode, ``mu``
        in eval mode."""
        mu, logvar = self.encode(x, c)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z, c), mu, logvar

    def loss(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(total, mse, kl)``: ``mse`` is the squared coefficient error summed over directions and averaged
        over the batch, relative to the coefficients' total variance (1.0 = predicting zero for centred data);
        ``kl`` is summed over the latent and averaged over the batch."""
        rec, mu, logvar = self(x, c)
        mse = ((rec - x) ** 2).sum(1).mean() / (self.coef_std ** 2).sum()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        return mse + self.cfg.beta * kl, mse, kl
