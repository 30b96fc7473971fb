"""Tokenized question-answer batches: prompt templates applied, answers tokenized,
rows collated into right-padded numpy arrays with Hugging Face labels.

Besides its true answers a batch may carry, row by row, IDK answers to the same questions
(IDK, DPO, AP) and "mismatch" rows: another set's question with this row's answer (LLMU's
retain term: a forget question answered with a retain answer)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from train.data import tofu
from train.data.prompting import EncodedAnswer, PromptEncoder, Template, get_prompt_template
from train.losses.tokens import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class TokenizationConfig:
  """How items become token sequences.

  Attributes:
    template: A template (:class:`~train.data.prompting.PromptTemplate` or
      :class:`~train.data.prompting.ChatTemplate`), a preset name (``"phi"``,
      ``"llama2-chat"``, ...) or ``"chat"``: the tokenizer's own chat template.
    max_length: Sequences longer than this lose answer tokens from the end (counted in
      :attr:`QADataset.num_truncated`); ``None`` keeps every token.
    pad_to_multiple_of: Batches are padded to the longest row rounded up to a multiple of
      this, so a jitted step compiles for a few lengths only.
    pad_to_max_length: Pad every batch to exactly ``max_length`` (one compiled shape).
    append_eos: End each answer with EOS (scored like the answer), as TOFU does; with a
      chat template, its end-of-turn token.
    warn_truncated: :class:`QADataset` warns of truncated sequences itself; off when the
      caller reports them (naming the file: ``train.program.streams``).
  """

  template: str | Template = "phi"
  max_length: int | None = None
  pad_to_multiple_of: int = 16
  pad_to_max_length: bool = False
  append_eos: bool = True
  warn_truncated: bool = True

  def __post_init__(self):
    get_prompt_template(self.template)  # fails early on an unknown preset name
    if self.max_length is not None and self.max_length < 2:
      raise ValueError(
        f"max_length must be >= 2 (a prompt and an answer token) or None, got {self.max_length}"
      )
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
    return {
      "input_ids": self.input_ids,
      "attention_mask": self.attention_mask,
      "labels": self.labels,
    }


@dataclasses.dataclass(frozen=True, eq=False)
class QABatch:
  """One batch of questions, with their true answers and optionally IDK and mismatch rows.

  Attributes:
    answers: The questions with their true answers.
    idk: The same questions in the same rows with IDK answers, padded to the same length
      as ``answers`` (so a loss may stack both in one forward pass); ``None`` unless the
      stream was made ``with_idk``.
    epoch: The epoch of the stream this batch came from.
    mismatch: Row ``j`` is a question of the dataset's ``mismatch_questions`` (a forget
      question) with row ``j``'s true answer, padded like ``answers``; ``None`` unless the
      stream was made ``with_mismatch``.
  """

  answers: TokenizedQA
  idk: TokenizedQA | None = None
  epoch: int = 0
  mismatch: TokenizedQA | None = None


def collate(
  encoded: Sequence[EncodedAnswer],
  item_indices: Sequence[int],
  length: int,
  pad_id: int,
  *,
  score_prompt: bool = False,
) -> TokenizedQA:
  """Right-pads encoded sequences to ``length`` and masks their prompt and padding labels.

  With ``score_prompt`` the prompt tokens are labelled too (all but the first, which no
  position predicts): the DualOptim+ authors' ``mask=false`` for the forget set. Padding
  stays masked (their padded labels also score the EOS tokens that pad a row to 500).

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
    start = 1 if score_prompt else sequence.num_prompt_tokens
    labels[row, start:n] = sequence.input_ids[start:]
  return TokenizedQA(input_ids, attention_mask, labels, np.asarray(item_indices, np.int32))


