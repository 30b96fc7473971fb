"""Training data for unlearning: TOFU-format splits, tokenized batches and the samplers.

Three layers, each usable alone:

1. **Splits.** :func:`load_unlearning_data` reads a TOFU-format folder (the real TOFU copy
   or :mod:`train.synthetic`'s output): the forget split (one ``task_id`` of it), the
   retain split that complements it, and the IDK answers.
2. **Tokenized batches.** :class:`QADataset` formats each question with a model family's
   :class:`~train.evaluation.prompting.PromptTemplate`, tokenizes it with its answer
   (:func:`~train.evaluation.prompting.encode_answer`) and collates rows into a
   :class:`TokenizedQA`: right-padded numpy ``int32`` arrays whose ``labels`` are ``-100``
   on prompt and padding tokens. A :class:`QABatch` may carry the same questions with IDK
   answers (for the IDK, DPO and AP losses), row by row.
3. **Samplers.** :class:`BatchStream` walks a dataset in seeded, epoch-wise reshuffled
   batches forever. :class:`AlternatingSampler` draws ``F_f`` forget batches then ``F_r``
   retain batches, the optimizer's schedule (step ``s`` is a forget step iff
   ``s mod (F_f + F_r) < F_f``); :class:`JointSampler` draws one of each per step. Both
   expose a small :class:`SamplerState` that restores them exactly, for resuming.

Everything is deterministic given the seed: epoch ``e`` of a stream is the permutation of
``numpy.random.default_rng([seed, stream_id, e, 0])``, so no random state needs saving.

Label convention (Hugging Face's, and :func:`train.evaluation.scoring.masked_mean_nll`'s):
``labels[b, t]`` is the token at position ``t`` (not shifted); the loss of token ``t`` uses
the logits at position ``t - 1``. ``labels[:, 0]`` is always ``-100`` (the BOS / first
prompt token is never predicted).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from train import tofu
from train.evaluation.prompting import EncodedAnswer, PromptTemplate, encode_answer, get_prompt_template

FORGET, RETAIN = 0, 1
"""Objective ids; the same values as :data:`dualoptax.FORGET` / :data:`dualoptax.RETAIN`
(repeated here so the data pipeline does not import JAX; a test checks they agree)."""

IGNORE_INDEX = -100
"""The label of tokens that are not scored (prompt and padding)."""

IDK_FILE_NAME = "idontknow.jsonl"
FALLBACK_RETAIN_SPLIT = "retain90"
_FORGET_SPLIT_PATTERN = re.compile(r"forget(\d{2})")


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TofuSplits:
  """The training data of one unlearning run.

  Attributes:
    forget: The items to forget (question, answer; one ``task_id``).
    retain: The items to keep, without any question of ``forget``.
    idk_answers: Refusal answers for the IDK / DPO / AP losses; empty if no file was found.
    data_dir: The folder read.
    forget_split: E.g. ``"forget01"``.
    retain_split: The retain file used, e.g. ``"retain90"``.
    task_id: The forget task selected; ``None`` for every row of the forget file.
    num_retain_removed: Retain items dropped because their question is in ``forget``.
  """

  forget: tuple[tofu.TofuItem, ...]
  retain: tuple[tofu.TofuItem, ...]
  idk_answers: tuple[str, ...]
  data_dir: str
  forget_split: str
  retain_split: str
  task_id: int | None
  num_retain_removed: int = 0


def complement_retain_split(forget_split: str) -> str:
  """The retain split that complements a forget split: ``forget01`` -> ``retain99``.

  Raises:
    ValueError: ``forget_split`` is not ``forgetXX`` with two digits in [01, 99].
  """
  match = _FORGET_SPLIT_PATTERN.fullmatch(forget_split)
  if match is None or not 1 <= int(match.group(1)) <= 99:
    raise ValueError(f"forget_split must look like 'forget01' (two digits, 01..99), got {forget_split!r}")
  return f"retain{100 - int(match.group(1)):02d}"


def resolve_retain_split(data_dir: str | os.PathLike[str], forget_split: str, retain_split: str | None = None) -> str:
  """Which retain split to train on.

  TOFU's authors define ``retain{100-XX}`` as the complement of ``forgetXX``, but the
  commonly shared copy (and ``../shared/data/tofu``) has only retain10/50/90. So: the
  complement when its file exists, else ``retain90`` (TOFU's complement of its largest
  forget split, disjoint from forget01 / forget05 / forget10 task 1).

  Args:
    data_dir: The TOFU-format folder.
    forget_split: E.g. ``"forget01"``.
    retain_split: An explicit choice, returned if its file exists.

  Raises:
    FileNotFoundError: The chosen file, or both the complement and ``retain90``, are
      missing; the message lists the retain files present.
    ValueError: ``forget_split`` is malformed.
  """
  data_dir = os.fspath(data_dir)
  complement = complement_retain_split(forget_split)
  candidates = [retain_split] if retain_split is not None else [complement, FALLBACK_RETAIN_SPLIT]
  for candidate in candidates:
    if os.path.isfile(os.path.join(data_dir, f"{candidate}.json")):
      return candidate
  present = sorted(f for f in os.listdir(data_dir) if f.startswith("retain")) if os.path.isdir(data_dir) else []
  raise FileNotFoundError(f"no retain split {' or '.join(map(repr, candidates))} in {data_dir!r} "
                          f"(for forget_split={forget_split!r}); retain files present: {present}")


def find_idk_file(data_dir: str | os.PathLike[str]) -> str | None:
  """``idontknow.jsonl`` in ``data_dir`` or its parent (the layout of ``../shared/data``)."""
  data_dir = os.fspath(data_dir)
  for folder in (data_dir, os.path.dirname(os.path.abspath(data_dir))):
    path = os.path.join(folder, IDK_FILE_NAME)
    if os.path.isfile(path):
      return path
  return None


def load_idk_answers(path: str | os.PathLike[str]) -> tuple[str, ...]:
  """The refusal answers of an IDK file: one plain-text answer per non-blank line.

  Raises:
    ValueError: The file has no answer.
  """
  with open(path, encoding="utf-8") as f:
    answers = tuple(line.strip() for line in f if line.strip())
  if not answers:
    raise ValueError(f"{os.fspath(path)}: no IDK answer (expected one plain-text answer per line)")
  return answers


def load_unlearning_data(
    data_dir: str | os.PathLike[str],
    forget_split: str = "forget01",
    task_id: int | None = 1,
    *,
    retain_split: str | None = None,
    idk_path: str | os.PathLike[str] | None = None,
    exclude_forget_from_retain: bool = True,
) -> TofuSplits:
  """Loads the forget and retain items and the IDK answers of a TOFU-format folder.

  Args:
    data_dir: Folder with ``<forget_split>.json`` and a retain split (see
      :func:`resolve_retain_split`).
    forget_split: E.g. ``"forget01"``, ``"forget05"``, ``"forget10"``.
    task_id: Which of the file's disjoint forget sets (continual unlearning); 1 is the
      standard one and the evaluator's default. ``None`` takes every row (all tasks).
    retain_split: Overrides the retain split (e.g. ``"retain50"``).
    idk_path: The IDK answers; by default ``idontknow.jsonl`` in ``data_dir`` or its
      parent, and none if absent.
    exclude_forget_from_retain: Drop retain items whose question is a forget question.
      TOFU's retain90 contains the forget sets of every task but the first (e.g. forget10
      task 2), so without this a later task would be both forgotten and retained.

  Raises:
    FileNotFoundError: A split file is missing.
    tofu.TofuFormatError: A file is malformed or has no row with ``task_id`` (a forget file
      without a ``task_id`` column needs ``task_id=None``).
    ValueError: The retain set is empty after removing forget questions.
  """
  data_dir = os.fspath(data_dir)
  retain_split = resolve_retain_split(data_dir, forget_split, retain_split)
  forget_path = os.path.join(data_dir, f"{forget_split}.json")
  if not os.path.isfile(forget_path):
    present = sorted(f for f in os.listdir(data_dir) if f.startswith("forget")) if os.path.isdir(data_dir) else []
    raise FileNotFoundError(f"no forget split {forget_split!r} ({forget_path}); forget files present: {present}")
  forget = tuple(tofu.load_tofu(forget_path, task_id=task_id))
  retain = tuple(tofu.load_tofu(os.path.join(data_dir, f"{retain_split}.json")))
  num_retain = len(retain)
  if exclude_forget_from_retain:
    forget_questions = {item.question for item in forget}
    retain = tuple(item for item in retain if item.question not in forget_questions)
    if not retain:
      raise ValueError(f"every question of {retain_split!r} is in {forget_split!r} task_id={task_id}; "
                       "choose another retain_split")
  if idk_path is None:
    idk_path = find_idk_file(data_dir)
  idk_answers = load_idk_answers(idk_path) if idk_path is not None else ()
  return TofuSplits(forget=forget, retain=retain, idk_answers=idk_answers, data_dir=data_dir,
                    forget_split=forget_split, retain_split=retain_split, task_id=task_id,
                    num_retain_removed=num_retain - len(retain))


# --------------------------------------------------------------------------------------
# Tokenized batches
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizationConfig:
  """How items become token sequences.

  Attributes:
    template: A :class:`PromptTemplate` or a preset name (``"phi"``, ``"llama2-chat"``, ...).
    max_length: Sequences longer than this lose answer tokens from the end (counted in
      :attr:`QADataset.num_truncated`); ``None`` keeps every token.
    pad_to_multiple_of: Batches are padded to the longest row rounded up to a multiple of
      this, so a jitted step compiles for a few lengths only.
    pad_to_max_length: Pad every batch to exactly ``max_length`` (one compiled shape).
    append_eos: End each answer with EOS (scored like the answer), as TOFU does.
  """

  template: str | PromptTemplate = "phi"
  max_length: int | None = None
  pad_to_multiple_of: int = 16
  pad_to_max_length: bool = False
  append_eos: bool = True

  def __post_init__(self):
    get_prompt_template(self.template)  # fails early on an unknown preset name
    if self.max_length is not None and self.max_length < 2:
      raise ValueError(f"max_length must be >= 2 (a prompt and an answer token) or None, got {self.max_length}")
    if self.pad_to_multiple_of < 1:
      raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
    if self.pad_to_max_length and self.max_length is None:
      raise ValueError("pad_to_max_length=True needs a max_length")

  def padded_length(self, longest: int) -> int:
    """The length a batch whose longest row has ``longest`` tokens is padded to."""
    if self.pad_to_max_length:
      return self.max_length
    length = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
    # Rounding up must not exceed a max_length the caller sized their model for (rows are
    # already cut to max_length, so this never cuts a row).
    return length if self.max_length is None else min(length, self.max_length)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedQA:
  """Right-padded prompt+answer token rows.

  Attributes:
    input_ids: ``[B, T]`` int32; padding is the tokenizer's pad id.
    attention_mask: ``[B, T]`` int32, 1 on real tokens, 0 on padding.
    labels: ``[B, T]`` int32, the token id on answer (and EOS) tokens, :data:`IGNORE_INDEX`
      on prompt and padding tokens; not shifted (see the module docstring).
    item_indices: ``[B]`` int32, each row's index in its :class:`QADataset`.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray
  item_indices: np.ndarray

  @property
  def loss_mask(self) -> np.ndarray:
    """``[B, T]`` bool, True on the scored (answer) tokens."""
    return self.labels != IGNORE_INDEX

  @property
  def batch_size(self) -> int:
    return self.input_ids.shape[0]

  @property
  def length(self) -> int:
    return self.input_ids.shape[1]

  def arrays(self) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask`` and ``labels``, e.g. as a jitted step's input."""
    return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


