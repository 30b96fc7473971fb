"""Three small embedded tasks of different kinds for the multi-task scenario, generated from
a seed.

``scenario=multitask`` learns K tasks as K objectives; to run offline (and to let a test
build the data in milliseconds) this module writes three tasks whose answers differ in kind,
so their gradients on a shared model partly conflict:

* ``facts``: question answering about fictitious countries, memorized ("What is the
  capital of Zarnia?" -> "The capital of Zarnia is Velmor."); sentence answers in words;
* ``arithmetic``: sums of two numbers ("What is 17 plus 25?" -> "42"); digit answers;
* ``strings``: word transformations on made-up words ("Reverse the word 'garden'." ->
  "nedrag", "Write the word 'garden' in capital letters." -> "GARDEN"); letter-level answers.

Files (JSON lines with ``question`` and ``answer``, the layout ``config.multitask``
reads): ``<task>.json`` (training rows) and ``<task>_eval.json`` (held-out rows). The
evaluation rows never repeat a training question. For ``arithmetic`` and ``strings`` they
hold out operands (unseen sums, unseen words: generalization). Fictitious facts cannot be
inferred, so ``facts`` evaluates trained facts asked in other words ("Which city is the
capital of Zarnia?"): recall through a paraphrase, as TOFU's paraphrased questions do.

The seed picks the rows and their order; each task draws from its own stream
(``numpy.random.default_rng([seed, task number])``), so changing one size leaves the other
tasks' files unchanged. The same config gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

TASKS: tuple[str, ...] = ("facts", "arithmetic", "strings")
"""The embedded tasks, in the order of ``MultitaskSection.tasks``' default."""
EVAL_SUFFIX = "_eval"
"""``<task><EVAL_SUFFIX>.json`` holds a task's held-out rows."""

Row = dict[str, str]

# Fictitious names are built from these syllables (no real country, city or coin).
_SYLLABLES = (
  "zar", "vel", "mor", "kin", "tal", "ost", "bri", "quen", "dra", "lum", "fen", "gor",
  "sil", "nar", "pel", "tho", "vra", "cel", "dun", "hy", "ix", "jo", "kel", "myr",
)  # fmt: skip
_COUNTRY_ENDINGS = ("ia", "ova", "land", "istan", "ar", "ene")
# Each relation: (question, paraphrased question, answer); {x} the country, {y} the value.
_RELATIONS: dict[str, tuple[str, str, str]] = {
  "capital": (
    "What is the capital of {x}?",
    "Which city is the capital of {x}?",
    "The capital of {x} is {y}.",
  ),
  "currency": (
    "What is the currency of {x}?",
    "Which money is used in {x}?",
    "The currency of {x} is the {y}.",
  ),
  "language": (
    "What language is spoken in {x}?",
    "Which language do people in {x} speak?",
    "People in {x} speak {y}.",
  ),
}
_STRING_OPS: dict[str, tuple[str, ...]] = {
  "reverse": ("Reverse the word '{w}'.",),
  "upper": ("Write the word '{w}' in capital letters.",),
}
_ARITHMETIC_MAX = 50  # operands in [0, 50): 2500 distinct sums to draw from
MAX_ROWS_PER_TASK = 500
"""Training plus held-out rows of a task at most: the made-up words of ``strings`` have
``24 * 23 = 552`` spellings, drawn without repeats."""


