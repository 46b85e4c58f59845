"""Data shipped with lorakern (WikiText-2 validation and test text; see wikitext-2/README.md) and its
readers."""
from .cache import cache_dir
from .wikitext import PACKAGED_SHA256, read_wikitext, token_windows, wikitext_path

__all__ = ["PACKAGED_SHA256", "cache_dir", "read_wikitext", "token_windows", "wikitext_path"]
