"""Loading TOFU-format data (JSON lines) with validation.

TOFU (Maini et al. 2024) stores one JSON object per line. The files this module reads:

* ``forgetXX.json``, ``retainXX.json``: ``question``, ``answer`` (+ ``task_id`` in
  forget files);
* ``forgetXX_perturbed.json``, ``retain_perturbed.json``: those and
  ``paraphrased_answer``, ``perturbed_answer`` (list), ``paraphrased_question``;
* ``real_authors_perturbed.json``, ``world_facts_perturbed.json``: ``question``,
  ``answer``, ``perturbed_answer`` (list), ``original_answer``.

Every item keeps its 0-based row ``index`` in the file and its 1-based ``line_number``, so
results can be traced back to the data even after ``task_id`` selection or a ``max_items``
cap. Any problem (malformed JSON, a missing key, a value of the wrong type) raises
:class:`TofuFormatError` naming the file and the line.

The data are always read from a path the caller gives; nothing is bundled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

QA_KEYS: tuple[str, ...] = ("question", "answer")
"""Keys every TOFU row has."""
PARAPHRASE_KEYS: tuple[str, ...] = ("question", "answer", "paraphrased_answer", "perturbed_answer")
"""Keys the truth ratio needs on forget / retain evaluation files (``*_perturbed.json``)."""
OPTION_KEYS: tuple[str, ...] = ("question", "answer", "perturbed_answer")
"""Keys the real-authors / world-facts evaluation files need."""


class TofuFormatError(ValueError):
  """A TOFU file is malformed; the message names the file and the 1-based line number.

  Attributes:
    path: The file.
    line_number: 1-based line of the problem, or ``None`` for whole-file problems.
  """

  def __init__(self, path: str | os.PathLike[str], line_number: int | None, problem: str):
    self.path = os.fspath(path)
    self.line_number = line_number
    where = self.path if line_number is None else f"{self.path}, line {line_number}"
    super().__init__(f"{where}: {problem}")


@dataclasses.dataclass(frozen=True)
class TofuItem:
  """One question with its answers.

  Attributes:
    index: 0-based row of the item in its file (blank lines are not rows).
    line_number: 1-based line of the item in its file.
    question: The question.
    answer: The true answer.
    paraphrased_answer: A paraphrase of the true answer (forget / retain evaluation files).
    perturbed_answers: Wrong answers in the same style (evaluation files).
    original_answer: The long-form answer of real-authors / world-facts rows.
    paraphrased_question: The paraphrased question, where the file has one.
    task_id: Which disjoint forget set the row belongs to, where the file has one.
  """

  index: int
  line_number: int
  question: str
  answer: str
  paraphrased_answer: str | None = None
  perturbed_answers: tuple[str, ...] = ()
  original_answer: str | None = None
  paraphrased_question: str | None = None
  task_id: int | None = None


def iter_json_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields ``(line_number, object)`` for every non-blank line of a JSON-lines file.

  Raises:
    TofuFormatError: A line is not valid JSON or not a JSON object.
    FileNotFoundError: The file does not exist.
  """
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise TofuFormatError(
          path, line_number, f"malformed JSON ({e.msg} at column {e.colno})"
        ) from e
      if not isinstance(row, dict):
        raise TofuFormatError(
          path, line_number, f"expected a JSON object, got {type(row).__name__}"
        )
      yield line_number, row


def _string(path, line_number: int, row: dict[str, Any], key: str) -> str:
  value = row[key]
  if not isinstance(value, str):
    raise TofuFormatError(
      path, line_number, f"{key!r} must be a string, got {type(value).__name__}: {value!r:.80}"
    )
  return value


def _optional_string(path, line_number: int, row: dict[str, Any], key: str) -> str | None:
  return _string(path, line_number, row, key) if key in row else None


def _string_list(path, line_number: int, row: dict[str, Any], key: str) -> tuple[str, ...]:
  value = row[key]
  if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
    raise TofuFormatError(
      path, line_number, f"{key!r} must be a non-empty list of strings, got {value!r:.80}"
    )
  return tuple(value)


def _task_id(path, line_number: int, row: dict[str, Any]) -> int | None:
  if "task_id" not in row:
    return None
  value = row["task_id"]
  try:
    if isinstance(value, bool):
      raise ValueError
    return int(value)
  except (TypeError, ValueError):
    raise TofuFormatError(
      path, line_number, f"'task_id' must be an integer, got {value!r}"
    ) from None


def load_tofu(
  path: str | os.PathLike[str],
  *,
  required_keys: Sequence[str] = QA_KEYS,
  task_id: int | None = None,
  max_items: int | None = None,
) -> list[TofuItem]:
  """Reads and validates a TOFU-format JSON-lines file.

  Args:
    path: The file, e.g. ``<data>/tofu/forget01_perturbed.json``.
    required_keys: Keys every row must have (e.g. :data:`PARAPHRASE_KEYS`). Optional keys
      that are present are validated too.
    task_id: Keep only rows with this ``task_id`` (the authors' files hold several disjoint
      forget sets, task 1 being the standard one). ``None`` keeps every row.
    max_items: Keep at most this many rows (after ``task_id`` selection); ``None`` keeps all.

  Returns:
    The items, in file order.

  Raises:
    TofuFormatError: A line is malformed, lacks a required key, has a value of the wrong
      type, or the file has no row (for the requested ``task_id``).
    ValueError: ``max_items`` is negative.
  """
  if max_items is not None and max_items < 0:
    raise ValueError(f"max_items must be >= 0 or None, got {max_items}")
  items: list[TofuItem] = []
  seen_task_ids: set[int] = set()
  num_rows = 0
  for index, (line_number, row) in enumerate(iter_json_lines(path)):
    num_rows += 1
    missing = [k for k in required_keys if k not in row]
    if missing:
      raise TofuFormatError(
        path, line_number, f"missing key(s) {missing}; the row has {sorted(row)}"
      )
    item = TofuItem(
      index=index,
      line_number=line_number,
      question=_string(path, line_number, row, "question"),
      answer=_string(path, line_number, row, "answer"),
      paraphrased_answer=_optional_string(path, line_number, row, "paraphrased_answer"),
      perturbed_answers=(
        _string_list(path, line_number, row, "perturbed_answer")
        if "perturbed_answer" in row
        else ()
      ),
      original_answer=_optional_string(path, line_number, row, "original_answer"),
      paraphrased_question=_optional_string(path, line_number, row, "paraphrased_question"),
      task_id=_task_id(path, line_number, row),
    )
    if item.task_id is not None:
      seen_task_ids.add(item.task_id)
    if task_id is not None:
      if item.task_id is None:
        raise TofuFormatError(
          path, line_number, f"task_id={task_id} was requested but the row has no 'task_id'"
        )
      if item.task_id != task_id:
        continue
    if max_items is None or len(items) < max_items:
      items.append(item)
  if num_rows == 0:
    raise TofuFormatError(path, None, "the file has no rows")
  if task_id is not None and not items and max_items != 0:
    raise TofuFormatError(
      path, None, f"no row has task_id={task_id}; the file has task ids {sorted(seen_task_ids)}"
    )
  return items


def count_rows(path: str | os.PathLike[str], task_id: int | None = None) -> int:
  """Number of rows of a JSON-lines file (with the given ``task_id``, if not ``None``)."""
  return sum(
    1
    for _, row in iter_json_lines(path)
    if task_id is None or ("task_id" in row and int(row["task_id"]) == task_id)
  )