class QADataset:
  """Items with their tokenized prompt+answer sequences, ready to batch.

  True answers are tokenized once, up front; IDK and mismatch versions on first use and
  cached.
  """

  def __init__(
    self,
    items: Sequence[tofu.TofuItem],
    tokenizer: PreTrainedTokenizerBase,
    config: TokenizationConfig = TokenizationConfig(),
    *,
    idk_answers: Sequence[str] = (),
    mismatch_questions: Sequence[str] = (),
    score_prompt: bool = False,
  ):
    """Tokenizes ``items``.

    Args:
      items: The questions and answers.
      tokenizer: Any Hugging Face tokenizer (with EOS when ``config.append_eos``; with a
        chat template when ``config.template`` is ``"chat"``).
      config: Template, lengths and padding.
      idk_answers: Answers that :meth:`batch` may substitute for the true ones.
      mismatch_questions: Questions that :meth:`batch` may pair with the items' true
        answers (LLMU: the forget questions, on the retain set).
      score_prompt: Label the prompt tokens of the true answers' rows too (the forget
        set's ``loss.mask=false``); IDK and mismatch rows always score their answer only,
        as the authors' (their ``mask`` reaches the forget rows only).

    Raises:
      ValueError: ``items`` is empty, an item cannot be encoded (the message names it), or
        the template cannot be used with the tokenizer (e.g. it has no chat template).
    """
    if not items:
      raise ValueError("a QADataset needs at least one item")
    self.items = tuple(items)
    self.tokenizer = tokenizer
    self.config = config
    self.idk_answers = tuple(idk_answers)
    self.mismatch_questions = tuple(mismatch_questions)
    self.score_prompt = score_prompt
    self.template = get_prompt_template(config.template)
    self.encoder = PromptEncoder.create(self.template, tokenizer)
    # Padding positions are masked out everywhere, so any id works when there is no pad.
    self.pad_id = next(
      (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
    )
    self._prompts = tuple(self.encoder.prompt(item.question) for item in self.items)
    self._encoded = tuple(self._encode(i, item.answer) for i, item in enumerate(self.items))
    self._encoded_idk: dict[tuple[int, int], EncodedAnswer] = {}
    self._mismatch_prompts: dict[int, str] = {}
    self._encoded_mismatch: dict[tuple[int, int], EncodedAnswer] = {}
    self.truncated_indices = tuple(i for i, e in enumerate(self._encoded) if e.truncated)
    self.num_truncated = len(self.truncated_indices)
    if self.num_truncated and config.warn_truncated:
      warnings.warn(
        f"{self.num_truncated} of {len(self.items)} sequences are longer than "
        f"max_length={config.max_length} and lose answer tokens",
        stacklevel=2,
      )

  def __len__(self) -> int:
    return len(self.items)

  def _encode(self, index: int, answer: str, prompt: str | None = None) -> EncodedAnswer:
    """Item ``index``'s prompt (or ``prompt``) followed by ``answer``, tokenized."""
    try:
      return self.encoder.encode_answer(
        self._prompts[index] if prompt is None else prompt,
        answer,
        append_eos=self.config.append_eos,
        max_length=self.config.max_length,
      )
    except ValueError as e:
      item = self.items[index]
      raise ValueError(
        f"item {index} (file line {item.line_number}, question {item.question[:60]!r}): {e}"
      ) from e

  def encoded(self, index: int) -> EncodedAnswer:
    """Item ``index``'s prompt + true answer tokens."""
    return self._encoded[index]

  def encoded_idk(self, index: int, idk_index: int) -> EncodedAnswer:
    """Item ``index``'s prompt + IDK answer ``idk_index`` tokens."""
    key = (index, idk_index)
    if key not in self._encoded_idk:
      self._encoded_idk[key] = self._encode(index, self.idk_answers[idk_index])
    return self._encoded_idk[key]

  def encoded_mismatch(self, index: int, question_index: int) -> EncodedAnswer:
    """Mismatch question ``question_index``'s prompt + item ``index``'s true answer tokens."""
    key = (index, question_index)
    if key not in self._encoded_mismatch:
      if question_index not in self._mismatch_prompts:
        question = self.mismatch_questions[question_index]
        self._mismatch_prompts[question_index] = self.encoder.prompt(question)
      prompt = self._mismatch_prompts[question_index]
      self._encoded_mismatch[key] = self._encode(index, self.items[index].answer, prompt)
    return self._encoded_mismatch[key]

  def max_sequence_length(self) -> int:
    """The longest prompt + true answer, in tokens."""
    return max(len(e.input_ids) for e in self._encoded)

  def batch(
    self,
    indices: Sequence[int],
    idk_choices: Sequence[int] | None = None,
    epoch: int = 0,
    rows: slice | None = None,
    mismatch_choices: Sequence[int] | None = None,
  ) -> QABatch:
    """Collates items ``indices`` (with IDK answer ``idk_choices[j]`` and mismatch question
    ``mismatch_choices[j]`` for row ``j`` if given).

    Args:
      indices: The items of the whole (global) batch, one per row.
      idk_choices: The IDK answer of each row, or None.
      epoch: Recorded on the batch.
      rows: Collate only these rows (a host's share of a global batch). The padded length
        is still that of the whole batch, so every host's rows fit one global array.
      mismatch_choices: The mismatch question of each row (an index into
        ``mismatch_questions``), or None.

    Raises:
      ValueError: ``indices`` is empty, the choices have another length, or the dataset
        has no IDK answers (mismatch questions) for the choices given.
    """
    indices = [int(i) for i in indices]
    if not indices:
      raise ValueError("a batch needs at least one index")
    encoded = [self._encoded[i] for i in indices]
    encoded_idk = self._alternatives(
      indices, idk_choices, self.idk_answers, "IDK answers", self.encoded_idk
    )
    encoded_mismatch = self._alternatives(
      indices,
      mismatch_choices,
      self.mismatch_questions,
      "mismatch questions",
      self.encoded_mismatch,
    )
    every = encoded + (encoded_idk or []) + (encoded_mismatch or [])
    length = self.config.padded_length(max(len(e.input_ids) for e in every))
    if rows is not None:
      if not indices[rows]:
        raise ValueError(f"rows={rows} selects none of the batch's {len(indices)} rows")
      indices, encoded = indices[rows], encoded[rows]
      encoded_idk = None if encoded_idk is None else encoded_idk[rows]
      encoded_mismatch = None if encoded_mismatch is None else encoded_mismatch[rows]

    def rows_of(sequences, score_prompt=False):
      if sequences is None:
        return None
      return collate(sequences, indices, length, self.pad_id, score_prompt=score_prompt)

    return QABatch(
      answers=rows_of(encoded, self.score_prompt),
      idk=rows_of(encoded_idk),
      epoch=epoch,
      mismatch=rows_of(encoded_mismatch),
    )

  @staticmethod
  def _alternatives(indices, choices, pool, what, encode) -> list[EncodedAnswer] | None:
    """``encode(index, choice)`` of each row, or None without ``choices``."""
    if choices is None:
      return None
    if not pool:
      raise ValueError(f"{what} were requested but the dataset has none (pass them)")
    if len(choices) != len(indices):
      raise ValueError(f"{len(choices)} choices of {what} for {len(indices)} rows")
    return [encode(i, int(k)) for i, k in zip(indices, choices)]
