"""Batch streams: a dataset walked in seeded, epoch-wise reshuffled batches forever, and the
forget and retain streams of a run."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
from transformers import PreTrainedTokenizerBase

from dualoptax import FORGET, RETAIN
from train.data.batches import QABatch, QADataset, TokenizationConfig
from train.data.splits import TofuSplits


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
  """How a stream batches a dataset.

  Attributes:
    batch_size: Rows per batch.
    seed: Seeds the per-epoch shuffles and IDK answer choices (>= 0).
    shuffle: Reshuffle every epoch; without it every epoch is in item order.
    drop_last: Skip an epoch's last, incomplete batch (fixed batch shape); otherwise
      yield it, smaller.
  """

  batch_size: int
  seed: int = 0
  shuffle: bool = True
  drop_last: bool = True

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.seed < 0:
      raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclasses.dataclass(frozen=True)
class StreamPosition:
  """Where a :class:`BatchStream` is: the next batch is batch ``offset`` of epoch ``epoch``."""

  epoch: int = 0
  offset: int = 0


class BatchStream:
  """Endless batches over a dataset, reshuffled each epoch, restartable from a position.

  Epoch ``e`` visits the items in the order of a permutation seeded by
  ``(seed, stream_id, e)``; when an epoch runs out the stream moves on to the next one.
  A batch is a pure function of (config, stream_id, epoch, offset), which is what makes
  :attr:`position` a complete description of the stream's state.
  """

  def __init__(
    self,
    dataset: QADataset,
    config: BatchingConfig,
    *,
    stream_id: int = 0,
    with_idk: bool = False,
    position: StreamPosition = StreamPosition(),
    rows: slice | None = None,
    with_mismatch: bool = False,
  ):
    """Creates the stream.

    Args:
      dataset: What to batch.
      config: Batch size, seed, shuffling.
      stream_id: Distinguishes the shuffles of streams sharing a seed (use
        :data:`FORGET` / :data:`RETAIN`).
      with_idk: Add IDK answers to each batch (:attr:`QABatch.idk`), a seeded choice per
        row and epoch (TOFU's IDK loss draws one at random each time an item is used).
      position: Where to start.
      rows: Yield only these rows of each batch: a host's share in a multi-process run
        (see ``train.runtime.distributed.host_rows``). Every host walks the same global order.
      with_mismatch: Add mismatch rows to each batch (:attr:`QABatch.mismatch`): one of the
        dataset's ``mismatch_questions`` with the row's answer, a seeded choice per item and
        epoch (the authors' LLMU draws a random retain answer for each forget question).

    Raises:
      ValueError: ``drop_last`` with fewer items than ``batch_size`` (no batch at all),
        ``with_idk`` without IDK answers (``with_mismatch`` without mismatch questions) in
        ``dataset``, or a bad ``position``.
    """
    if stream_id < 0:
      raise ValueError(f"stream_id must be >= 0, got {stream_id}")
    if with_idk and not dataset.idk_answers:
      raise ValueError(
        "with_idk=True but the dataset has no IDK answers (no idontknow.jsonl found?)"
      )
    if with_mismatch and not dataset.mismatch_questions:
      raise ValueError("with_mismatch=True but the dataset has no mismatch questions")
    if config.drop_last and len(dataset) < config.batch_size:
      raise ValueError(
        f"the dataset has {len(dataset)} items, fewer than batch_size={config.batch_size}, so "
        "drop_last=True leaves no batch; lower batch_size or set drop_last=False"
      )
    self.dataset = dataset
    self.config = config
    self.stream_id = stream_id
    self.with_idk = with_idk
    self.with_mismatch = with_mismatch
    if rows is not None and (
      rows.step not in (None, 1)
      or not 0 <= (rows.start or 0) < (rows.stop or 0) <= config.batch_size
    ):
      raise ValueError(
        f"rows={rows} is not a contiguous, non-empty range of the "
        f"{config.batch_size} rows of a batch"
      )
    self.rows = rows
    n, b = len(dataset), config.batch_size
    self.batches_per_epoch = n // b if config.drop_last else math.ceil(n / b)
    self._cached_epoch: int | None = None
    self._cached_order = np.arange(0)
    self._cached_idk = np.arange(0)
    self._cached_mismatch = np.arange(0)
    self._position = StreamPosition()
    self.position = position

  @property
  def position(self) -> StreamPosition:
    """The position of the next batch."""
    return self._position

  @position.setter
  def position(self, position: StreamPosition) -> None:
    self._check_position(position)
    self._position = position

  def _check_position(self, position: StreamPosition) -> None:
    if position.epoch < 0 or not 0 <= position.offset < self.batches_per_epoch:
      raise ValueError(
        f"bad stream position {position}: need epoch >= 0 and 0 <= offset < "
        f"{self.batches_per_epoch} (batches per epoch)"
      )

  def _rng(self, epoch: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([self.config.seed, self.stream_id, epoch, purpose])

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The item order of ``epoch``."""
    self._cache_epoch(epoch)
    return self._cached_order

  def _cache_epoch(self, epoch: int) -> None:
    if self._cached_epoch == epoch:
      return
    n = len(self.dataset)
    self._cached_order = self._rng(epoch, 0).permutation(n) if self.config.shuffle else np.arange(n)
    if self.with_idk:
      self._cached_idk = self._rng(epoch, 1).integers(len(self.dataset.idk_answers), size=n)
    if self.with_mismatch:
      questions = len(self.dataset.mismatch_questions)
      self._cached_mismatch = self._rng(epoch, 2).integers(questions, size=n)
    self._cached_epoch = epoch

  def batch_at(self, position: StreamPosition) -> QABatch:
    """The batch at ``position``, without moving the stream.

    Raises:
      ValueError: ``position`` is outside the stream.
    """
    self._check_position(position)
    self._cache_epoch(position.epoch)
    b = self.config.batch_size
    indices = self._cached_order[position.offset * b : (position.offset + 1) * b]
    # IDK choices belong to items (not rows), so an item keeps its IDK answer all epoch.
    idk_choices = self._cached_idk[indices] if self.with_idk else None
    mismatch_choices = self._cached_mismatch[indices] if self.with_mismatch else None
    return self.dataset.batch(
      indices, idk_choices, position.epoch, self.rows, mismatch_choices=mismatch_choices
    )

  def __iter__(self) -> Iterator[QABatch]:
    return self

  def __next__(self) -> QABatch:
    batch = self.batch_at(self._position)
    epoch, offset = self._position.epoch, self._position.offset + 1
    # Move to the next epoch as soon as this one is used up, so a saved position always
    # names a batch that exists.
    self._position = (
      StreamPosition(epoch + 1, 0)
      if offset == self.batches_per_epoch
      else StreamPosition(epoch, offset)
    )
    return batch


def make_batch_streams(
  splits: TofuSplits,
  tokenizer: PreTrainedTokenizerBase,
  tokenization: TokenizationConfig,
  forget_batching: BatchingConfig,
  retain_batching: BatchingConfig | None = None,
  *,
  forget_with_idk: bool = True,
  retain_with_idk: bool = False,
  rows: slice | None = None,
  retain_with_mismatch: bool = False,
  score_forget_prompt: bool = False,
) -> tuple[BatchStream, BatchStream]:
  """The forget and retain streams of a run.

  Args:
    splits: From :func:`~train.data.load_unlearning_data`.
    tokenizer: The model's tokenizer.
    tokenization: Template, lengths and padding.
    forget_batching: Batch size and seed of the forget stream.
    retain_batching: The same for the retain stream; ``None`` uses ``forget_batching``
      (the two are still shuffled differently: their ``stream_id`` differ).
    forget_with_idk: Give forget batches IDK answers (for the IDK, DPO and AP forget
      losses); needs ``splits.idk_answers``.
    retain_with_idk: The same for retain batches (for a retain loss on IDK answers).
    rows: Collate only these rows of every batch of both streams: a host's share in a
      multi-process run (``train.runtime.distributed.host_rows``); ``None`` keeps all.
    retain_with_mismatch: Give retain batches mismatch rows, a forget question with each
      row's retain answer (the LLMU retain loss).
    score_forget_prompt: Forget rows score their prompt tokens too (``loss.mask=false``);
      retain rows never do.

  Returns:
    ``(forget_stream, retain_stream)``, with ``stream_id`` :data:`FORGET` and :data:`RETAIN`.

  Raises:
    ValueError: IDK answers requested but ``splits`` has none, or bad batching or rows.
  """
  idk = splits.idk_answers
  forget = QADataset(
    splits.forget, tokenizer, tokenization, idk_answers=idk, score_prompt=score_forget_prompt
  )
  questions = tuple(item.question for item in splits.forget) if retain_with_mismatch else ()
  retain = QADataset(
    splits.retain, tokenizer, tokenization, idk_answers=idk, mismatch_questions=questions
  )
  return (
    BatchStream(forget, forget_batching, stream_id=FORGET, with_idk=forget_with_idk, rows=rows),
    BatchStream(
      retain,
      retain_batching or forget_batching,
      stream_id=RETAIN,
      with_idk=retain_with_idk,
      rows=rows,
      with_mismatch=retain_with_mismatch,
    ),
  )