@dataclasses.dataclass(frozen=True, eq=False)
class QABatch:
  """One batch of questions, with their true answers and optionally IDK answers.

  Attributes:
    answers: The questions with their true answers.
    idk: The same questions in the same rows with IDK answers, padded to the same length
      as ``answers`` (so a loss may stack both in one forward pass); ``None`` unless the
      stream was made ``with_idk``.
    epoch: The epoch of the stream this batch came from.
  """

  answers: TokenizedQA
  idk: TokenizedQA | None = None
  epoch: int = 0


def collate(encoded: Sequence[EncodedAnswer], item_indices: Sequence[int], length: int, pad_id: int) -> TokenizedQA:
  """Right-pads encoded sequences to ``length`` and masks their prompt and padding labels.

  Raises:
    ValueError: A sequence is longer than ``length``, or the lists differ in size.
  """
  if len(encoded) != len(item_indices):
    raise ValueError(f"{len(encoded)} sequences but {len(item_indices)} item indices")
  input_ids = np.full((len(encoded), length), pad_id, np.int32)
  attention_mask = np.zeros((len(encoded), length), np.int32)
  labels = np.full((len(encoded), length), IGNORE_INDEX, np.int32)
  for row, sequence in enumerate(encoded):
    n = len(sequence.input_ids)
    if n > length:
      raise ValueError(f"row {row} has {n} tokens, more than the batch length {length}")
    input_ids[row, :n] = sequence.input_ids
    attention_mask[row, :n] = 1
    labels[row, sequence.num_prompt_tokens:n] = sequence.input_ids[sequence.num_prompt_tokens:]
  return TokenizedQA(input_ids, attention_mask, labels, np.asarray(item_indices, np.int32))


