"""Training data for the adapter generator: per task, a trajectory of LoRA checkpoints.

Each task's adapter is trained with the suite's trainer (:mod:`lorakern.apps.train`) at a
small rank on the attention ``q_proj`` and ``v_proj`` only (default rank 2, alpha 4:
ICM-LoRA's generator reads and writes whole adapters as one vector, and q/v at rank 2
is 115 200 numbers for SmolLM2-135M's 30 layers). The weights after each of the last
``keep`` optimizer steps, every ``every`` steps, are kept as the trajectory.

A trajectory file is one safetensors file: ``checkpoints`` ``[C, L]`` float16 (the
flattened adapters, :mod:`~lorakern.apps.icm.flatten` order; float16 halves the size
and is far finer than the spread between checkpoints), ``steps`` int64 ``[C]``, and
metadata (task, layout, config, metric of the final adapter). The final adapter is
also kept in float32 as a PEFT directory beside it: that is the "original" the
generator is compared with.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...adapters.attach import apply_adapter
from ...adapters.peft_io import LoraAdapter, load_peft_adapter, save_peft_adapter
from ...formats.io import FormatError, read_safetensors
from ...data.cache import cache_dir
from ..train.tasks import get_task
from ..train.trainer import TrainConfig, exact_match, train_task_adapter
from .flatten import AdapterLayout

__all__ = ["Trajectory", "TrajectoryConfig", "ensure_trajectories", "load_trajectory", "save_trajectory",
           "train_trajectory", "trajectory_dir"]

FORMAT_NAME = "lorakern.trajectory"


@dataclass
class TrajectoryConfig:
    """How trajectories are trained: LoRA rank/alpha/targets, steps, and which checkpoints are kept."""

    rank: int = 2
    alpha: float = 4.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    steps: int = 80
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 8
    keep: int = 50  # the last `keep` steps...
    every: int = 2  # ...one checkpoint every `every` steps
    seed: int = 0

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if not 1 <= self.keep <= self.steps or self.every < 1:
            raise ValueError(f"need 1 <= keep <= steps and every >= 1, got {self}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(rank=self.rank, alpha=self.alpha, targets=self.targets, steps=self.steps,
                           batch_size=self.batch_size, lr=self.lr, warmup=self.warmup, seed=self.seed)


@dataclass
class Trajectory:
    """One task's checkpoints: ``checkpoints`` ``[C, layout.numel]`` (float16), their ``steps``, the final
    adapter (float32), and a record (task, config, metric)."""

    task: str
    layout: AdapterLayout
    checkpoints: torch.Tensor
    steps: torch.Tensor
    final: LoraAdapter
    record: dict


def trajectory_dir(root: Path | None = None) -> Path:
    """Where trajectories are cached: ``$LORAKERN_CACHE/trajectories``."""
    return Path(root or cache_dir() / "trajectories")


def train_trajectory(model, tokenizer, task_name: str, cfg: TrajectoryConfig | None = None, progress: bool = True,
                     eval_examples: int = 100) -> Trajectory:
    """Train ``task_name``'s adapter and keep its last checkpoints; measures its exact match too."""
    cfg = cfg or TrajectoryConfig()
    task = get_task(task_name)
    first_kept = cfg.steps - cfg.keep
    kept, steps = [], []

    def on_step(step, weights):
        if step >= first_kept and (cfg.steps - 1 - step) % cfg.every == 0:
            kept.append(torch.cat([t.reshape(-1) for m in sorted(weights) for t in weights[m]]).half())
            steps.append(step)

    t0 = time.perf_counter()
    final = train_task_adapter(model, tokenizer, task, cfg.train_config(), progress=progress, on_step=on_step)
    seconds = time.perf_counter() - t0
    layout = AdapterLayout.of(final)
    with apply_adapter(model, final):
        metric = exact_match(model, tokenizer, task, n=eval_examples)
    record = {"task": task_name, "family": task.family, "param": task.param, "description": task.description,
              "instruction": task.instruction, "exact_match": metric, "train_seconds": round(seconds, 1),
              "config": asdict(cfg)}
    return Trajectory(task_name, layout, torch.stack(kept), torch.tensor(steps), final, record)


def save_trajectory(traj: Trajectory, root: Path | None = None) -> Path:
    """Write ``<root>/<task>.safetensors`` and the final adapter as ``<root>/<task>/`` (PEFT)."""
    root = trajectory_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{traj.task}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({"checkpoints": traj.checkpoints.contiguous(), "steps": traj.steps.contiguous()}, str(tmp),
              metadata={"format": FORMAT_NAME, "layout": json.dumps(traj.layout.to_dict()),
                        "record": json.dumps(traj.record)})
    os.replace(tmp, path)
    save_peft_adapter(traj.final, root / traj.task)
    return path


def load_trajectory(path: str | os.PathLike) -> Trajectory:
    """Read a trajectory file (and its final adapter directory beside it); validates shapes and values."""
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{path}: not a lorakern trajectory file (format {meta.get('format')!r})")
    try:
        layout = AdapterLayout.from_dict(json.loads(meta["layout"]))
        record = json.loads(meta["record"])
    except (KeyError, json.JSONDecodeError, ValueError) as e:
        raise FormatError(f"{path}: bad metadata ({e})") from None
    ck, steps = tensors.get("checkpoints"), tensors.get("steps")
    if ck is None or steps is None or ck.dim() != 2 or ck.shape[1] != layout.numel or steps.shape != (ck.shape[0],):
        raise FormatError(f"{path}: checkpoints/steps missing or of the wrong shape for the layout")
    if not torch.isfinite(ck.float()).all():
        raise FormatError(f"{path}: NaN or Inf in the checkpoints")
    final = load_peft_adapter(path.with_suffix(""))
    try:
        layout.check(final)
    except ValueError as e:
        raise FormatError(f"{path}: final adapter does not match the layout: {e}") from None
    return Trajectory(record.get("task", path.stem), layout, ck, steps, final, record)


def ensure_trajectories(model, tokenizer, names, cfg: TrajectoryConfig | None = None, root: Path | None = None,
                        progress: bool = True) -> dict[str, Trajectory]:
    """Load each task's trajectory from the cache, training the missing ones (and those trained with another
    config)."""
    cfg = cfg or TrajectoryConfig()
    out = {}
    for name in names:
        path = trajectory_dir(root) / f"{name}.safetensors"
        if path.is_file():
            traj = load_trajectory(path)
            if traj.record.get("config") == json.loads(json.dumps(asdict(cfg))):
                out[name] = traj
                continue
        traj = train_trajectory(model, tokenizer, name, cfg, progress=progress)
        save_trajectory(traj, root)
        if progress:
            print(f"trajectory {name}: exact match {traj.record['exact_match']:.2f}, "
                  f"{traj.checkpoints.shape[0]} checkpoints, {traj.record['train_seconds']:.0f} s", flush=True)
        out[name] = traj
    return out
