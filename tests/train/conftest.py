"""Fixtures shared by the training-program tests."""

import pytest

from train.data import synthetic
from train.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A synthetic TOFU-format folder with three forget tasks (the default writes one), for
  task selection and the continual-unlearning layout."""
  return synthetic.write_synthetic_tofu(tmp_path_factory.mktemp("synthetic"), num_tasks=3)


@pytest.fixture(scope="module")
def trained_tokenizer(data_dir):
  """A small BPE tokenizer trained offline on ``data_dir`` with the Phi template."""
  return tokenizer_lib.train_tokenizer(
    tokenizer_lib.tofu_corpus_texts(data_dir, "phi"), vocab_size=1024
  )
