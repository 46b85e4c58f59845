"""Evaluation helpers: data, perplexity, decode speed."""
from ...data import read_wikitext, wikitext_path
from .perplexity import perplexity, token_windows
from .speed import DecodeSpeed, decode_speed, decode_tokens_per_second

__all__ = ["DecodeSpeed", "decode_speed", "decode_tokens_per_second", "perplexity", "read_wikitext", "token_windows", "wikitext_path"]
