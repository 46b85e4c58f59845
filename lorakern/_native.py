"""Lazy access to the compiled extension ``lorakern._C``.

Importing lorakern never fails because the extension is missing: the first call
that needs it raises :class:`NativeLibraryError` with the reason and the fix.
"""
from __future__ import annotations

import importlib
import os

from .formats.bank import BankView, SlotKind, SlotRow
from .formats.lora import LoraParts, LoraPartView

__all__ = ["NativeLibraryError", "native", "available_isas", "detected_isa", "active_isa", "set_isa"]

_ISAS = ("generic", "avx2", "avx512", "amx")


class NativeLibraryError(RuntimeError):
    """The C++ extension could not be loaded or refused a request."""


_lib = None
_load_error: Exception | None = None


def native():
    """Return the loaded ``lorakern._C`` module, loading it on first use."""
    global _lib, _load_error
    if _lib is not None:
        return _lib
    if _load_error is None:
        try:
            _lib = importlib.import_module("lorakern._C")
        except ImportError as e:  # pragma: no cover - depends on the build
            _load_error = e
    if _lib is None:
        raise NativeLibraryError(
            f"lorakern's C++ extension (lorakern._C) is not available: {_load_error}. "
            "Build it with `pip install -e .` (needs cmake, ninja and a C++17 compiler)."
        )
    _check_records(_lib)
    _check_env_isa(_lib)
    return _lib


def _check_records(lib) -> None:
    """The records that cross into C++ must name the same fields in the same order on both sides
    (``lorakern.formats`` here, ``RECORDS`` exported by csrc/python/bindings.cpp from lorakern.h)."""
    ours = {"BankView": BankView._fields, "SlotRow": SlotRow._fields, "LoraPartView": LoraPartView._fields,
            "LoraParts": LoraParts._fields, "SlotKind": tuple((k.name, int(k)) for k in SlotKind)}
    theirs = {k: tuple(tuple(x) if isinstance(x, tuple) else x for x in v)
              for k, v in getattr(lib, "RECORDS", {}).items()}
    if ours != theirs:
        bad = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        global _lib
        _lib = None
        raise NativeLibraryError(f"lorakern._C and the Python package disagree on the records {bad}: the extension "
                                 "is stale; rebuild it with `pip install -e .`")


def _check_env_isa(lib) -> None:
    want = os.environ.get("LORAKERN_ISA", "").strip().lower()
    if not want:
        return
    if want not in _ISAS:
        raise NativeLibraryError(f"LORAKERN_ISA={want!r} is not one of {', '.join(_ISAS)}")
    if _ISAS.index(want) > _ISAS.index(lib.detected_isa()):
        raise NativeLibraryError(
            f"LORAKERN_ISA={want!r} but this machine (its CPU, OS permissions and this build) supports at most "
            f"{lib.detected_isa()!r}"
        )
    lib.set_isa(want)


def detected_isa() -> str:
    """Best CPU kernel path this machine supports: 'generic', 'avx2', 'avx512' or 'amx' (the AVX-512
    kernels with the many-row GEMM on AMX-INT8 tiles)."""
    return native().detected_isa()


def active_isa() -> str:
    """CPU kernel path in use (the detected one unless forced)."""
    return native().active_isa()


def available_isas() -> list[str]:
    """Every CPU kernel path this machine can run, slowest first."""
    best = _ISAS.index(detected_isa())
    return list(_ISAS[: best + 1])


def set_isa(name: str) -> None:
    """Force a CPU kernel path ('generic', 'avx2', 'avx512', 'amx'); raises if unsupported."""
    if name not in _ISAS:
        raise ValueError(f"unknown ISA {name!r}; expected one of {', '.join(_ISAS)}")
    try:
        native().set_isa(name)
    except RuntimeError as e:
        raise NativeLibraryError(str(e)) from None
