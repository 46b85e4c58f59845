"""A small LoRA trainer for the adapter suite (CPU, minutes per adapter).

LoRA on every attention and MLP projection (q/k/v/o/gate/up/down) of a LLaMA-style
Hugging Face model, full precision or quantized by lorakern (QLoRA-style: gradients flow through
``quant_matmul`` / ``gwq_matmul`` to the activations; ``TrainConfig(qalora=True)`` trains QA-LoRA,
arXiv 2309.14717), PEFT's initialisation (A Kaiming-uniform, B zero), AdamW,
fixed seeds, a progress bar. The result is a :class:`~lorakern.adapters.LoraAdapter`
with a PEFT config, saved with :func:`~lorakern.adapters.save_peft_adapter` in the
format PEFT itself loads.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ...adapters.peft_io import LoraAdapter, LoraLayer
from ...formats.linear_like import linear_shape
from ...ops.reference import qalora_pool
from ...nn.gwq_linear import GWQLinear
from ...nn.quant_linear import QuantLinear
from ...nn.swap import replace_module
from .tasks import Task

__all__ = ["DEFAULT_TARGETS", "TrainConfig", "answer_loss", "answer_nll", "encode_examples", "exact_match", "frozen", "injected", "mixture_examples",
           "optimize", "peft_config", "train_lm_adapter", "train_mixture_adapter", "train_task_adapter"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_task_adapter` / :func:`train_lm_adapter`.

    ``scale = alpha / rank`` as in PEFT. ``targets`` are module-name suffixes.
    """

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 10
    seed: int = 0
    seq_len: int = 256  # language-modelling windows
    #: QA-LoRA (arXiv 2309.14717): A reads the input average-pooled over the base's quantization groups, so the
    #: trained adapter merges into a quantized base's zeros (lorakern.adapters.merge_qalora_adapter)
    qalora: bool = False
    #: the pooling group size (default: each target layer's quantization group size)
    qalora_group_size: int | None = None

    def __post_init__(self):
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1 or self.alpha <= 0 or self.lr <= 0:
            raise ValueError(f"invalid training config {self}")
        if self.qalora_group_size is not None and (not isinstance(self.qalora_group_size, int)
                                                   or self.qalora_group_size < 1):
            raise ValueError(f"qalora_group_size must be a positive integer or None, got {self.qalora_group_size!r}")


class _TrainableLoRA(nn.Module):
    """``base(x) + scale * (x A^T) B^T`` with trainable A ``[r, in]`` and B ``[out, r]``."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, gen: torch.Generator):
        super().__init__()
        self.base, self.scale = base, scale
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)), as PEFT and nn.Linear
        self.A = nn.Parameter((torch.rand(rank, base.in_features, generator=gen) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


class _TrainableQALoRA(nn.Module):
    """``base(x) + scale * (pool_G(x) A^T) B^T``, trained in PEFT's parametrisation (``use_qalora``: the pooled
    mean times ``in / G``, A ``[r, in / G]`` initialised as PEFT's ``nn.Linear(in / G, r)``, B zero);
    :meth:`layer` gives lorakern's A (on the mean itself)."""

    def __init__(self, base: nn.Module, rank: int, scale: float, gen: torch.Generator, group_size: int):
        super().__init__()
        K = linear_shape(base)[1]
        if group_size < 1 or K % group_size:
            raise ValueError(f"lorakern: QA-LoRA group size {group_size} does not divide in_features={K}")
        self.base, self.scale, self.group_size, self.ng = base, scale, group_size, K // group_size
        bound = 1.0 / math.sqrt(self.ng)
        self.A = nn.Parameter((torch.rand(rank, self.ng, generator=gen) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(linear_shape(base)[0], rank))

    def forward(self, x):
        pooled = qalora_pool(x, self.group_size) * self.ng
        return self.base(x) + (pooled @ self.A.t() @ self.B.t()) * self.scale

    def layer(self) -> LoraLayer:
        return LoraLayer(self.A.detach() * self.ng, self.B.detach().clone(), self.scale)


def _is_target(m: nn.Module) -> bool:
    """A layer LoRA trains on: ``nn.Linear`` or lorakern's quantized layers (gradients flow through their ops)."""
    return isinstance(m, (nn.Linear, QuantLinear, GWQLinear))


def _target_names(model: nn.Module, targets) -> list[str]:
    names = [n for n, m in model.named_modules() if _is_target(m) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no linear or quantized layer named {targets} in the model")
    return names


@contextmanager
def injected(model: nn.Module, names, make):
    """Swap each module ``name`` of ``model`` for ``make(name, module)`` (a trainable wrapper around it) and
    yield ``{name: wrapper}``; the original modules go back on exit, also when a ``make`` fails."""
    swapped = {}
    try:
        for name in names:
            swapped[name] = replace_module(model, name, make(name, model.get_submodule(name)))
        yield {n: model.get_submodule(n) for n in swapped}
    finally:
        for name, base in swapped.items():
            replace_module(model, name, base)


def _lora_injected(model: nn.Module, cfg: TrainConfig):
    """The target layers as trainable LoRA (or QA-LoRA) wrappers for the ``with`` block (:func:`injected`)."""
    gen = torch.Generator().manual_seed(cfg.seed)

    def make(name, base):
        if not cfg.qalora:
            return _TrainableLoRA(base, cfg.rank, cfg.alpha / cfg.rank, gen)
        G = cfg.qalora_group_size or getattr(base, "group_size", None)
        if G is None:
            raise ValueError(f"lorakern: {name} is a {type(base).__name__} with no quantization group size; give "
                             "TrainConfig.qalora_group_size")
        return _TrainableQALoRA(base, cfg.rank, cfg.alpha / cfg.rank, gen, G)
    return injected(model, _target_names(model, cfg.targets), make)


def peft_config(cfg: TrainConfig, base_model: str = "SmolLM2-135M-Instruct", **extra) -> dict:
    """The ``adapter_config.json`` PEFT writes for this LoRA."""
    out = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none",
           "target_modules": sorted(cfg.targets), "fan_in_fan_out": False, "inference_mode": True,
           "use_rslora": False, "init_lora_weights": True, "modules_to_save": None}
    out.update(extra)
    return out


@contextmanager
def frozen(model: nn.Module):
    """Freeze every parameter of ``model`` (the base of an adapter being trained); restore the
    ``requires_grad`` flags and the train/eval mode on exit."""
    was_training = model.training
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])


