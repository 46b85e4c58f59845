"""WikiText-2 (word level) from the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["wikitext_path", "read_wikitext"]


def wikitext_path(split: str = "test") -> Path:
    """Path of WikiText-2 ``test.txt`` or ``valid.txt``.

    Looked up in ``$LORAKERN_DATA`` (a folder holding ``wikitext-2/``), then in
    ``shared/data`` next to or above the repository and the working directory.
    """
    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    roots = []
    if os.environ.get("LORAKERN_DATA"):
        roots.append(Path(os.environ["LORAKERN_DATA"]))
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        for up in (base, *base.parents):
            roots += [up / "shared" / "data", up / "data"]
    for r in roots:
        p = r / "wikitext-2" / f"{split}.txt"
        if p.is_file():
            return p
    raise FileNotFoundError("WikiText-2 not found: set LORAKERN_DATA to the folder that holds wikitext-2/")


def read_wikitext(split: str = "test", max_chars: int | None = None) -> str:
    """The text of a WikiText-2 split (optionally only its first ``max_chars``)."""
    text = wikitext_path(split).read_text(encoding="utf-8")
    return text[:max_chars] if max_chars else text
