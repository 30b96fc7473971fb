"""A run's data as its config describes it: the data folder and tokenizer, the splits, and
the forget and retain batch streams with the IDK answers and mismatch rows the losses need.

Two settings follow the DualOptim+ authors' TOFU protocol: ``data.retain_other_tasks`` (the
retain set also holds the forget file's other tasks) and ``loss.mask`` (false: the forget
rows score their question tokens too). Their ``mask=false`` labels a whole padded row, so
the EOS tokens padding it to 500 are scored as well; here padding is never scored."""

from __future__ import annotations

import pathlib
from typing import Any

from train import data as data_lib
from train import losses
from train.config import RunConfig
from train.data import synthetic
from train.data import tokenizer as tokenizer_lib
from train.runtime import distributed


def prepare_data(config: RunConfig) -> tuple[Any, str]:
  """The run's tokenizer and data folder.

  Without ``data.path`` the embedded synthetic benchmark is written to
  ``<output_dir>/data`` (by the primary process; the others wait for it at a barrier).
  Without ``model.path`` a tokenizer is trained on that folder's texts; otherwise the
  model's own tokenizer is loaded.

  Returns:
    ``(tokenizer, data_dir)``.
  """
  data_dir = config.data.path
  if data_dir is None:
    data_dir = str(pathlib.Path(config.output_dir) / "data")
    if distributed.is_primary():  # one writer; the others read it after the barrier
      synthetic.write_synthetic_tofu(data_dir, seed=config.data.seed)
    distributed.barrier("synthetic data")
  if config.model.path is not None:
    import models  # noqa: PLC0415 (the model library, only for a pretrained model)

    tokenizer = models.load_tokenizer(config.model.path)
  else:
    tokenizer = tokenizer_lib.train_tokenizer(
      tokenizer_lib.tofu_corpus_texts(data_dir, template=config.data.template)
    )
  return tokenizer, data_dir


def load_splits(config: RunConfig, data_dir: str) -> data_lib.TofuSplits:
  """The forget and retain splits that ``config.data`` names, read from ``data_dir``."""
  return data_lib.load_unlearning_data(
    data_dir,
    config.data.forget_split,
    config.data.task_id,
    retain_split=config.data.retain_split,
    retain_other_tasks=config.data.retain_other_tasks,
  )


def make_streams(
  config: RunConfig,
  splits: data_lib.TofuSplits,
  tokenizer: Any,
  loss_config: losses.LossConfig,
  batch_size: int | None = None,
) -> tuple[data_lib.BatchStream, data_lib.BatchStream]:
  """:func:`train.data.make_batch_streams` as ``config`` sets it up: its template, length,
  batch size and seed, IDK answers for each stream whose loss needs them (when the data has
  any), mismatch rows on the retain stream for LLMU, forget rows scoring their prompt with
  ``loss.mask=false``, and this process's rows of every global batch (all of them in one
  process)."""
  batching = data_lib.BatchingConfig(batch_size or config.data.batch_size, seed=config.data.seed)
  has_idk = bool(splits.idk_answers)
  return data_lib.make_batch_streams(
    splits,
    tokenizer,
    data_lib.TokenizationConfig(
      template=config.data.template, max_length=config.data.max_length, pad_to_max_length=True
    ),
    batching,
    forget_with_idk=losses.needs_idk_batch(loss_config, "forget") and has_idk,
    retain_with_idk=losses.needs_idk_batch(loss_config, "retain") and has_idk,
    rows=distributed.host_rows(batching.batch_size),
    retain_with_mismatch=losses.needs_mismatch_batch(loss_config),
    score_forget_prompt=not config.loss.mask,
  )