def optimize(params: list, cfg: TrainConfig, loss_fn, desc: str, progress: bool, on_step=None) -> None:
    """The training loop every lorakern trainer shares: AdamW, linear warm-up then cosine decay, gradient
    clipping at 1.0, ``cfg.steps`` steps of ``loss_fn(step)``, a progress bar with the loss's moving average.
    ``on_step(step)`` runs after every optimizer step. Raises FloatingPointError when the loss stops being finite."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup))
        * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    ema = None
    for step in bar:
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        v = float(loss.detach())
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        bar.set_postfix(loss=f"{ema:.3f}")
        if on_step is not None:
            on_step(step)


def _train(model, cfg: TrainConfig, loss_fn, desc: str, progress: bool, metadata: dict,
           on_step=None) -> LoraAdapter:
    torch.manual_seed(cfg.seed)
    with frozen(model), _lora_injected(model, cfg) as mods:
        params = [p for m in mods.values() for p in (m.A, m.B)]
        model.train()
        optimize(params, cfg, loss_fn, desc, progress, None if on_step is None else  # A as the adapter stores it
                 lambda step: on_step(step, {n: ((m.layer().A if cfg.qalora else m.A.detach()), m.B.detach())
                                             for n, m in mods.items()}))
        extra = {}
        if cfg.qalora:
            sizes = {m.group_size for m in mods.values()}
            if len(sizes) != 1:
                raise ValueError(f"lorakern: the target layers have different quantization group sizes {sorted(sizes)}; "
                                 "a QA-LoRA adapter has one (TrainConfig.qalora_group_size)")
            extra = {"use_qalora": True, "qalora_group_size": sizes.pop()}
        adapter = LoraAdapter(peft_config(cfg, **extra), metadata=dict(metadata))
        for name, m in mods.items():
            adapter.layers[name] = (m.layer() if cfg.qalora else
                                    LoraLayer(m.A.detach().clone(), m.B.detach().clone(), m.scale))
    return adapter


def encode_examples(tok, items):
    """Token ids of ``prompt + " answer\\n"`` for ``items = [(prompt, answer), ...]``, labels on the answer
    tokens only (-100 elsewhere), right-padded; returns ``(ids, labels, attention_mask)``."""
    seqs, labels = [], []
    for prompt, y in items:
        p = tok(prompt, add_special_tokens=False).input_ids
        a = tok(f" {y}\n", add_special_tokens=False).input_ids
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    L = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([s + [pad] * (L - len(s)) for s in seqs])
    lab = torch.tensor([s + [-100] * (L - len(s)) for s in labels])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    return ids, lab, mask


def mixture_examples(tasks, batch_size: int, seed: int) -> list[tuple[str, str]]:
    """``batch_size`` (prompt, answer) pairs spread evenly over ``tasks`` (the first ones take the remainder),
    each task's from its own seed ``seed + i``."""
    items = []
    q, rem = divmod(batch_size, len(tasks))
    for i, task in enumerate(tasks):
        n = q + (i < rem)
        if n:
            items += [(task.prompt(x), y) for x, y in task.examples(n, seed + i)]
    return items


def _encode_pairs(tok, task: Task, pairs):
    """Token ids of prompt + answer (+ newline) and the answer positions' labels, right-padded."""
    return encode_examples(tok, [(task.prompt(x), y) for x, y in pairs])


