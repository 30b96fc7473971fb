"""Loading instruction-tuning data (the Alpaca format) with validation and line numbers.

Most public instruction sets (Alpaca, safety-tuned-llamas, many SFT mixes) ship as a JSON
list of objects ``{"instruction": str, "input": str, "output": str}``; many others ship
the same objects as JSON lines, one per line. :func:`load_instructions` reads both and
returns :class:`~train.data.tofu.TofuItem` rows (question = :func:`instruction_prompt`,
answer = ``output``), so the batching, prompting and evaluation code that serves TOFU
serves instruction data unchanged.

Every item keeps its 0-based row ``index`` and the 1-based ``line_number`` where its object
starts, also for JSON list files (elements are decoded one by one and the newlines before
each counted), so a result or an error points at the data. Any problem raises
:class:`InstructionFormatError` naming the file and the line. Keys other than
:data:`INSTRUCTION_KEYS` (``id``, ``category``, ``source``...) are ignored: datasets add
their own bookkeeping and rejecting it would reject most of them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from train.data.tofu import TofuItem

INSTRUCTION_KEYS: tuple[str, ...] = ("instruction", "input", "output")
"""The keys of a row; ``input`` is optional (absent or ``""`` for most instructions)."""
_REQUIRED_KEYS = ("instruction", "output")
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, which raw_decode does not skip


class InstructionFormatError(ValueError):
  """An instruction file is malformed; the message names the file and the 1-based line.

  Attributes:
    path: The file.
    line_number: 1-based line where the offending object starts (or where the JSON is
      malformed), or ``None`` for whole-file problems.
  """

  def __init__(self, path: str | os.PathLike[str], line_number: int | None, problem: str):
    self.path = os.fspath(path)
    self.line_number = line_number
    where = self.path if line_number is None else f"{self.path}, line {line_number}"
    super().__init__(f"{where}: {problem}")


def instruction_prompt(instruction: str, input: str = "") -> str:
  """The question text of a row: the instruction, then a blank line and the input if any.

  This is the Alpaca layout without its "### Instruction:" headers: the run's prompt
  template (a preset or the tokenizer's chat template) wraps the question in the model's
  own markup, so adding a second layer of headers here would teach the model a format it
  never sees at inference. A blank (whitespace-only) input counts as no input.
  """
  return f"{instruction}\n\n{input}" if input.strip() else instruction


def _preview(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


def row_problem(row: Any) -> str | None:
  """What is wrong with one row, or ``None`` if it is a valid instruction row."""
  if not isinstance(row, Mapping):
    return f"expected a JSON object, got {type(row).__name__}: {_preview(row)}"
  for key in _REQUIRED_KEYS:
    if key not in row:
      return f"missing key {key!r}; the object has keys {sorted(row)}"
  for key in INSTRUCTION_KEYS:
    if key not in row:
      continue
    value = row[key]
    if not isinstance(value, str):
      return f"{key!r} must be a string, got {type(value).__name__}: {_preview(value)}"
    if key in _REQUIRED_KEYS and not value.strip():
      return f"{key!r} must be a non-empty string, got {_preview(value)}"
  return None


def _skip_whitespace(text: str, pos: int) -> int:
  return _WHITESPACE.match(text, pos).end()


def _read_text(path: str | os.PathLike[str]) -> str:
  # utf-8-sig: files saved by some editors start with a byte-order mark, which JSON rejects.
  try:
    with open(path, encoding="utf-8-sig") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise InstructionFormatError(
      path, None, f"not UTF-8 text ({e.reason} at byte {e.start})"
    ) from e


def _decode(path, decoder: json.JSONDecoder, text: str, pos: int) -> tuple[Any, int]:
  try:
    return decoder.raw_decode(text, pos)
  except json.JSONDecodeError as e:  # e.lineno counts from the start of ``text``
    raise InstructionFormatError(
      path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})"
    ) from e


class _LineCounter:
  """The 1-based line of increasing positions of a text, counting each newline once."""

  def __init__(self, text: str):
    self.text, self.line, self.pos = text, 1, 0

  def __call__(self, pos: int) -> int:
    self.line += self.text.count("\n", self.pos, pos)
    self.pos = pos
    return self.line


def _list_values(path, text: str, pos: int) -> Iterator[tuple[int, Any]]:
  """The elements of the JSON list that starts at ``text[pos] == "["``."""
  decoder, line_at = json.JSONDecoder(), _LineCounter(text)
  pos = _skip_whitespace(text, pos + 1)
  if text.startswith("]", pos):
    pos = _skip_whitespace(text, pos + 1)
  else:
    while True:
      start = line_at(pos)
      value, pos = _decode(path, decoder, text, pos)
      yield start, value
      pos = _skip_whitespace(text, pos)
      if text.startswith(",", pos):
        pos = _skip_whitespace(text, pos + 1)
      elif text.startswith("]", pos):
        pos = _skip_whitespace(text, pos + 1)
        break
      else:
        raise InstructionFormatError(path, line_at(pos), "expected ',' or ']' after a list element")
  if pos != len(text):
    raise InstructionFormatError(path, line_at(pos), "extra data after the JSON list")


def _stream_values(path, text: str, pos: int) -> Iterator[tuple[int, Any]]:
  """The whitespace-separated JSON values from ``pos`` on (JSON lines)."""
  decoder, line_at = json.JSONDecoder(), _LineCounter(text)
  while pos < len(text):
    start = line_at(pos)
    value, pos = _decode(path, decoder, text, pos)
    yield start, value
    pos = _skip_whitespace(text, pos)


def iter_json_objects(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
  """Yields ``(line_number, value)`` for each element of a JSON list file, or each value
  of a JSON-lines file, with the 1-based line where the value starts.

  A file whose first character (after whitespace) is ``[`` is a JSON list; one starting
  with ``{`` is JSON lines. Values in JSON lines may be separated by any whitespace, so a
  file of pretty-printed objects one after another reads too. The values are not checked
  (:func:`row_problem` does that). An empty or whitespace-only file yields nothing.

  Raises:
    InstructionFormatError: Malformed JSON, text after the list, or a file that is neither.
    FileNotFoundError: The file does not exist.
  """
  text = _read_text(path)
  pos = _skip_whitespace(text, 0)
  if pos == len(text):
    return
  if text[pos] == "[":
    yield from _list_values(path, text, pos)
  elif text[pos] == "{":
    yield from _stream_values(path, text, pos)
  else:
    raise InstructionFormatError(
      path,
      None,
      "expected a JSON list of objects or JSON lines (one object per line), but the file "
      f"starts with {_preview(text[pos : pos + 40])}",
    )


def load_instructions(path: str | os.PathLike[str]) -> tuple[TofuItem, ...]:
  """Reads and validates an instruction file (a JSON list of objects, or JSON lines).

  Args:
    path: The file.

  Returns:
    One :class:`~train.data.tofu.TofuItem` per row, in file order: ``index`` the 0-based
    row, ``line_number`` the line where its object starts, ``question`` the
    :func:`instruction_prompt` of its ``instruction`` and ``input``, ``answer`` its
    ``output``.

  Raises:
    InstructionFormatError: The file is not a JSON list or JSON lines, is malformed, has no
      rows, or a row is not an object, lacks ``instruction`` / ``output``, or has one of
      them empty or any of :data:`INSTRUCTION_KEYS` not a string.
    FileNotFoundError: The file does not exist (the message names it).
  """
  items = []
  for index, (line_number, row) in enumerate(iter_json_objects(path)):
    problem = row_problem(row)
    if problem is not None:
      raise InstructionFormatError(path, line_number, problem)
    items.append(
      TofuItem(
        index=index,
        line_number=line_number,
        question=instruction_prompt(row["instruction"], row.get("input", "")),
        answer=row["output"],
      )
    )
  if not items:
    raise InstructionFormatError(path, None, "the file has no rows")
  return tuple(items)


def write_instructions(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
  """Writes rows as a JSON list with one object per line (object ``i`` on line ``i + 2``),
  so the line numbers :func:`load_instructions` reports are meaningful.

  UTF-8 without ASCII escapes (readable), ``"\\n"`` line ends (the same bytes on every
  platform). Rows are written as given, extra keys included.

  Raises:
    ValueError: There are no rows, or a row would not load (the message names its index
      and the problem); nothing is written then.
  """
  rows = list(rows)
  if not rows:
    raise ValueError(f"no rows to write to {os.fspath(path)}")
  for index, row in enumerate(rows):
    problem = row_problem(row)
    if problem is not None:
      raise ValueError(f"row {index} of {os.fspath(path)}: {problem}")
  lines = ",\n".join(json.dumps(dict(row), ensure_ascii=False) for row in rows)
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.write(f"[\n{lines}\n]\n")
