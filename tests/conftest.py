"""Shared test set-up: offline hubs, and where the authors' golden numbers live."""

import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
GOLDEN_DIR = SHARED / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  if not GOLDEN_DIR.is_dir():
    pytest.skip(f"golden reference data not found at {GOLDEN_DIR} (it lives beside the "
                "project in ../shared/golden and is never copied into the repository)")
  return GOLDEN_DIR
