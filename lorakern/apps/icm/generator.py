"""ICM-LoRA adapter generator: train the CVAE on trajectories, generate adapters from examples, save/load.

:meth:`AdapterGenerator.fit` takes, per task, a trajectory of flattened checkpoints and
one or more task vectors (several draws of examples make the decoder robust to which
examples it is shown); :meth:`AdapterGenerator.generate` decodes an adapter for a new
task vector; :meth:`AdapterGenerator.save` writes one safetensors file (the CVAE's
weights and buffers, the normalizer, the condition statistics, the adapter layout and
the PEFT config template in the metadata) that :meth:`AdapterGenerator.load` validates.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...adapters.peft_io import LoraAdapter
from ...formats.io import FormatError, read_safetensors
from .condition import TaskExamples, task_vector
from .cvae import AdapterCVAE, CVAEConfig
from .flatten import AdapterLayout, Normalizer, unflatten_adapter

__all__ = ["AdapterGenerator", "GeneratorTrainConfig"]

FORMAT_NAME = "lorakern.adapter_generator"


@dataclass
class GeneratorTrainConfig:
    """Optimisation of :meth:`AdapterGenerator.fit` (Adam, cosine decay, fixed seed)."""

    epochs: int = 60
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"invalid generator training config {self}")


class AdapterGenerator:
    """A trained CVAE plus everything needed to turn its output into a PEFT adapter."""

    def __init__(self, cvae: AdapterCVAE, normalizer: Normalizer, cond_mean: torch.Tensor, cond_std: torch.Tensor,
                 peft_config: dict):
        if cvae.cfg.input_len != normalizer.layout.numel:
            raise ValueError(f"CVAE input length {cvae.cfg.input_len} != adapter layout size "
                             f"{normalizer.layout.numel}")
        if cond_mean.shape != (cvae.cfg.cond_dim,) or cond_std.shape != (cvae.cfg.cond_dim,):
            raise ValueError(f"condition statistics must have {cvae.cfg.cond_dim} entries")
        if not (torch.isfinite(cond_mean).all() and torch.isfinite(cond_std).all() and (cond_std > 0).all()):
            raise ValueError("condition statistics must be finite with positive std")
        self.cvae = cvae.eval()
        self.normalizer = normalizer
        self.cond_mean, self.cond_std = cond_mean.float(), cond_std.float()
        self.peft_config = dict(peft_config)

    @property
    def layout(self) -> AdapterLayout:
        return self.normalizer.layout

    @property
    def cond_dim(self) -> int:
        return self.cvae.cfg.cond_dim

    def num_bytes(self) -> int:
        """Bytes of the generator's tensors as saved (float32)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    # -- training ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, tasks: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: AdapterLayout, peft_config: dict,
            cvae: dict | None = None, train: GeneratorTrainConfig | None = None,
            progress: bool = True) -> tuple["AdapterGenerator", list[dict]]:
        """Train a generator.

        Args:
            tasks: ``{task: (checkpoints [C, layout.numel], task vectors [V, cond_dim])}``.
            layout: the adapters' layout; peft_config: the config generated adapters carry.
            cvae: :class:`CVAEConfig` overrides (``latent``, ``channels``, ``beta``...).
            train: optimisation settings.
        Returns ``(generator, history)`` with one ``{epoch, loss, mse, kl}`` per epoch.
        """
        train = train or GeneratorTrainConfig()
        if not tasks:
            raise ValueError("no tasks to train on")
        conds = [v for _, v in tasks.values()]
        dims = {v.shape[-1] for v in conds}
        if len(dims) != 1 or any(v.dim() != 2 or v.shape[0] < 1 for v in conds):
            raise ValueError(f"task vectors must all be [V, D] with one D, got {[tuple(v.shape) for v in conds]}")
        for name, (ck, _) in tasks.items():
            if ck.dim() != 2 or ck.shape[1] != layout.numel or ck.shape[0] < 1:
                raise ValueError(f"{name}: checkpoints must be [C, {layout.numel}], got {tuple(ck.shape)}")
        torch.manual_seed(train.seed)
        rng = random.Random(train.seed)
        raw = torch.cat([ck.float() for ck, _ in tasks.values()])
        normalizer = Normalizer.fit(raw, layout)
        X = normalizer.normalize(raw).float()
        owner = torch.cat([torch.full((ck.shape[0],), i) for i, (ck, _) in enumerate(tasks.values())])
        allc = torch.cat(conds).float()
        cmean, cstd = allc.mean(0), allc.std(0, unbiased=False).clamp_min(1e-3 * float(allc.std()) + 1e-12)
        C = [((v.float() - cmean) / cstd) for v in conds]
        model = AdapterCVAE(CVAEConfig(input_len=layout.numel, cond_dim=allc.shape[1], **(cvae or {})))
        model.init_from_data(X)
        opt = torch.optim.Adam(model.parameters(), lr=train.lr, foreach=True)
        steps_per_epoch = math.ceil(X.shape[0] / train.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, train.epochs * steps_per_epoch)
        history = []
        model.train()
        bar = tqdm(range(train.epochs), desc="train generator", disable=not progress)
        for epoch in bar:
            order = torch.randperm(X.shape[0])
            sums = [0.0, 0.0, 0.0]
            for s in range(0, X.shape[0], train.batch_size):
                idx = order[s:s + train.batch_size]
                if idx.numel() < 2:  # BatchNorm needs two samples
                    continue
                c = torch.stack([C[int(t)][rng.randrange(C[int(t)].shape[0])] for t in owner[idx]])
                loss, mse, kl = model.loss(X[idx], c)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                sched.step()
                for i, v in enumerate((loss, mse, kl)):
                    sums[i] += float(v.detach()) * idx.numel()
            rec = {"epoch": epoch, "loss": sums[0] / X.shape[0], "mse": sums[1] / X.shape[0],
                   "kl": sums[2] / X.shape[0]}
            history.append(rec)
            bar.set_postfix(mse=f"{rec['mse']:.4f}", kl=f"{rec['kl']:.1f}")
        return cls(model, normalizer, cmean, cstd, peft_config), history

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, condition: torch.Tensor, seed: int | None = 0) -> LoraAdapter:
        """An adapter for task vector ``condition`` (``[cond_dim]``).

        ``seed``: draws ``z ~ N(0, I)`` with that seed (ICM-LoRA's sampling); ``None`` decodes the prior's
        mean ``z = 0``.
        """
        condition = torch.as_tensor(condition)
        if condition.dim() != 1 or condition.shape[0] != self.cond_dim:
            raise ValueError(f"the generator's condition has {self.cond_dim} values (the base model's hidden "
                             f"size it was trained with), got shape {tuple(condition.shape)}")
        if not torch.isfinite(condition).all():
            raise ValueError("condition contains NaN or Inf")
        c = ((condition.float().cpu() - self.cond_mean) / self.cond_std)[None]
        if seed is None:
            z = torch.zeros(1, self.cvae.cfg.latent)
        else:
            z = torch.randn(1, self.cvae.cfg.latent, generator=torch.Generator().manual_seed(seed))
        out = self.normalizer.denormalize(self.cvae.eval().decode(z, c).double()[0])
        if not torch.isfinite(out).all():
            raise FloatingPointError("the generator produced NaN or Inf")
        adapter = unflatten_adapter(out, self.layout, dict(self.peft_config))
        adapter.metadata["lorakern_task"] = "generated"
        return adapter

    def generate_from_examples(self, model, tokenizer, examples: TaskExamples, seed: int | None = 0) -> LoraAdapter:
        """Read ``examples`` with the base model (:func:`task_vector`) and generate the task's adapter."""
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is not None and hidden != self.cond_dim:
            raise ValueError(f"this generator was trained with a base model of hidden size {self.cond_dim}; "
                             f"the model given has {hidden}")
        return self.generate(task_vector(model, tokenizer, examples), seed=seed)

    # -- files ------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {f"cvae.{k}": v.detach().contiguous() for k, v in self.cvae.state_dict().items()}
        t.update({"norm.mean": self.normalizer.mean, "norm.scale": self.normalizer.scale,
                  "cond.mean": self.cond_mean, "cond.std": self.cond_std})
        return t

    def save(self, path: str | os.PathLike) -> Path:
        """Write the generator to one safetensors file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_NAME, "cvae_config": json.dumps(self.cvae.cfg.to_dict()),
                "layout": json.dumps(self.layout.to_dict()), "peft_config": json.dumps(self.peft_config)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(self._tensors(), str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AdapterGenerator":
        """Read a generator file; raises FormatError on anything malformed (never unpickles)."""
        tensors, meta = read_safetensors(path)
        if meta.get("format") != FORMAT_NAME:
            raise FormatError(f"{path}: not a lorakern adapter generator (format {meta.get('format')!r})")
        try:
            cfg = CVAEConfig(**json.loads(meta["cvae_config"]))
            layout = AdapterLayout.from_dict(json.loads(meta["layout"]))
            peft_config = json.loads(meta["peft_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: bad metadata ({e})") from None
        if not isinstance(peft_config, dict):
            raise FormatError(f"{path}: peft_config must be an object")
        model = AdapterCVAE(cfg)
        state = {k[5:]: v for k, v in tensors.items() if k.startswith("cvae.")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise FormatError(f"{path}: CVAE weights do not match its config: {str(e)[:300]}") from None
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise FormatError(f"{path}: NaN or Inf in the CVAE weights")
        try:
            norm = Normalizer(layout, tensors["norm.mean"], tensors["norm.scale"])
            return cls(model, norm, tensors["cond.mean"], tensors["cond.std"], peft_config)
        except (KeyError, ValueError) as e:
            raise FormatError(f"{path}: {e}") from None