@dataclasses.dataclass(frozen=True)
class MultitaskSyntheticConfig:
  """Sizes and seed of the embedded tasks.

  Attributes:
    train_per_task: Training rows per task.
    eval_per_task: Held-out rows per task.
    seed: Seeds the names, operands and the order of rows (>= 0).
  """

  train_per_task: int = 120
  eval_per_task: int = 40
  seed: int = 0

  def __post_init__(self):
    for name in ("train_per_task", "eval_per_task"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
    # facts' eval rows are paraphrases of training facts, so they need no extra capacity.
    if self.eval_per_task > self.train_per_task:
      raise ValueError(
        f"eval_per_task must be <= train_per_task ({self.train_per_task}): facts evaluates "
        f"trained facts asked in other words, got eval_per_task={self.eval_per_task}"
      )
    if self.train_per_task + self.eval_per_task > MAX_ROWS_PER_TASK:
      raise ValueError(
        f"train_per_task + eval_per_task must be <= {MAX_ROWS_PER_TASK}, got "
        f"train_per_task={self.train_per_task}, eval_per_task={self.eval_per_task}"
      )


def _name(rng: np.random.Generator, parts: int, ending: str = "") -> str:
  syllables = rng.choice(len(_SYLLABLES), size=parts, replace=False)
  return ("".join(_SYLLABLES[i] for i in syllables) + ending).capitalize()


def _distinct_names(rng: np.random.Generator, count: int, make) -> list[str]:
  """``count`` distinct names from ``make(rng)``, in the order drawn."""
  names: dict[str, None] = {}
  while len(names) < count:
    names.setdefault(make(rng))
  return list(names)


def facts_rows(config: MultitaskSyntheticConfig, rng: np.random.Generator) -> tuple[list, list]:
  """Training rows (one per (country, relation)) and paraphrased questions on the first
  ``eval_per_task`` of them."""
  relations = list(_RELATIONS)
  countries = -(-config.train_per_task // len(relations))
  names = _distinct_names(
    rng, 3 * countries, lambda r: _name(r, 2, _COUNTRY_ENDINGS[r.integers(len(_COUNTRY_ENDINGS))])
  )
  country, capital, other = (
    names[:countries],
    names[countries : 2 * countries],
    names[2 * countries :],
  )
  values = {
    "capital": capital,
    "currency": [n.lower()[:-1] + "o" for n in other],
    "language": [n[:-1] + "ish" for n in other],
  }
  facts = [(c, rel, values[rel][i]) for i, c in enumerate(country) for rel in relations]
  order = rng.permutation(len(facts))[: config.train_per_task]
  chosen = [facts[i] for i in order]
  train = [_fact_row(_RELATIONS[rel][0], rel, x, y) for x, rel, y in chosen]
  held = [_fact_row(_RELATIONS[rel][1], rel, x, y) for x, rel, y in chosen[: config.eval_per_task]]
  return train, held


def _fact_row(question: str, relation: str, x: str, y: str) -> Row:
  return {"question": question.format(x=x), "answer": _RELATIONS[relation][2].format(x=x, y=y)}


def arithmetic_rows(
  config: MultitaskSyntheticConfig, rng: np.random.Generator
) -> tuple[list, list]:
  """Sums of distinct operand pairs; the held-out pairs are never trained on."""
  pairs = rng.permutation(_ARITHMETIC_MAX**2)[: config.eval_per_task + config.train_per_task]
  rows = [
    {"question": f"What is {a} plus {b}?", "answer": str(a + b)}
    for a, b in (divmod(int(p), _ARITHMETIC_MAX) for p in pairs)
  ]
  return rows[config.eval_per_task :], rows[: config.eval_per_task]


def strings_rows(config: MultitaskSyntheticConfig, rng: np.random.Generator) -> tuple[list, list]:
  """Word transformations; held-out rows use words no training row contains."""
  total = config.eval_per_task + config.train_per_task
  words = [w.lower() for w in _distinct_names(rng, total, lambda r: _name(r, 2))]
  ops = list(_STRING_OPS)
  rows = []
  for i, word in enumerate(words):
    op = ops[i % len(ops)]
    answer = word[::-1] if op == "reverse" else word.upper()
    rows.append({"question": _STRING_OPS[op][0].format(w=word), "answer": answer})
  return rows[config.eval_per_task :], rows[: config.eval_per_task]


_GENERATORS = {"facts": facts_rows, "arithmetic": arithmetic_rows, "strings": strings_rows}


def synthetic_multitask(config: MultitaskSyntheticConfig = MultitaskSyntheticConfig()) -> dict:
  """``{task: (train_rows, eval_rows)}`` of the embedded tasks, in :data:`TASKS` order."""
  return {
    task: _GENERATORS[task](config, np.random.default_rng([config.seed, number]))
    for number, task in enumerate(TASKS)
  }


def _write_json_lines(path: str, rows: list[Row]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_synthetic_multitask(
  folder: str | os.PathLike[str], config: MultitaskSyntheticConfig = MultitaskSyntheticConfig()
) -> dict[str, tuple[str, str]]:
  """Writes every task's ``<task>.json`` and ``<task>_eval.json`` under ``folder`` (created
  if needed); returns ``{task: (train_path, eval_path)}``."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  paths = {}
  for task, (train, held) in synthetic_multitask(config).items():
    train_path = os.path.join(folder, f"{task}.json")
    eval_path = os.path.join(folder, f"{task}{EVAL_SUFFIX}.json")
    _write_json_lines(train_path, train)
    _write_json_lines(eval_path, held)
    paths[task] = (train_path, eval_path)
  return paths


__all__ = [
  "EVAL_SUFFIX",
  "MAX_ROWS_PER_TASK",
  "TASKS",
  "MultitaskSyntheticConfig",
  "synthetic_multitask",
  "write_synthetic_multitask",
]
