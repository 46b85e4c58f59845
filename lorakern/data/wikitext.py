"""WikiText-2 (word level, raw): the validation and test text every lorakern evaluation reads.

The text ships with lorakern (``lorakern/data/wikitext-2/*.txt.gz``, CC BY-SA 3.0, see the README
there), so nothing outside the clone is needed. ``$LORAKERN_DATA`` overrides it: a folder holding
``wikitext-2/{test,valid}.txt`` (or ``.txt.gz``) is read instead.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

__all__ = ["PACKAGED_SHA256", "read_wikitext", "token_windows", "wikitext_path"]

PACKAGED = Path(__file__).resolve().parent / "wikitext-2"
#: sha256 of the uncompressed packaged text (checked on every read of the packaged copy)
PACKAGED_SHA256 = {"test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                   "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"}


def wikitext_path(split: str = "test") -> Path:
    """Path of WikiText-2 ``test`` or ``valid`` text (``.txt`` or ``.txt.gz``).

    Order: ``$LORAKERN_DATA/wikitext-2/`` when the variable is set (then it must hold the split:
    a set but wrong override is an error, not a silent fallback), else the copy in the package.

    Raises:
        ValueError: an unknown split.
        FileNotFoundError: ``$LORAKERN_DATA`` is set but lacks the split, or the package copy is missing.
    """
    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    env = os.environ.get("LORAKERN_DATA")
    roots = [(Path(env) / "wikitext-2", "$LORAKERN_DATA")] if env else [(PACKAGED, "the lorakern package")]
    for root, what in roots:
        for name in (f"{split}.txt", f"{split}.txt.gz"):
            if (root / name).is_file():
                return root / name
        raise FileNotFoundError(f"WikiText-2 {split} text not found in {root} ({what}): expected {split}.txt or "
                                f"{split}.txt.gz there")
    raise AssertionError("unreachable")


def read_wikitext(split: str = "test", max_chars: int | None = None) -> str:
    """The text of a WikiText-2 split (optionally only its first ``max_chars``).

    Raises:
        ValueError: the packaged copy does not match its recorded sha256 (a damaged install).
    """
    p = wikitext_path(split)
    data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    if p.parent == PACKAGED and hashlib.sha256(data).hexdigest() != PACKAGED_SHA256[split]:
        raise ValueError(f"{p}: the packaged WikiText-2 {split} text is damaged (sha256 mismatch); reinstall lorakern")
    text = data.decode("utf-8")
    return text[:max_chars] if max_chars else text


def token_windows(tokenizer, text: str, window: int = 512, n_windows: int = 8) -> torch.Tensor:
    """The first ``n_windows`` non-overlapping windows of ``window`` tokens of ``text``: int64 ``[n, window]``.

    When the tokenizer puts a BOS token before the text (Gemma's does; SmolLM2's does not), every window
    starts with BOS followed by the next ``window - 1`` tokens of the text, as the first window does: a
    model trained always to see BOS first is not scored on windows that lack it (Gemma 3 270M: 60.6
    perplexity on windows 2-4 of WikiText-2 test with BOS, 167.6 without).

    Raises:
        ValueError: the text has too few tokens for the windows asked.
    """
    import torch

    # ~4 characters per token in English: tokenize only what is needed
    chars = window * n_windows * 8
    ids = tokenizer(text[:chars], return_tensors="pt").input_ids[0]
    bos = getattr(tokenizer, "bos_token_id", None)
    lead = bos is not None and ids.numel() > 0 and int(ids[0]) == bos
    need = (window - 1) * n_windows + 1 if lead else window * n_windows
    if ids.numel() < need:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < need:
        raise ValueError(f"text has {ids.numel()} tokens, {need} needed")
    if not lead:
        return ids[:need].view(n_windows, window)
    body = ids[1:need].view(n_windows, window - 1)
    return torch.cat([torch.full((n_windows, 1), bos, dtype=ids.dtype), body], dim=1)
