"""The forget and retain batch streams of a run, as the configured losses need them."""

from __future__ import annotations

from typing import Any

from train import data as data_lib
from train import losses
from train.config import RunConfig
from train.runtime import distributed


def make_streams(
  config: RunConfig,
  splits: data_lib.TofuSplits,
  tokenizer: Any,
  loss_config: losses.LossConfig,
  batch_size: int | None = None,
):
  """Forget and retain batch streams with the IDK answers the losses need."""
  tokenization = data_lib.TokenizationConfig(
    template=config.data.template, max_length=config.data.max_length, pad_to_max_length=True
  )
  batching = data_lib.BatchingConfig(batch_size or config.data.batch_size, seed=config.data.seed)
  # Each process collates only its rows of every global batch (all of them in one process).
  rows = distributed.host_rows(batching.batch_size)
  idk = tuple(splits.idk_answers)
  forget = data_lib.QADataset(splits.forget, tokenizer, tokenization, idk_answers=idk)
  retain = data_lib.QADataset(splits.retain, tokenizer, tokenization, idk_answers=idk)
  return (
    data_lib.BatchStream(
      forget,
      batching,
      stream_id=data_lib.FORGET,
      rows=rows,
      with_idk=losses.needs_idk_batch(loss_config, "forget") and bool(idk),
    ),
    data_lib.BatchStream(
      retain,
      batching,
      stream_id=data_lib.RETAIN,
      rows=rows,
      with_idk=losses.needs_idk_batch(loss_config, "retain") and bool(idk),
    ),
  )