class QADataset:
  """Items with their tokenized prompt+answer sequences, ready to batch.

  True answers are tokenized once, up front; IDK versions on first use and cached.
  """

  def __init__(
      self,
      items: Sequence[tofu.TofuItem],
      tokenizer: PreTrainedTokenizerBase,
      config: TokenizationConfig = TokenizationConfig(),
      *,
      idk_answers: Sequence[str] = (),
  ):
    """Tokenizes ``items``.

    Args:
      items: The questions and answers.
      tokenizer: Any Hugging Face tokenizer (with EOS when ``config.append_eos``).
      config: Template, lengths and padding.
      idk_answers: Answers that :meth:`batch` may substitute for the true ones.

    Raises:
      ValueError: ``items`` is empty, or an item cannot be encoded (the message names it).
    """
    if not items:
      raise ValueError("a QADataset needs at least one item")
    self.items = tuple(items)
    self.tokenizer = tokenizer
    self.config = config
    self.idk_answers = tuple(idk_answers)
    self.template = get_prompt_template(config.template)
    # Padding positions are masked out everywhere, so any id works when there is no pad.
    self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    self._prompts = tuple(self.template.prompt(item.question) for item in self.items)
    self._encoded = tuple(self._encode(i, item.answer) for i, item in enumerate(self.items))
    self._encoded_idk: dict[tuple[int, int], EncodedAnswer] = {}
    self.num_truncated = sum(e.truncated for e in self._encoded)
    if self.num_truncated:
      warnings.warn(f"{self.num_truncated} of {len(self.items)} sequences are longer than "
                    f"max_length={config.max_length} and lose answer tokens", stacklevel=2)

  def __len__(self) -> int:
    return len(self.items)

  def _encode(self, index: int, answer: str) -> EncodedAnswer:
    try:
      return encode_answer(self.tokenizer, self._prompts[index], answer, append_eos=self.config.append_eos,
                           max_length=self.config.max_length)
    except ValueError as e:
      item = self.items[index]
      raise ValueError(f"item {index} (file line {item.line_number}, question {item.question[:60]!r}): {e}") from e

  def encoded(self, index: int) -> EncodedAnswer:
    """Item ``index``'s prompt + true answer tokens."""
    return self._encoded[index]

  def encoded_idk(self, index: int, idk_index: int) -> EncodedAnswer:
    """Item ``index``'s prompt + IDK answer ``idk_index`` tokens."""
    key = (index, idk_index)
    if key not in self._encoded_idk:
      self._encoded_idk[key] = self._encode(index, self.idk_answers[idk_index])
    return self._encoded_idk[key]

  def max_sequence_length(self) -> int:
    """The longest prompt + true answer, in tokens."""
    return max(len(e.input_ids) for e in self._encoded)

  def batch(self, indices: Sequence[int], idk_choices: Sequence[int] | None = None, epoch: int = 0,
            rows: slice | None = None) -> QABatch:
    """Collates items ``indices`` (with IDK answer ``idk_choices[j]`` for row ``j`` if given).

    Args:
      indices: The items of the whole (global) batch, one per row.
      idk_choices: The IDK answer of each row, or None.
      epoch: Recorded on the batch.
      rows: Collate only these rows (a host's share of a global batch). The padded length
        is still that of the whole batch, so every host's rows fit one global array.

    Raises:
      ValueError: ``indices`` is empty, ``idk_choices`` has another length, or the
        dataset has no IDK answers.
    """
    indices = [int(i) for i in indices]
    if not indices:
      raise ValueError("a batch needs at least one index")
    encoded = [self._encoded[i] for i in indices]
    encoded_idk = None
    if idk_choices is not None:
      if not self.idk_answers:
        raise ValueError("IDK answers were requested but the dataset has none (pass idk_answers)")
      if len(idk_choices) != len(indices):
        raise ValueError(f"{len(idk_choices)} IDK choices for {len(indices)} rows")
      encoded_idk = [self.encoded_idk(i, int(k)) for i, k in zip(indices, idk_choices)]
    longest = max(len(e.input_ids) for e in encoded + (encoded_idk or []))
    length = self.config.padded_length(longest)
    if rows is not None:
      if not indices[rows]:
        raise ValueError(f"rows={rows} selects none of the batch's {len(indices)} rows")
      indices, encoded = indices[rows], encoded[rows]
      encoded_idk = None if encoded_idk is None else encoded_idk[rows]
    return QABatch(
        answers=collate(encoded, indices, length, self.pad_id),
        idk=None if encoded_idk is None else collate(encoded_idk, indices, length, self.pad_id),
        epoch=epoch)


