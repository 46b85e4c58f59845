"""The adapter suite: one LoRA per generated task plus a WikiText-2 language-modelling
adapter, trained on SmolLM2-135M and cached outside the repository.

Adapters live in ``$LORAKERN_CACHE/adapters/<name>/`` (PEFT format) with a
``lorakern_train.json`` recording the config, the training time and the metric
before and after. :func:`ensure_suite` trains what is missing.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ...adapters.peft_io import LoraAdapter, load_peft_adapter, save_peft_adapter
from ...adapters.attach import apply_adapter
from ...data import read_wikitext
from ..evaluation.perplexity import perplexity, token_windows
from ...data.cache import cache_dir
from .tasks import HARD_SUITE, SUITE, get_task
from .trainer import TrainConfig, exact_match, train_lm_adapter, train_task_adapter

__all__ = ["LM_ADAPTER", "adapter_dir", "default_config", "ensure_suite", "evaluate_adapter_metric", "metric_info", "suite_names",
           "train_suite_adapter"]

LM_ADAPTER = "wikitext"
EVAL_EXAMPLES = 100
LM_EVAL_WINDOWS = (4, 512)  # the first 4 windows of 512 tokens of WikiText-2 test.txt


def suite_names(hard: bool = False) -> list[str]:
    """The suite's adapters: the generated tasks, then the language-modelling adapter; ``hard``: the harder
    variants and the suite's unsaturated count task (:data:`~lorakern.apps.train.tasks.HARD_SUITE`, no
    language-modelling adapter)."""
    return list(HARD_SUITE) if hard else [*SUITE, LM_ADAPTER]


def adapter_dir(name: str, root: Path | None = None) -> Path:
    """Where adapter ``name`` is cached."""
    return Path(root or cache_dir() / "adapters") / name


def metric_info(name: str) -> tuple[str, bool]:
    """``(metric name, higher is better)`` of a suite adapter."""
    return ("perplexity", False) if name == LM_ADAPTER else ("exact_match", True)


def evaluate_adapter_metric(model, tokenizer, name: str, n: int = EVAL_EXAMPLES, progress: bool = False,
                            seed: int = 12345) -> float:
    """The adapter's metric on ``model`` as it stands (apply the adapter first): exact match on
    ``n`` held-out examples drawn with ``seed`` (disjoint from training's), or WikiText-2 test perplexity for the
    language-modelling adapter (``seed`` unused)."""
    if name == LM_ADAPTER:
        windows = token_windows(tokenizer, read_wikitext("test"), LM_EVAL_WINDOWS[1], LM_EVAL_WINDOWS[0])
        return perplexity(model, windows, progress=progress)
    return exact_match(model, tokenizer, get_task(name), n=n, seed=seed, progress=progress)


def default_config(name: str) -> TrainConfig:
    """The suite's training settings for adapter ``name`` (the LM adapter trains on 256-token windows)."""
    if name == LM_ADAPTER:
        return TrainConfig(steps=60, batch_size=4, lr=5e-4, seq_len=256)
    return TrainConfig(steps=120, batch_size=16, lr=1e-3)


def train_suite_adapter(model, tokenizer, name: str, cfg: TrainConfig | None = None, root: Path | None = None,
                        progress: bool = True, eval_examples: int = EVAL_EXAMPLES) -> tuple[LoraAdapter, dict]:
    """Train one suite adapter, measure its metric before and after, save it; returns (adapter, record)."""
    cfg = cfg or default_config(name)
    before = evaluate_adapter_metric(model, tokenizer, name, eval_examples)
    t0 = time.perf_counter()
    if name == LM_ADAPTER:
        adapter = train_lm_adapter(model, tokenizer, read_wikitext("valid"), cfg, progress=progress, name=name)
    else:
        adapter = train_task_adapter(model, tokenizer, get_task(name), cfg, progress=progress)
    seconds = time.perf_counter() - t0
    with apply_adapter(model, adapter):
        after = evaluate_adapter_metric(model, tokenizer, name, eval_examples)
    metric, higher = metric_info(name)
    record = {"adapter": name, "metric_name": metric, "higher_is_better": higher, "base": before,
              "trained": after, "train_seconds": round(seconds, 1), "config": asdict(cfg),
              "description": adapter.metadata.get("lorakern_description", "")}
    out = adapter_dir(name, root)
    save_peft_adapter(adapter, out)
    (out / "lorakern_train.json").write_text(json.dumps(record, indent=2))
    return adapter, record


def ensure_suite(model, tokenizer, names=None, root: Path | None = None, retrain: bool = False,
                 progress: bool = True) -> dict[str, dict]:
    """Train every suite adapter not yet cached (all of them with ``retrain``); returns the records."""
    records = {}
    for name in names or suite_names():
        d = adapter_dir(name, root)
        rec_path = d / "lorakern_train.json"
        if not retrain and rec_path.is_file():
            load_peft_adapter(d)  # validates
            records[name] = json.loads(rec_path.read_text())
            continue
        _, records[name] = train_suite_adapter(model, tokenizer, name, root=root, progress=progress)
        if progress:
            r = records[name]
            print(f"{name}: {r['metric_name']} {r['base']:.3f} -> {r['trained']:.3f} "
                  f"({r['train_seconds']:.0f} s)", flush=True)
    return records
