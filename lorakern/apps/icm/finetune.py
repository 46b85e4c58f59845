"""Second training stage of the generator: its decoder trained on the tasks' own loss through the base model.

The CVAE's objective (:mod:`.cvae`) asks for the training adapters' weights back. Two
adapters that both solve a task can be far apart in weight space, and a decoder that
hesitates between two tasks' weights (a condition between them) writes their blend,
which solves neither (the mean of the ``addc4`` and ``addc6`` adapters scores 0.00 on
either neighbour's tasks, :mod:`.pipeline`). This stage trains the decoder the way
Text-to-LoRA trains its hypernetwork (Charakorn et al., 2025, "Text-to-LoRA: Instant
Transformer Adaption": supervised fine-tuning through the generated adapter rather than
reconstruction): for a batch of tasks, conditions drawn as fresh draws of examples land
(:meth:`~.projection.ConditionProjection.fresh_draw_model`), generated adapters applied
to the frozen base model, and the next-token loss of the tasks' answers back-propagated
into the decoder. The basis, the projection and the normalizer stay as they are (the
decoder learns to write through the stored low-bit basis).
"""
from __future__ import annotations

import random

import torch
from torch import nn

from .projection import split_draws
from ..train.trainer import TrainConfig, answer_loss, encode_examples, frozen, injected, optimize

__all__ = ["finetune_generator"]


class _GeneratedLoRA(nn.Module):
    """``base(x) + scale * (x A_b^T) B_b^T`` with one adapter per sequence: ``A`` ``[b, r, in]`` and ``B``
    ``[b, out, r]`` are read from ``weights[name]`` at each forward."""

    def __init__(self, name: str, base: nn.Module, scale: float, weights: dict):
        super().__init__()
        self.name, self.base, self.scale, self.weights = name, base, scale, weights

    def forward(self, x):
        A, B = (t.to(dtype=x.dtype, device=x.device) for t in self.weights[self.name])
        return self.base(x) + torch.matmul(torch.matmul(x, A.transpose(1, 2)), B.transpose(1, 2)) * self.scale


def _split_flat(gen, flat: torch.Tensor) -> dict:
    """``{module: (A [b, r, in], B [b, out, r])}`` views of raw flat adapters ``flat`` ``[b, L]``."""
    out, off = {}, 0
    for m, a, b in zip(gen.layout.modules, gen.layout.a_shapes, gen.layout.b_shapes):
        na, nb = a[0] * a[1], b[0] * b[1]
        out[m] = (flat[:, off:off + na].view(-1, *a), flat[:, off + na:off + na + nb].view(-1, *b))
        off += na + nb
    return out


def finetune_generator(gen, model, tokenizer, tasks: dict, steps: int = 300, tasks_per_step: int = 4,
                       examples_per_task: int = 4, lr: float = 1e-3, seed: int = 0, data_seed: int = 2_000_003,
                       progress: bool = True) -> list[dict]:
    """Train ``gen``'s decoder in place on the tasks' answer loss (see the module docstring).

    Args:
        gen: an :class:`~.generator.AdapterGenerator` (its CVAE decoder is updated).
        model, tokenizer: the base model the generator's adapters are for (frozen, restored on exit).
        tasks: ``{name: (Task, task vectors [V >= 2, D])}``: the :class:`~lorakern.apps.train.Task` to train on
            and draws of its task vector (split as :meth:`AdapterGenerator.fit` split them,
            :func:`~.projection.split_draws`: the second half sets the condition noise).
        steps: optimizer steps (Adam, cosine decay, gradient clipping at 1.0), each on ``tasks_per_step`` tasks x
            ``examples_per_task`` fresh examples (seeds from ``data_seed``, apart from training and evaluation).
    The generated adapters are float32 and are cast to each layer's input dtype and device.
    Returns one ``{step, loss}`` per step. Raises ValueError on an empty task set or vectors of the wrong size,
    FloatingPointError when the loss stops being finite.
    """
    if not tasks:
        raise ValueError("no tasks to fine-tune on")
    if steps < 1 or tasks_per_step < 1 or examples_per_task < 1 or not lr > 0:
        raise ValueError("steps, tasks_per_step, examples_per_task and lr must be positive")
    names = list(tasks)
    vecs = [v for _, v in tasks.values()]
    if any(v.dim() != 2 or v.shape[0] < 2 or v.shape[1] != gen.cond_dim for v in vecs):
        raise ValueError(f"task vectors must be [V >= 2, {gen.cond_dim}], got {[tuple(v.shape) for v in vecs]}")
    centres, noise_l = gen.projection.fresh_draw_model([split_draws(v)[1] for v in vecs])
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    decoder = gen.cvae
    params = list(decoder.decoder.parameters())
    weights: dict = {}
    scales = dict(zip(gen.layout.modules, gen.layout.scales))
    history = []
    order: list[int] = []

    def loss_fn(step):
        chosen = []
        for _ in range(min(tasks_per_step, len(names))):
            if not order:
                order.extend(range(len(names)))
                rng.shuffle(order)
            chosen.append(order.pop())
        c = centres[torch.tensor(chosen)] + torch.randn(len(chosen), centres.shape[1], generator=g) @ noise_l.T
        coef = decoder.decode(torch.zeros(len(chosen), decoder.cfg.latent), c)
        flat = gen.raw_adapters(coef)  # [tasks, L], float32, differentiable in the decoder's weights
        weights.update(_split_flat(gen, flat.repeat_interleave(examples_per_task, 0)))
        items = []
        for t in chosen:
            task = tasks[names[t]][0]
            items += [(task.prompt(x), y) for x, y in task.examples(examples_per_task, data_seed + 7919 * t + step)]
        loss = answer_loss(model, *encode_examples(tokenizer, items))
        history.append({"step": step, "loss": float(loss.detach())})
        return loss

    # the trainers' loop: AdamW (no weight decay: Adam), cosine decay, clipping at 1.0, a finite-loss check
    cfg = TrainConfig(steps=steps, lr=lr, warmup=0, weight_decay=0.0)
    with frozen(model), injected(model, list(gen.layout.modules),
                                 lambda n, base: _GeneratedLoRA(n, base, scales[n], weights)):
        model.train()
        decoder.train()
        try:
            optimize(params, cfg, loss_fn, "fine-tune generator on task loss", progress)
        finally:
            weights.clear()
            decoder.eval()
    return history