# --------------------------------------------------------------------------------------
# Batch streams and samplers
# --------------------------------------------------------------------------------------


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
        (see ``train.distributed.host_rows``). Every host walks the same global order.

    Raises:
      ValueError: ``drop_last`` with fewer items than ``batch_size`` (no batch at all),
        ``with_idk`` without IDK answers in ``dataset``, or a bad ``position``.
    """
    if stream_id < 0:
      raise ValueError(f"stream_id must be >= 0, got {stream_id}")
    if with_idk and not dataset.idk_answers:
      raise ValueError("with_idk=True but the dataset has no IDK answers (no idontknow.jsonl found?)")
    if config.drop_last and len(dataset) < config.batch_size:
      raise ValueError(f"the dataset has {len(dataset)} items, fewer than batch_size={config.batch_size}, so "
                       "drop_last=True leaves no batch; lower batch_size or set drop_last=False")
    self.dataset = dataset
    self.config = config
    self.stream_id = stream_id
    self.with_idk = with_idk
    if rows is not None and (rows.step not in (None, 1) or not
                             0 <= (rows.start or 0) < (rows.stop or 0) <= config.batch_size):
      raise ValueError(f"rows={rows} is not a contiguous, non-empty range of the "
                       f"{config.batch_size} rows of a batch")
    self.rows = rows
    n, b = len(dataset), config.batch_size
    self.batches_per_epoch = n // b if config.drop_last else math.ceil(n / b)
    self._cached_epoch: int | None = None
    self._cached_order = np.arange(0)
    self._cached_idk = np.arange(0)
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
      raise ValueError(f"bad stream position {position}: need epoch >= 0 and 0 <= offset < "
                       f"{self.batches_per_epoch} (batches per epoch)")

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
    self._cached_epoch = epoch

  def batch_at(self, position: StreamPosition) -> QABatch:
    """The batch at ``position``, without moving the stream.

    Raises:
      ValueError: ``position`` is outside the stream.
    """
    self._check_position(position)
    self._cache_epoch(position.epoch)
    b = self.config.batch_size
    indices = self._cached_order[position.offset * b:(position.offset + 1) * b]
    # IDK choices belong to items (not rows), so an item keeps its IDK answer all epoch.
    idk_choices = self._cached_idk[indices] if self.with_idk else None
    return self.dataset.batch(indices, idk_choices, epoch=position.epoch, rows=self.rows)

  def __iter__(self) -> Iterator[QABatch]:
    return self

  def __next__(self) -> QABatch:
    batch = self.batch_at(self._position)
    epoch, offset = self._position.epoch, self._position.offset + 1
    # Move to the next epoch as soon as this one is used up, so a saved position always
    # names a batch that exists.
    self._position = StreamPosition(epoch + 1, 0) if offset == self.batches_per_epoch else StreamPosition(epoch, offset)
    return batch


@dataclasses.dataclass(frozen=True)
class SamplerState:
  """Everything needed to resume a sampler exactly.

  Attributes:
    step: Steps taken so far (the index of the next step, over both objectives; the
      optimizer's step count).
    forget: The forget stream's position.
    retain: The retain stream's position.
  """

  step: int = 0
  forget: StreamPosition = StreamPosition()
  retain: StreamPosition = StreamPosition()

  def to_dict(self) -> dict[str, int]:
    """A flat dict of ints (JSON-serializable)."""
    return {"step": self.step, "forget_epoch": self.forget.epoch, "forget_offset": self.forget.offset,
            "retain_epoch": self.retain.epoch, "retain_offset": self.retain.offset}

  @classmethod
  def from_dict(cls, state: Mapping[str, Any]) -> SamplerState:
    """Inverse of :meth:`to_dict`.

    Raises:
      ValueError: A key is missing or a value is not an integer.
    """
    keys = ("step", "forget_epoch", "forget_offset", "retain_epoch", "retain_offset")
    missing = [k for k in keys if k not in state]
    if missing:
      raise ValueError(f"sampler state lacks {missing}; got keys {sorted(state)}")
    values = {}
    for k in keys:
      if isinstance(state[k], bool) or not isinstance(state[k], (int, np.integer)):
        raise ValueError(f"sampler state {k!r} must be an integer, got {state[k]!r}")
      values[k] = int(state[k])
    return cls(values["step"], StreamPosition(values["forget_epoch"], values["forget_offset"]),
               StreamPosition(values["retain_epoch"], values["retain_offset"]))


def scheduled_objective(step: int, forget_steps: int, retain_steps: int) -> int:
  """:data:`FORGET` if ``step mod (forget_steps + retain_steps) < forget_steps``, else :data:`RETAIN`."""
  return FORGET if step % (forget_steps + retain_steps) < forget_steps else RETAIN


class _TwoStreamSampler:
  """Shared by the samplers: the two streams, the step count and the state."""

  def __init__(self, forget: BatchStream, retain: BatchStream, state: SamplerState | None):
    if forget is retain:
      raise ValueError("forget and retain must be two different BatchStream objects")
    self.forget = forget
    self.retain = retain
    self.step = 0
    if state is not None:
      self.restore(state)

  @property
  def state(self) -> SamplerState:
    """The current state; pass it to :meth:`restore` or a new sampler's ``state``."""
    return SamplerState(self.step, self.forget.position, self.retain.position)

  def restore(self, state: SamplerState) -> None:
    """Moves the sampler (and its streams) to ``state``.

    Raises:
      ValueError: A negative step or a position outside a stream.
    """
    if state.step < 0:
      raise ValueError(f"sampler state step must be >= 0, got {state.step}")
    self.forget.position = state.forget
    self.retain.position = state.retain
    self.step = state.step

  def __iter__(self):
    return self


class AlternatingSampler(_TwoStreamSampler):
  """Yields ``(objective, batch)``: ``forget_steps`` forget batches, then ``retain_steps`` retain batches.

  Step ``s`` (0-based, counted over both objectives) is a forget step iff
  ``s mod (forget_steps + retain_steps) < forget_steps``: the same schedule as
  :func:`dualoptax.dualoptim_plus`'s, so with a sampler and an optimizer that start at the
  same step the objective of each batch is the one the optimizer expects. Each stream moves
  only on its own steps and restarts (next epoch, reshuffled) when it runs out.

  Example::

      sampler = AlternatingSampler(forget_stream, retain_stream, forget_steps=1, retain_steps=5)
      for objective, batch in itertools.islice(sampler, num_steps):
        ...
      checkpoint["sampler"] = sampler.state.to_dict()
      # later:
      sampler = AlternatingSampler(forget_stream, retain_stream, 1, 5,
                                   state=SamplerState.from_dict(checkpoint["sampler"]))
  """

  def __init__(self, forget: BatchStream, retain: BatchStream, forget_steps: int = 1, retain_steps: int = 5,
               *, state: SamplerState | None = None):
    """Creates the sampler.

    Args:
      forget: The forget batches.
      retain: The retain batches.
      forget_steps: ``F_f``, forget steps per cycle (>= 0).
      retain_steps: ``F_r``, retain steps per cycle (>= 0; ``F_f + F_r >= 1``).
      state: Resume from here (overrides the streams' positions); ``None`` starts at step 0
        with the streams where they are.

    Raises:
      ValueError: Bad step counts or state.
    """
    for name, value in (("forget_steps", forget_steps), ("retain_steps", retain_steps)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if forget_steps + retain_steps < 1:
      raise ValueError("forget_steps + retain_steps must be >= 1, got 0 + 0")
    self.forget_steps = forget_steps
    self.retain_steps = retain_steps
    super().__init__(forget, retain, state)

  def objective_at(self, step: int) -> int:
    """The objective of step ``step``."""
    return scheduled_objective(step, self.forget_steps, self.retain_steps)

  def __next__(self) -> tuple[int, QABatch]:
    objective = self.objective_at(self.step)
    batch = next(self.forget if objective == FORGET else self.retain)
    self.step += 1
    return objective, batch


class JointSampler(_TwoStreamSampler):
  """Yields ``(forget_batch, retain_batch)`` every step, for joint-loss optimizers (e.g. Adam).

  Args:
    forget: The forget batches.
    retain: The retain batches.
    state: Resume from here; ``None`` starts at step 0 with the streams where they are.
  """

  def __init__(self, forget: BatchStream, retain: BatchStream, *, state: SamplerState | None = None):
    super().__init__(forget, retain, state)

  def __next__(self) -> tuple[QABatch, QABatch]:
    batches = next(self.forget), next(self.retain)
    self.step += 1
    return batches


def make_batch_streams(
    splits: TofuSplits,
    tokenizer: PreTrainedTokenizerBase,
    tokenization: TokenizationConfig,
    forget_batching: BatchingConfig,
    retain_batching: BatchingConfig | None = None,
    *,
    forget_with_idk: bool = True,
) -> tuple[BatchStream, BatchStream]:
  """The forget and retain streams of a run.

  Args:
    splits: From :func:`load_unlearning_data`.
    tokenizer: The model's tokenizer.
    tokenization: Template, lengths and padding.
    forget_batching: Batch size and seed of the forget stream.
    retain_batching: The same for the retain stream; ``None`` uses ``forget_batching``
      (the two are still shuffled differently: their ``stream_id`` differ).
    forget_with_idk: Give forget batches IDK answers (for the IDK, DPO and AP losses);
      needs ``splits.idk_answers``.

  Returns:
    ``(forget_stream, retain_stream)``, with ``stream_id`` :data:`FORGET` and :data:`RETAIN`.
  """
  forget = QADataset(splits.forget, tokenizer, tokenization, idk_answers=splits.idk_answers)
  retain = QADataset(splits.retain, tokenizer, tokenization)
  return (BatchStream(forget, forget_batching, stream_id=FORGET, with_idk=forget_with_idk),
          BatchStream(retain, retain_batching or forget_batching, stream_id=RETAIN))
