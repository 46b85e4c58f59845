"""Data shipped with lorakern (WikiText-2 validation and test text; see wikitext-2/README.md) and its
readers."""
from .wikitext import PACKAGED_SHA256, read_wikitext, token_windows, wikitext_path

__all__ = ["PACKAGED_SHA256", "read_wikitext", "token_windows", "wikitext_path"]
