"""WikiText-2 ships with lorakern: the fallback order and the integrity check."""
import gzip
import hashlib

import pytest

from lorakern.data import wikitext as data
from lorakern.data.wikitext import PACKAGED_SHA256, read_wikitext, wikitext_path


def test_packaged_copy_is_the_default(monkeypatch):
    monkeypatch.delenv("LORAKERN_DATA", raising=False)
    for split in ("test", "valid"):
        p = wikitext_path(split)
        assert p.parent == data.PACKAGED and p.name == f"{split}.txt.gz"
        text = read_wikitext(split)
        assert hashlib.sha256(text.encode()).hexdigest() == PACKAGED_SHA256[split]
        assert text.startswith(" \n = ") and len(text) > 1_000_000
    assert read_wikitext("test", max_chars=50) == read_wikitext("test")[:50]


def test_lorakern_data_overrides(monkeypatch, tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text("plain test text")
    (tmp_path / "wikitext-2" / "valid.txt.gz").write_bytes(gzip.compress(b"gzipped valid text"))
    monkeypatch.setenv("LORAKERN_DATA", str(tmp_path))
    assert read_wikitext("test") == "plain test text"
    assert read_wikitext("valid") == "gzipped valid text"
    monkeypatch.setenv("LORAKERN_DATA", str(tmp_path / "elsewhere"))  # set but wrong: an error, no silent fallback
    with pytest.raises(FileNotFoundError, match="LORAKERN_DATA"):
        read_wikitext("test")
    with pytest.raises(ValueError, match="split"):
        wikitext_path("train")


def test_damaged_package_copy_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAKERN_DATA", raising=False)
    (tmp_path / "test.txt.gz").write_bytes(gzip.compress(b"not the text"))
    monkeypatch.setattr(data, "PACKAGED", tmp_path)
    with pytest.raises(ValueError, match="damaged"):
        read_wikitext("test")
