"""A run's data as its config describes it: the data folder and tokenizer, the splits, and
the forget and retain batch streams with the IDK answers and mismatch rows the losses need.

Two settings follow the DualOptim+ authors' TOFU protocol: ``data.retain_other_tasks`` (the
retain set also holds the forget file's other tasks) and ``loss.mask`` (false: the forget
rows score their question tokens too). Their ``mask=false`` labels a whole padded row, so
the EOS tokens padding it to 500 are scored as well; here padding is never scored."""

from __future__ import annotations

import os
import pathlib
import sys
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
  process). Over-long rows follow ``data.overlong`` (:func:`refuse_overlong`,
  :func:`warn_truncated`)."""
  if config.data.overlong == "refuse":
    refuse_overlong(config, splits, tokenizer)
  batching = data_lib.BatchingConfig(batch_size or config.data.batch_size, seed=config.data.seed)
  has_idk = bool(splits.idk_answers)
  streams = data_lib.make_batch_streams(
    splits,
    tokenizer,
    data_lib.TokenizationConfig(
      template=config.data.template,
      max_length=config.data.max_length,
      pad_to_max_length=True,
      warn_truncated=False,
    ),
    batching,
    forget_with_idk=losses.needs_idk_batch(loss_config, "forget") and has_idk,
    retain_with_idk=losses.needs_idk_batch(loss_config, "retain") and has_idk,
    rows=distributed.host_rows(batching.batch_size),
    retain_with_mismatch=losses.needs_mismatch_batch(loss_config),
    score_forget_prompt=not config.loss.mask,
  )
  warn_truncated(config, splits, *(stream.dataset for stream in streams))
  return streams


class OverlongError(ValueError):
  """A training sequence is longer than ``data.max_length`` with ``data.overlong=refuse``."""


def item_file(splits: data_lib.TofuSplits, forget_set: bool, index: int) -> str:
  """The file item ``index`` of the forget (or retain) set was read from: retain rows past
  the retain split's own come from the forget file (``data.retain_other_tasks``)."""
  forget_file = os.path.join(splits.data_dir, f"{splits.forget_split}.json")
  if forget_set or index >= len(splits.retain) - splits.num_retain_added:
    return forget_file
  return os.path.join(splits.data_dir, f"{splits.retain_split}.json")


def refuse_overlong(config: RunConfig, splits: data_lib.TofuSplits, tokenizer: Any) -> None:
  """With ``data.overlong=refuse``: raises :class:`OverlongError` naming the file, line and
  length of the first forget or retain sequence longer than ``data.max_length``.

  The sets are tokenized uncut for this (a prompt alone may pass ``max_length``, which a
  cut encoding cannot even represent)."""
  uncut = data_lib.TokenizationConfig(template=config.data.template, warn_truncated=False)
  limit = config.data.max_length
  for name, items in (("forget", splits.forget), ("retain", splits.retain)):
    dataset = data_lib.QADataset(items, tokenizer, uncut)
    lengths = [len(dataset.encoded(i).input_ids) for i in range(len(dataset))]
    over = [i for i, length in enumerate(lengths) if length > limit]
    if over:
      first = over[0]
      raise OverlongError(
        f"{item_file(splits, name == 'forget', first)} line {items[first].line_number}: the "
        f"{name} sequence has {lengths[first]} tokens, more than data.max_length={limit} "
        f"({len(over)} of {len(items)} {name} rows are; data.overlong=truncate cuts them)"
      )


def warn_truncated(
  config: RunConfig,
  splits: data_lib.TofuSplits,
  forget: data_lib.QADataset,
  retain: data_lib.QADataset,
) -> None:
  """One warning line per set with sequences cut to ``data.max_length``: its file and count.

  A cut sequence loses answer tokens (or its end token) in the loss without a trace; a
  user who sized ``max_length`` to the data wants to know."""
  if not distributed.is_primary():
    return
  for name, dataset in (("forget", forget), ("retain", retain)):
    if dataset.num_truncated:
      path = item_file(splits, name == "forget", dataset.truncated_indices[0])
      print(
        f"warning: {dataset.num_truncated} of {len(dataset)} {name} sequences ({path}) are "
        f"longer than data.max_length={config.data.max_length} and lose answer tokens",
        file=sys.stderr,
      )
