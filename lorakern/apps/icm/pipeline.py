"""The default ICM-LoRA setup on SmolLM2: which tasks, how conditions are drawn, and building the generator.

Tasks: two families with a numeric parameter, add a constant ``addcC`` and subtract a
constant ``subcC`` (C = 1..12; both prompts say only "Transform the number.", so the task
vector has to read the operation and the constant from the examples). ``addc5``,
``addc10``, ``subc4`` and ``subc9`` are held out: the generator never sees their adapters
or examples and is tested on them. (A Caesar-shift family was tried first: rank-2 q/v
LoRA did not learn ``caesar5`` in 80 steps, exact match 0.00, so it would only have
tested the generator on adapters that do nothing.)

Task vectors average 32 examples. Measured on the 20 seen tasks (standardized units):
with 8 examples, two draws of the same task were 26.5 apart against 31.2 between tasks,
and a fresh draw's nearest task was the right one for 80% of tasks; with 32 examples,
16.7 against 32.0 and 90%. The vector of a few examples is dominated by which numbers
were drawn, so give ``generate-adapter`` as many examples as you have. In the generator's
LDA coordinates (:mod:`.projection`, fitted on 12 draws per task) the nearest task was
the right one for 60 of 60 fresh draws (3 per seen task).

What limits held-out tasks (measured on these adapters, 100 evaluation examples): the
adapters of neighbouring constants do not interpolate. The mean of the ``addc4`` and
``addc6`` adapters scores 0.00 on ``addc5`` (its own adapter 0.94; likewise 0.00-0.01
for the other three held-out tasks), and ``addc5``'s own adapter projected onto the span
of all 20 seen adapters keeps 0.71 (``addc10`` 0.41, ``subc4`` 0.54, ``subc9`` 0.18):
each adapter has about as much task-specific direction as the others, so a generator
that writes weights by reconstruction (the CVAE's objective) can reproduce seen tasks
but cannot reach a new member of the family from 10 seen members.

:func:`ensure_generator` trains what is missing (trajectories, the CVAE, then its fine-tuning
on the tasks' loss) and caches the generator at :func:`default_generator_path`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...data.cache import cache_dir
from ...formats.io import FormatError, read_safetensors
from ..train.tasks import get_task
from .condition import TaskExamples, task_vector
from .finetune import finetune_generator
from .generator import AdapterGenerator, GeneratorTrainConfig
from .trajectories import TrajectoryConfig, ensure_trajectories

__all__ = ["CONDITION_EXAMPLES", "FAMILIES", "FINETUNE_STEPS", "HELDOUT", "SEEN", "condition_vectors",
           "default_generator_path", "ensure_generator", "stage1_path", "training_task_vectors"]

FAMILIES = {"addc": tuple(range(1, 13)), "subc": tuple(range(1, 13))}
HELDOUT = ("addc5", "addc10", "subc4", "subc9")
SEEN = tuple(f"{fam}{p}" for fam, ps in FAMILIES.items() for p in ps if f"{fam}{p}" not in HELDOUT)
CONDITION_EXAMPLES = 32  # examples the base model reads per task vector (see the module docstring)
TRAIN_DRAWS = 16  # task vectors per seen task while training (different examples each)
TRAIN_SEED, EVAL_SEED = 50_000, 90_000  # example seeds: training conditions / evaluation conditions
FINETUNE_STEPS = 200  # stage 2 (:mod:`.finetune`): about 2.5 minutes on 2 cores


def default_generator_path() -> Path:
    """``$LORAKERN_CACHE/generator/icm_lora.safetensors``."""
    return cache_dir() / "generator" / "icm_lora.safetensors"


def condition_vectors(model, tokenizer, task_name: str, draws: int = 1, seed: int = EVAL_SEED,
                      n_examples: int = CONDITION_EXAMPLES) -> torch.Tensor:
    """``[draws, hidden]`` task vectors of ``task_name``, each from ``n_examples`` fresh examples."""
    task = get_task(task_name)
    return torch.stack([task_vector(model, tokenizer, TaskExamples.of_task(task, n_examples, seed + 101 * d))
                        for d in range(draws)])


def stage1_path(path: str | Path) -> Path:
    """Where :func:`ensure_generator` keeps the generator before its fine-tuning stage (for ablations)."""
    path = Path(path)
    return path.with_name(path.stem + ".stage1.safetensors")


def training_task_vectors(model, tokenizer, names, cache: Path | None = None, progress: bool = True) -> dict:
    """``{task: [TRAIN_DRAWS, hidden]}`` task vectors for training, cached in ``cache`` (safetensors) when given;
    the cache is used only when its key (draws, seeds, examples, the model's class, name and width, the tasks'
    prompts) matches."""
    cfg = getattr(model, "config", None)
    key = json.dumps({"draws": TRAIN_DRAWS, "seed": TRAIN_SEED, "examples": CONDITION_EXAMPLES,
                      "model": [type(model).__name__, getattr(cfg, "_name_or_path", None),
                                getattr(cfg, "hidden_size", None)],
                      "tasks": {n: [get_task(n).instruction, get_task(n).description] for n in sorted(names)}})
    if cache is not None and cache.is_file():
        try:
            tensors, meta = read_safetensors(cache)
            if meta.get("key") == key and set(names) == set(tensors):
                return {n: tensors[n].float() for n in names}
        except FormatError:
            pass
    out = {n: condition_vectors(model, tokenizer, n, TRAIN_DRAWS, TRAIN_SEED)
           for n in tqdm(names, desc=f"task vectors ({TRAIN_DRAWS} draws per task)", disable=not progress)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: v.contiguous() for n, v in out.items()}, str(cache), metadata={"key": key})
    return out


def ensure_generator(model, tokenizer, path: str | Path | None = None, seen=SEEN,
                     traj_cfg: TrajectoryConfig | None = None, cvae: dict | None = None,
                     train: GeneratorTrainConfig | None = None, finetune_steps: int = FINETUNE_STEPS,
                     retrain: bool = False, progress: bool = True) -> tuple[AdapterGenerator, dict]:
    """Load the cached generator or build it: trajectories of the ``seen`` tasks (trained if missing), their
    task vectors (cached beside the generator), the CVAE on the trajectories (stage 1, kept at
    :func:`stage1_path`), then ``finetune_steps`` steps of :func:`~.finetune.finetune_generator` on the tasks'
    own loss (stage 2; 0 skips it). Returns ``(generator, record)``; the record (histories, seconds, tasks) is
    kept beside the file as JSON."""
    import time

    path = Path(path or default_generator_path())
    rec_path = path.with_suffix(".json")
    if path.is_file() and rec_path.is_file() and not retrain:
        try:
            return AdapterGenerator.load(path), json.loads(rec_path.read_text())
        except (FormatError, ValueError) as e:  # an older format, a damaged file or record: build it again
            if progress:
                print(f"rebuilding the generator: {e}", flush=True)
    t0 = time.perf_counter()
    trajs = ensure_trajectories(model, tokenizer, seen, traj_cfg, progress=progress)
    t1 = time.perf_counter()
    vecs = training_task_vectors(model, tokenizer, list(trajs), path.with_name(path.stem + ".task_vectors.safetensors"),
                                 progress)
    data = {name: (t.checkpoints, vecs[name]) for name, t in trajs.items()}
    layouts = {t.layout for t in trajs.values()}
    if len(layouts) != 1:
        raise ValueError("the seen tasks' adapters have different layouts")
    template = {k: v for k, v in next(iter(trajs.values())).final.config.items() if not k.startswith("lorakern_")}
    t2 = time.perf_counter()
    gen, history = AdapterGenerator.fit(data, layouts.pop(), template, cvae=cvae, train=train, progress=progress)
    gen.save(stage1_path(path))
    t3 = time.perf_counter()
    ft_history = []
    if finetune_steps > 0:
        ft_history = finetune_generator(gen, model, tokenizer, {n: (get_task(n), vecs[n]) for n in trajs},
                                        steps=finetune_steps, seed=(train or GeneratorTrainConfig()).seed,
                                        progress=progress)
    t4 = time.perf_counter()
    gen.save(path)
    record = {"seen": list(seen), "trajectory_seconds": round(t1 - t0, 1), "condition_seconds": round(t2 - t1, 1),
              "train_seconds": round(t3 - t2, 1), "finetune_seconds": round(t4 - t3, 1), "history": history,
              "finetune_steps": finetune_steps, "finetune_history": ft_history,
              "cvae_config": gen.cvae.cfg.to_dict(), "generator_bytes": gen.num_bytes()}
    rec_path.write_text(json.dumps(record, indent=1))
    return gen, record
