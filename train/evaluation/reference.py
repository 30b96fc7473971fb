"""The retain model's forget-set truth ratios that forget quality compares against.

Forget quality is a KS test between two models' per-item truth ratios, so both must be
measured the same way: which tokens are scored (the answer-boundary convention) and which
prompt template. A reference measured otherwise is refused with both values named.

Two file kinds are read:

* this evaluator's per-item file (``tofu_eval_items.json``): it records the convention
  (format ``/2``; files of format ``/1`` predate the field and used ``"answer"``), the
  template and the tokenizer;
* open-unlearning's ``TOFU_EVAL.json`` (``forget_truth_ratio.value_by_index``): convention
  ``"open-unlearning"``; its template is not recorded (open-unlearning's phi-1.5 config is
  our ``"phi"`` preset), so only the convention is checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

ITEMS_FORMAT_PREFIX = "dualoptax.tofu_eval_items/"
ITEMS_FORMAT = ITEMS_FORMAT_PREFIX + "2"
OPEN_UNLEARNING = "open-unlearning"
_UNVERSIONED_BOUNDARY = "answer"  # every file written before the field existed


@dataclasses.dataclass(frozen=True)
class ForgetReference:
  """A reference model's forget-set truth ratios and how they were measured.

  Attributes:
    ratios: The per-item truth ratios R (in item-index order).
    answer_boundary: The answer-boundary convention.
    template: The template as recorded (``None``: not recorded).
    tokenizer: The tokenizer as recorded (``None``: not recorded).
    source: ``"dualoptax"`` or ``"open-unlearning"``.
  """

  ratios: np.ndarray
  answer_boundary: str
  template: dict[str, Any] | None
  tokenizer: dict[str, Any] | None
  source: str


def _from_open_unlearning(data: dict[str, Any]) -> ForgetReference:
  by_index = data["forget_truth_ratio"]["value_by_index"]
  ratios = np.array([by_index[k]["score"] for k in sorted(by_index, key=int)], np.float64)
  return ForgetReference(ratios, OPEN_UNLEARNING, None, None, OPEN_UNLEARNING)


def _forget_set_name(path: str, sets: dict[str, Any], set_name: str | None) -> str:
  if set_name is None:
    names = [n for n, s in sets.items() if s.get("role") == "forget"]
    if len(names) != 1:
      raise ValueError(f"{path}: expected one set with role 'forget', found {names}; pass set_name")
    return names[0]
  if set_name not in sets:
    raise ValueError(f"{path}: no set {set_name!r}; sets: {sorted(sets)}")
  return set_name


def load_forget_reference(
  path: str | os.PathLike[str], set_name: str | None = None
) -> ForgetReference:
  """The per-item forget-set truth ratios saved by an earlier evaluation, with their
  convention, template and tokenizer (see the module docstring).

  Raises:
    ValueError: Neither file kind, no (unique) forget set, or no item.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if isinstance(data, dict) and "forget_truth_ratio" in data:
    return _from_open_unlearning(data)
  if not isinstance(data, dict) or "sets" not in data:
    raise ValueError(f"{path}: neither a {ITEMS_FORMAT} file nor an open-unlearning TOFU_EVAL.json")
  name = _forget_set_name(path, data["sets"], set_name)
  ratios = np.array([row["truth_ratio"] for row in data["sets"][name]["items"]], np.float64)
  if ratios.size == 0:
    raise ValueError(f"{path}: set {name!r} has no item")
  return ForgetReference(
    ratios,
    data.get("answer_boundary", _UNVERSIONED_BOUNDARY),
    data.get("template"),
    data.get("tokenizer"),
    "dualoptax",
  )


def check_reference(
  reference: ForgetReference,
  path: str,
  *,
  answer_boundary: str | None = None,
  template: dict[str, Any] | None = None,
  tokenizer: dict[str, Any] | None = None,
) -> None:
  """Refuses a reference measured with another convention, template or tokenizer than given
  (``None`` skips that check; a reference without a recorded template or tokenizer is not
  checked for it). Tokenizers are compared by class and vocabulary size: the same
  tokenizer saved beside another model has another path.

  Raises:
    ValueError: A mismatch; the message names both values.
  """
  if answer_boundary is not None and reference.answer_boundary != answer_boundary:
    raise ValueError(
      f"forget-quality reference {path} was scored with answer boundary "
      f"{reference.answer_boundary!r} but this evaluation uses {answer_boundary!r}; truth "
      "ratios of the two conventions are not comparable (evaluate the reference model with "
      f"eval.answer_boundary={answer_boundary!r})"
    )
  if template is not None and reference.template is not None and reference.template != template:
    raise ValueError(
      f"forget-quality reference {path} was evaluated with template {reference.template} but "
      f"this evaluation uses {template}; evaluate both models with the same template"
    )
  if tokenizer is not None and reference.tokenizer is not None:
    kind = {k: reference.tokenizer.get(k) for k in _TOKENIZER_IDENTITY}
    ours = {k: tokenizer.get(k) for k in _TOKENIZER_IDENTITY}
    if kind != ours:
      raise ValueError(
        f"forget-quality reference {path} was scored with tokenizer {kind} but this "
        f"evaluation uses {ours}; token-level truth ratios of two tokenizers are not "
        "comparable"
      )


_TOKENIZER_IDENTITY = ("class", "vocab_size")


def load_forget_truth_ratios(
  path: str | os.PathLike[str],
  set_name: str | None = None,
  *,
  answer_boundary: str | None = None,
  template: dict[str, Any] | None = None,
) -> np.ndarray:
  """The per-item forget-set truth ratios R saved by an earlier evaluation.

  Reads this evaluator's per-item file (the set named ``set_name``, or its only forget set)
  or an open-unlearning ``TOFU_EVAL.json``; with ``answer_boundary`` / ``template`` given,
  refuses a file measured otherwise (:func:`check_reference`).

  Raises:
    ValueError: The file has no (unique) forget set or no truth ratios, or a mismatch.
  """
  reference = load_forget_reference(path, set_name)
  check_reference(reference, os.fspath(path), answer_boundary=answer_boundary, template=template)
  return reference.ratios