def answer_loss(model, ids, labels, mask):
    """Next-token cross entropy on the answer tokens only (the LM head runs on those positions alone)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = model.lm_head(hidden[:, :-1][sel])
    return nn.functional.cross_entropy(logits.float(), tgt[sel])


def train_task_adapter(model, tokenizer, task: Task, cfg: TrainConfig | None = None, progress: bool = True,
                       data_seed: int = 1_000_003, on_step=None) -> LoraAdapter:
    """Train a LoRA adapter on freshly generated examples of ``task`` (a new batch every step).

    Training examples come from seeds ``data_seed + step`` (evaluation uses other seeds,
    see :func:`exact_match`). ``on_step(step, {module: (A, B)})``, if given, sees the weights
    after every optimizer step (e.g. to save a trajectory of checkpoints; copy what you keep).
    Returns the adapter; the model is left unchanged.
    """
    cfg = cfg or TrainConfig()

    def loss_fn(step):
        pairs = task.examples(cfg.batch_size, data_seed + 7919 * cfg.seed + step)
        return answer_loss(model, *_encode_pairs(tokenizer, task, pairs))
    return _train(model, cfg, loss_fn, f"train {task.name}", progress,
                  {"lorakern_task": task.name, "lorakern_description": task.description}, on_step)


def train_mixture_adapter(model, tokenizer, tasks, cfg: TrainConfig | None = None, progress: bool = True,
                          data_seed: int = 1_000_003) -> LoraAdapter:
    """Train one LoRA adapter on a mixture of ``tasks`` (every step's batch spread evenly over them, fresh
    examples from seeds disjoint from :func:`exact_match`'s). The plain-LoRA peer of MoLA's multi-task
    training (:func:`lorakern.apps.train.train_mola_adapter`). Returns the adapter; the model is left unchanged."""
    cfg = cfg or TrainConfig()
    tasks = list(tasks)
    if not tasks:
        raise ValueError("train_mixture_adapter needs at least one task")

    def loss_fn(step):
        items = mixture_examples(tasks, cfg.batch_size, data_seed + 7919 * cfg.seed + 101 * step)
        return answer_loss(model, *encode_examples(tokenizer, items))
    names = ",".join(t.name for t in tasks)
    return _train(model, cfg, loss_fn, "train mixture", progress,
                  {"lorakern_task": names, "lorakern_description": f"mixture of {names}"})


def train_lm_adapter(model, tokenizer, text: str, cfg: TrainConfig | None = None, progress: bool = True,
                     name: str = "wikitext") -> LoraAdapter:
    """Train a language-modelling LoRA adapter on random ``cfg.seq_len``-token windows of ``text``."""
    cfg = cfg or TrainConfig(batch_size=4)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() - cfg.seq_len - 1
    if n <= 0:
        raise ValueError(f"text has {ids.numel()} tokens; need more than seq_len={cfg.seq_len}")
    rng = random.Random(cfg.seed)

    def loss_fn(step):
        starts = [rng.randrange(n) for _ in range(cfg.batch_size)]
        batch = torch.stack([ids[s:s + cfg.seq_len + 1] for s in starts])
        logits = model(input_ids=batch[:, :-1]).logits
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
    return _train(model, cfg, loss_fn, f"train {name}", progress,
                  {"lorakern_task": name, "lorakern_description": "language modelling on WikiText-2 valid.txt"})


@torch.no_grad()
def exact_match(model, tokenizer, task: Task, n: int = 100, seed: int = 12345, batch_size: int = 50,
                progress: bool = False, adapter_names: str | None = None) -> float:
    """Fraction of ``n`` held-out examples (seeds disjoint from training) whose greedy answer is exact.

    ``adapter_names``: for a model with an adapter bank (:func:`lorakern.attach_adapters`), one adapter name
    for every example, or ``"auto"`` (routed by the model's router, :mod:`lorakern.apps.dlp`); None: as attached.
    """
    pairs = task.examples(n, seed)
    max_new = max(len(tokenizer(f" {y}\n", add_special_tokens=False).input_ids) for _, y in pairs) + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nl = tokenizer("\n", add_special_tokens=False).input_ids[-1]
    correct = 0
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, n, batch_size), desc=f"eval {task.name}", disable=not progress, leave=False):
        chunk = pairs[i:i + batch_size]
        prompts = [tokenizer(task.prompt(x), add_special_tokens=False).input_ids for x, _ in chunk]
        L = max(map(len, prompts))
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
        kw = {}
        if adapter_names is not None:
            kw["adapter_names"] = adapter_names if adapter_names == "auto" else [adapter_names] * len(chunk)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=pad, eos_token_id=nl, **kw)
        for (x, y), gen in zip(chunk, out[:, L:].tolist()):
            text = tokenizer.decode(gen, skip_special_tokens=True).split("\n")[0].strip()
            correct += text == y
    model.train(was_training)
    return correct / n


@torch.no_grad()
def answer_nll(model, tokenizer, task: Task, n: int = 100, seed: int = 12345, batch_size: int = 50) -> float:
    """Mean negative log-likelihood per answer token of ``n`` held-out examples (teacher forcing; the same
    examples as :func:`exact_match`). A graded companion of exact match: it still moves when no answer is
    exactly right."""
    pairs = task.examples(n, seed)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, n, batch_size):
            ids, labels, mask = _encode_pairs(tokenizer, task, pairs[i:i + batch_size])
            k = int((labels[:, 1:] != -100).sum())
            total += float(answer_loss(model, ids, labels, mask)) * k
            count += k
    finally:
        model.train(was_training)
    return total / count
