"""ICM-LoRA adapter generator: train on trajectories, generate adapters from examples, save/load.

A generator is four parts, applied in this order when it generates:

1. :class:`~.projection.ConditionProjection`: the task vector (the base model's mean last-token state over the
   examples, :func:`~.condition.task_vector`) projected by LDA onto ``d`` task coordinates;
2. :class:`~.cvae.AdapterCVAE`'s decoder: ``(z, coordinates) -> k`` coefficients (``z = 0``, the prior's mean,
   or ``z ~ N(0, I)`` with a seed: ICM-LoRA's sampling);
3. :class:`~.basis.AdapterBasis`: ``mean + coef @ basis``, a normalized adapter vector;
4. :class:`~.flatten.Normalizer`: back to the adapter's own scale, then a PEFT-format :class:`LoraAdapter`.

:meth:`AdapterGenerator.fit` takes, per task, a trajectory of flattened checkpoints and several task vectors
(different draws of examples, so that the projection and the decoder learn what does not change between draws);
:meth:`AdapterGenerator.save` writes one safetensors file (format version 2; the first version, a convolutional
CVAE over the raw 115,200 values, is refused with a request to retrain) that :meth:`AdapterGenerator.load`
validates.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...adapters.peft_io import LoraAdapter
from ...formats.io import FormatError, read_safetensors
from .basis import AdapterBasis
from .condition import TaskExamples, task_vector
from .cvae import AdapterCVAE, CVAEConfig
from .flatten import AdapterLayout, Normalizer, unflatten_adapter
from .projection import ConditionProjection, split_draws

__all__ = ["AdapterGenerator", "GeneratorTrainConfig"]

FORMAT_NAME = "lorakern.adapter_generator"
FORMAT_VERSION = 2


@dataclass
class GeneratorTrainConfig:
    """How :meth:`AdapterGenerator.fit` builds a generator.

    ``basis_directions`` / ``basis_bits``: the :class:`AdapterBasis` (at most the number of checkpoints; bits 2, 3,
    4, 8 or 16); ``lda_shrinkage``: :meth:`ConditionProjection.fit`'s shrinkage; ``cond_dim``: LDA coordinates
    kept (default: tasks - 1); then Adam with cosine decay over ``epochs`` passes of the checkpoints.
    """

    epochs: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    basis_directions: int = 20
    basis_bits: int = 3
    lda_shrinkage: float = 0.7
    cond_dim: int | None = None
    condition_noise: float = 1.0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 2 or not self.lr > 0 or self.basis_directions < 1:
            raise ValueError(f"invalid generator training config {self}")
        if self.basis_bits not in (2, 3, 4, 8, 16):
            raise ValueError(f"basis_bits must be 2, 3, 4, 8 or 16, got {self.basis_bits}")
        if not 0 < self.lda_shrinkage <= 1:
            raise ValueError(f"lda_shrinkage must be in (0, 1], got {self.lda_shrinkage}")
        if self.cond_dim is not None and (type(self.cond_dim) is not int or self.cond_dim < 1):
            raise ValueError(f"cond_dim must be None or a positive integer, got {self.cond_dim!r}")
        if not (math.isfinite(self.condition_noise) and self.condition_noise >= 0):
            raise ValueError(f"condition_noise must be finite and >= 0, got {self.condition_noise}")


class AdapterGenerator:
    """A trained generator: condition projection, CVAE, adapter basis and normalizer (see the module docstring),
    plus the PEFT config its adapters carry."""

    def __init__(self, projection: ConditionProjection, cvae: AdapterCVAE, basis: AdapterBasis,
                 normalizer: Normalizer, peft_config: dict):
        if basis.length != normalizer.layout.numel:
            raise ValueError(f"basis length {basis.length} != adapter layout size {normalizer.layout.numel}")
        if cvae.cfg.coef_dim != basis.k or cvae.cfg.cond_dim != projection.out_dim:
            raise ValueError(f"CVAE ({cvae.cfg.coef_dim} coefficients, {cvae.cfg.cond_dim} condition coordinates) "
                             f"does not match the basis ({basis.k}) and the projection ({projection.out_dim})")
        self.projection, self.cvae, self.basis = projection, cvae.eval(), basis
        self.normalizer = normalizer
        self.peft_config = dict(peft_config)

    @property
    def layout(self) -> AdapterLayout:
        """The layout of the adapters it writes (modules, shapes, scales)."""
        return self.normalizer.layout

    @property
    def cond_dim(self) -> int:
        """Size of the task vector it reads (the base model's hidden size)."""
        return self.projection.in_dim

    def num_bytes(self) -> int:
        """Bytes of the generator's tensors as saved."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    # -- training ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, tasks: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: AdapterLayout, peft_config: dict,
            cvae: dict | None = None, train: GeneratorTrainConfig | None = None,
            progress: bool = True) -> tuple["AdapterGenerator", list[dict]]:
        """Train a generator.

        Args:
            tasks: ``{task: (checkpoints [C, layout.numel], task vectors [V, D])}``, at least two tasks with
                ``V >= 2`` draws each (the projection is fitted on how vectors vary within and between tasks).
            layout: the adapters' layout; peft_config: the config generated adapters carry.
            cvae: :class:`CVAEConfig` overrides (``latent``, ``hidden``, ``beta``).
            train: :class:`GeneratorTrainConfig`.
        Returns ``(generator, history)`` with one ``{epoch, loss, mse, kl}`` per epoch (``mse`` relative to the
        coefficients' variance). Raises ValueError on inconsistent shapes.
        """
        train = train or GeneratorTrainConfig()
        if len(tasks) < 2:
            raise ValueError("need at least two tasks to train a generator")
        conds = [v for _, v in tasks.values()]
        dims = {v.shape[-1] for v in conds}
        if len(dims) != 1 or any(v.dim() != 2 or v.shape[0] < 2 for v in conds):
            raise ValueError(f"task vectors must all be [V >= 2, D] with one D, got {[tuple(v.shape) for v in conds]}")
        for name, (ck, v) in tasks.items():
            if ck.dim() != 2 or ck.shape[1] != layout.numel or ck.shape[0] < 1:
                raise ValueError(f"{name}: checkpoints must be [C, {layout.numel}], got {tuple(ck.shape)}")
            if not (torch.isfinite(ck).all() and torch.isfinite(v).all()):
                raise ValueError(f"{name}: NaN or Inf in the checkpoints or the task vectors")
        with torch.random.fork_rng():  # the caller's global RNG is left as it was
            torch.manual_seed(train.seed)
            return cls._fit(tasks, conds, layout, peft_config, cvae, train, progress)

    @classmethod
    def _fit(cls, tasks, conds, layout, peft_config, cvae, train, progress):
        raw = torch.cat([ck.float() for ck, _ in tasks.values()])
        normalizer = Normalizer.fit(raw, layout)
        X = normalizer.normalize(raw)
        if X.shape[0] < 2:
            raise ValueError("need at least two checkpoints in all")
        basis = AdapterBasis.fit(X, min(train.basis_directions, X.shape[0] - 1), train.basis_bits)
        coef = basis.encode(X)
        del X
        owner = torch.cat([torch.full((ck.shape[0],), i) for i, (ck, _) in enumerate(tasks.values())])
        # cross-fitting (split_draws): the projection is fitted on the even draws and the decoder trained on
        # conditions spread as the odd ones land, i.e. as fresh draws do (the projection's own draws sit closer to
        # their task's centre than new ones: LDA fits their noise). Conditions for training: task centre +
        # Gaussian noise with the pooled covariance of those draws around their centres.
        halves = [split_draws(v) for v in conds]
        projection = ConditionProjection.fit([a for a, _ in halves], dim=train.cond_dim,
                                             shrinkage=train.lda_shrinkage)
        centres, noise_l = projection.fresh_draw_model([b for _, b in halves])
        noise_l = noise_l * train.condition_noise
        model = AdapterCVAE(CVAEConfig(coef_dim=basis.k, cond_dim=projection.out_dim, **(cvae or {})))
        model.coef_std.copy_(coef.std(0, unbiased=False).clamp_min(1e-6))
        opt = torch.optim.Adam(model.parameters(), lr=train.lr, foreach=True)
        steps_per_epoch = math.ceil(coef.shape[0] / train.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, train.epochs * steps_per_epoch)
        gen = torch.Generator().manual_seed(train.seed)
        history = []
        model.train()
        bar = tqdm(range(train.epochs), desc="train generator", disable=not progress)
        for epoch in bar:
            order = torch.randperm(coef.shape[0], generator=gen)
            sums = [0.0, 0.0, 0.0]
            for s in range(0, coef.shape[0], train.batch_size):
                idx = order[s:s + train.batch_size]
                c = centres[owner[idx]] + torch.randn(idx.numel(), centres.shape[1], generator=gen) @ noise_l.T
                loss, mse, kl = model.loss(coef[idx], c)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                for i, v in enumerate((loss, mse, kl)):
                    sums[i] += float(v.detach()) * idx.numel()
            rec = {"epoch": epoch, "loss": sums[0] / coef.shape[0], "mse": sums[1] / coef.shape[0],
                   "kl": sums[2] / coef.shape[0]}
            history.append(rec)
            bar.set_postfix(mse=f"{rec['mse']:.4f}", kl=f"{rec['kl']:.1f}")
        return cls(projection, model.eval(), basis, normalizer, peft_config), history

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, condition: torch.Tensor, seed: int | None = None) -> LoraAdapter:
        """An adapter (float32, PEFT layout) for task vector ``condition`` (float ``[cond_dim]``).

        ``seed``: ``None`` decodes the prior's mean ``z = 0`` (the default, deterministic); an integer draws
        ``z ~ N(0, I)`` with that seed (ICM-LoRA's sampling). Raises ValueError on a condition of the wrong size
        or with NaN/Inf, FloatingPointError if the adapter comes out non-finite.
        """
        condition = torch.as_tensor(condition)
        if condition.dim() != 1 or condition.shape[0] != self.cond_dim:
            raise ValueError(f"the generator's condition has {self.cond_dim} values (the base model's hidden "
                             f"size it was trained with), got shape {tuple(condition.shape)}")
        if not torch.isfinite(condition).all():
            raise ValueError("condition contains NaN or Inf")
        c = self.projection(condition.float().cpu()[None])
        if seed is None:
            z = torch.zeros(1, self.cvae.cfg.latent)
        else:
            z = torch.randn(1, self.cvae.cfg.latent, generator=torch.Generator().manual_seed(seed))
        out = self.raw_adapters(self.cvae.eval().decode(z, c), torch.float64)[0].float()
        if not torch.isfinite(out).all():
            raise FloatingPointError("the generator produced NaN or Inf")
        adapter = unflatten_adapter(out, self.layout, dict(self.peft_config))
        adapter.metadata["lorakern_task"] = "generated"
        return adapter

    def raw_adapters(self, coef: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Flat adapters in the adapter's own scale, ``[n, L]`` in ``dtype``, from basis coefficients ``[n, k]``:
        ``(basis.mean + coef @ basis) * norm.scale + norm.mean``. Differentiable in ``coef`` (the fine-tuning
        stage trains through it)."""
        if coef.dim() != 2 or coef.shape[1] != self.basis.k:
            raise ValueError(f"expected coefficients [n, {self.basis.k}], got {tuple(coef.shape)}")
        x = self.basis.mean.to(dtype) + coef.to(dtype) @ self.basis._dense.to(dtype)
        return x * self.normalizer._scale_full.to(dtype) + self.normalizer._mean_full.to(dtype)

    def generate_from_examples(self, model, tokenizer, examples: TaskExamples,
                               seed: int | None = None) -> LoraAdapter:
        """Read ``examples`` with the base model (:func:`task_vector`) and generate the task's adapter."""
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is not None and hidden != self.cond_dim:
            raise ValueError(f"this generator was trained with a base model of hidden size {self.cond_dim}; "
                             f"the model given has {hidden}")
        return self.generate(task_vector(model, tokenizer, examples), seed=seed)

    # -- files ------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {f"cvae.{k}": v.detach().contiguous() for k, v in self.cvae.state_dict().items()}
        t.update(self.basis.tensors("basis."))
        t.update(self.projection.tensors("cond."))
        t.update({"norm.mean": self.normalizer.mean, "norm.scale": self.normalizer.scale})
        return t

    def save(self, path: str | os.PathLike) -> Path:
        """Write the generator to one safetensors file (written to a temporary name, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "cvae_config": json.dumps(self.cvae.cfg.to_dict()), "basis": json.dumps(self.basis.meta()),
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
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise FormatError(f"{path}: a generator of format version {meta.get('format_version', 1)}; this "
                              f"lorakern reads version {FORMAT_VERSION} (retrain it: lorakern train-generator)")
        try:
            cfg = CVAEConfig(**json.loads(meta["cvae_config"]))
            layout = AdapterLayout.from_dict(json.loads(meta["layout"]))
            peft_config = json.loads(meta["peft_config"])
            basis_meta = json.loads(meta["basis"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise FormatError(f"{path}: bad metadata ({e})") from None
        if not isinstance(peft_config, dict) or not isinstance(basis_meta, dict):
            raise FormatError(f"{path}: peft_config and basis must be objects")
        for k, v in tensors.items():
            if k.split(".")[0] in ("cvae", "cond", "norm") and v.dtype != torch.float32:
                raise FormatError(f"{path}: {k} must be float32, got {v.dtype}")
        state = {k[5:]: v for k, v in tensors.items() if k.startswith("cvae.")}
        with torch.device("meta"):  # the config's shapes, checked against the file before anything is allocated
            want = {k: tuple(v.shape) for k, v in AdapterCVAE(cfg).state_dict().items()}
        if {k: tuple(v.shape) for k, v in state.items()} != want:
            raise FormatError(f"{path}: CVAE weights do not match its config {cfg.to_dict()}")
        model = AdapterCVAE(cfg)
        model.load_state_dict(state, strict=True)
        if not all(torch.isfinite(v).all() for v in state.values()) or not bool((model.coef_std > 0).all()):
            raise FormatError(f"{path}: NaN or Inf in the CVAE weights, or a coefficient scale that is not positive")
        try:
            basis = AdapterBasis.from_tensors(tensors, basis_meta, "basis.")
            proj = ConditionProjection(tensors["cond.mean"], tensors["cond.std"], tensors["cond.weight"])
            norm = Normalizer(layout, tensors["norm.mean"], tensors["norm.scale"])
            return cls(proj, model, basis, norm, peft_config)
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise FormatError(f"{path}: {e}") from None
