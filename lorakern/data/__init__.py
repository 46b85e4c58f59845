"""Data shipped with lorakern (WikiText-2 validation and test text; see wikitext-2/README.md)."""
