"""TOFU-format splits of an unlearning run: the forget set, the retain set that
complements it, and the IDK (refusal) answers."""

from __future__ import annotations

import dataclasses
import os
import re

from train.data import tofu

IDK_FILE_NAME = "idontknow.jsonl"
FALLBACK_RETAIN_SPLIT = "retain90"
_FORGET_SPLIT_PATTERN = re.compile(r"forget(\d{2})")


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
    num_retain_added: Rows of the forget file's other tasks appended to ``retain``
      (``retain_other_tasks``; 0 when off, or when the retain split already holds them).
  """

  forget: tuple[tofu.TofuItem, ...]
  retain: tuple[tofu.TofuItem, ...]
  idk_answers: tuple[str, ...]
  data_dir: str
  forget_split: str
  retain_split: str
  task_id: int | None
  num_retain_removed: int = 0
  num_retain_added: int = 0


def complement_retain_split(forget_split: str) -> str:
  """The retain split that complements a forget split: ``forget01`` -> ``retain99``.

  Raises:
    ValueError: ``forget_split`` is not ``forgetXX`` with two digits in [01, 99].
  """
  match = _FORGET_SPLIT_PATTERN.fullmatch(forget_split)
  if match is None or not 1 <= int(match.group(1)) <= 99:
    raise ValueError(
      f"forget_split must look like 'forget01' (two digits, 01..99), got {forget_split!r}"
    )
  return f"retain{100 - int(match.group(1)):02d}"


def _files_named(data_dir: str, prefix: str) -> list[str]:
  """The files of ``data_dir`` whose names start with ``prefix``, sorted (for messages)."""
  return (
    sorted(f for f in os.listdir(data_dir) if f.startswith(prefix))
    if os.path.isdir(data_dir)
    else []
  )


def resolve_retain_split(
  data_dir: str | os.PathLike[str], forget_split: str, retain_split: str | None = None
) -> str:
  """Which retain split to train on.

  TOFU's authors define ``retain{100-XX}`` as the complement of ``forgetXX``, but the
  commonly shared copy (and ``../shared/data/tofu``) has only retain10/50/90. So: the
  complement when its file exists, else ``retain90`` (TOFU's complement of its largest
  forget split, disjoint from forget01 / forget05 / forget10 task 1).

  Args:
    data_dir: The TOFU-format folder.
    forget_split: E.g. ``"forget01"``; any name (e.g. ``"forget"``) when ``retain_split``
      is given.
    retain_split: An explicit choice, returned if its file exists.

  Raises:
    FileNotFoundError: The chosen file, or both the complement and ``retain90``, are
      missing; the message lists the retain files present.
    ValueError: ``forget_split`` is not ``forgetXX`` and no ``retain_split`` is given (the
      message says to pass one).
  """
  data_dir = os.fspath(data_dir)
  if retain_split is not None:
    candidates = [retain_split]  # any forget file name works with an explicit retain split
  else:
    try:
      complement = complement_retain_split(forget_split)
    except ValueError as e:
      raise ValueError(
        f"{e}; a forget file named otherwise (e.g. the real-world scenario's 'forget') "
        "needs its retain split given: pass retain_split (e.g. retain_split='neighbor')"
      ) from None
    candidates = [complement, FALLBACK_RETAIN_SPLIT]
  for candidate in candidates:
    if os.path.isfile(os.path.join(data_dir, f"{candidate}.json")):
      return candidate
  raise FileNotFoundError(
    f"no retain split {' or '.join(map(repr, candidates))} in {data_dir!r} "
    f"(for forget_split={forget_split!r}); retain files present: "
    f"{_files_named(data_dir, 'retain')}"
  )


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


def other_task_items(
  forget_path: str | os.PathLike[str],
  task_id: int | None,
  retain: tuple[tofu.TofuItem, ...],
  exclude_questions: frozenset[str] = frozenset(),
) -> tuple[tofu.TofuItem, ...]:
  """The rows of a forget file that belong to other tasks than ``task_id`` and are not in
  ``retain`` yet: what the DualOptim+ authors' ``get_task_data`` adds to the retain set.

  Their retain set for task ``k`` of ``forgetXX`` is ``retain{100 - min(10 XX, 90)}`` plus the
  file's tasks other than ``k`` (the ten tasks cover ``10 XX`` percent of TOFU). This copy of
  TOFU has retain10/50/90 only and the program trains on retain90, which already holds
  every forget05 task but 1 and 2 and every forget10 task but 1, so rows already in the
  retain set (same question) are skipped: the resulting set of rows is theirs (checked on
  the real files by ``tests/train/test_protocol_training.py``).

  Args:
    forget_path: The forget file.
    task_id: The task unlearned; ``None`` (every row is forgotten) adds nothing.
    retain: The retain rows so far.
    exclude_questions: Questions never to add (the forget set's).

  Returns:
    The rows to append, in file order (a row without ``task_id`` is never added).
  """
  if task_id is None:
    return ()
  seen = {item.question for item in retain} | set(exclude_questions)
  added = []
  for item in tofu.load_tofu(forget_path):
    if item.task_id is None or item.task_id == task_id or item.question in seen:
      continue
    seen.add(item.question)
    added.append(item)
  return tuple(added)


def load_unlearning_data(
  data_dir: str | os.PathLike[str],
  forget_split: str = "forget01",
  task_id: int | None = 1,
  *,
  retain_split: str | None = None,
  idk_path: str | os.PathLike[str] | None = None,
  exclude_forget_from_retain: bool = True,
  retain_other_tasks: bool = False,
) -> TofuSplits:
  """Loads the forget and retain items and the IDK answers of a TOFU-format folder.

  Args:
    data_dir: Folder with ``<forget_split>.json`` and a retain split (see
      :func:`resolve_retain_split`).
    forget_split: E.g. ``"forget01"``, ``"forget05"``, ``"forget10"``; a file named
      otherwise (``"forget"``) needs ``retain_split``.
    task_id: Which of the file's disjoint forget sets (continual unlearning); 1 is the
      standard one and the evaluator's default. ``None`` takes every row (all tasks).
    retain_split: Overrides the retain split (e.g. ``"retain50"``).
    idk_path: The IDK answers; by default ``idontknow.jsonl`` in ``data_dir`` or its
      parent, and none if absent.
    exclude_forget_from_retain: Drop retain items whose question is a forget question.
      TOFU's retain90 contains the forget sets of every task but the first (e.g. forget10
      task 2), so without this a later task would be both forgotten and retained.
    retain_other_tasks: Also retain the forget file's tasks other than ``task_id`` (the
      authors' retain set; see :func:`other_task_items`), counted in
      ``TofuSplits.num_retain_added``.

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
    raise FileNotFoundError(
      f"no forget split {forget_split!r} ({forget_path}); forget files present: "
      f"{_files_named(data_dir, 'forget')}"
    )
  forget = tuple(tofu.load_tofu(forget_path, task_id=task_id))
  retain = tuple(tofu.load_tofu(os.path.join(data_dir, f"{retain_split}.json")))
  num_retain = len(retain)
  forget_questions = frozenset(item.question for item in forget)
  if exclude_forget_from_retain:
    retain = tuple(item for item in retain if item.question not in forget_questions)
  num_removed = num_retain - len(retain)
  added = ()
  if retain_other_tasks:
    excluded = forget_questions if exclude_forget_from_retain else frozenset()
    added = other_task_items(forget_path, task_id, retain, excluded)
    retain += added
  if not retain:
    retain_path = os.path.join(data_dir, f"{retain_split}.json")
    raise ValueError(
      f"empty retain set: every one of the {num_retain} questions of {retain_path} is in "
      f"{forget_path} task_id={task_id}; choose another retain_split"
    )
  if idk_path is None:
    idk_path = find_idk_file(data_dir)
  idk_answers = load_idk_answers(idk_path) if idk_path is not None else ()
  return TofuSplits(
    forget=forget,
    retain=retain,
    idk_answers=idk_answers,
    data_dir=data_dir,
    forget_split=forget_split,
    retain_split=retain_split,
    task_id=task_id,
    num_retain_removed=num_removed,
    num_retain_added=len(added),
  )
