"""Where lorakern keeps what it builds once and reuses: converted models, trained suite adapters,
ICM-LoRA generators."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """lorakern's cache folder: ``$LORAKERN_CACHE``, or ``~/.cache/lorakern`` (not created here)."""
    return Path(os.environ.get("LORAKERN_CACHE", Path.home() / ".cache" / "lorakern"))
