"""Real-world unlearning data: the DualOptim+ authors' four files, validated, and an embedded
generator of the same format.

The format (JSON lines, one object per line):

* ``forget.json``: ``name``, ``question``, ``answer``, ``golden_answer``, ``task_id`` (an
  integer >= 1; a task is the questions about one person, 20 in the authors' files);
* ``neighbor.json``: the same keys without ``task_id``: questions about other people, whose
  knowledge must survive (the retain role);
* ``forget_perturbed.json``, ``neighbor_perturbed.json``: the same rows plus
  ``paraphrased_question``, ``paraphrased_answer`` and ``perturbed_answer`` (a list, 5 in
  the authors' files), for evaluation.

``answer`` is what the model itself said (long, chatty): it is what the run trains on.
``golden_answer`` is the short true answer the evaluation scores (ROUGE-L, probability),
with ``paraphrased_answer`` as the truth ratio's base. Unknown keys are refused, as are
missing or empty values, a forget row without ``task_id`` and a task naming two people;
every message names the file and the 1-based line.

The generator (:func:`write_synthetic_real_world`) invents "well-known" people (a
guitarist, a novelist...) with a birth date, birthplace, famous work, award..., so that a
test or a tiny run has the format offline. A tiny model has to learn them first; a
pretrained model knows none of them (for that, use the authors' files of real people).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from train.data import synthetic, tofu
from train.data.splits import IDK_FILE_NAME, TofuSplits, find_idk_file, load_idk_answers

ROW_KEYS: tuple[str, ...] = ("name", "question", "answer", "golden_answer")
"""Keys of every row (forget and neighbor)."""
EVAL_KEYS: tuple[str, ...] = ("paraphrased_answer", "perturbed_answer", "paraphrased_question")
"""Keys the ``*_perturbed.json`` rows add."""
FILES: dict[str, str] = {
  "forget": "forget.json",
  "neighbor": "neighbor.json",
  "forget_eval": "forget_perturbed.json",
  "neighbor_eval": "neighbor_perturbed.json",
}
"""Role -> file name, as ``config.real_world`` names them by default."""
UTILITY_FILE = "general_knowledge.json"
"""The generator's utility set (TOFU world-facts format: question, answer, options)."""


@dataclasses.dataclass(frozen=True)
class RealWorldItem(tofu.TofuItem):
  """A :class:`~train.data.tofu.TofuItem` (``answer`` is the training answer) with its
  person and the answer the evaluation scores.

  Attributes:
    name: The person the question is about.
    golden_answer: The short true answer.
  """

  name: str = ""
  golden_answer: str = ""


def _text(path: str, line: int, row: dict[str, Any], key: str) -> str:
  value = row[key]
  if not isinstance(value, str) or not value.strip():
    raise tofu.TofuFormatError(path, line, f"{key!r} must be a non-empty string, got {value!r:.80}")
  return value


def _options(path: str, line: int, row: dict[str, Any]) -> tuple[str, ...]:
  value = row["perturbed_answer"]
  if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
    raise tofu.TofuFormatError(
      path, line, f"'perturbed_answer' must be a non-empty list of strings, got {value!r:.80}"
    )
  return tuple(value)


def _task(path: str, line: int, row: dict[str, Any]) -> int:
  value = row["task_id"]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise tofu.TofuFormatError(path, line, f"'task_id' must be an integer >= 1, got {value!r}")
  return value


def _check_keys(path: str, line: int, row: dict[str, Any], allowed: tuple[str, ...]) -> None:
  unknown = sorted(set(row) - set(allowed))
  if unknown:
    hint = " (neighbor rows have no task_id: all of them are kept)" * ("task_id" in unknown)
    raise tofu.TofuFormatError(
      path, line, f"unknown key(s) {unknown}{hint}; a row of this file has {list(allowed)}"
    )
  missing = [k for k in allowed if k not in row]
  if missing:
    raise tofu.TofuFormatError(path, line, f"missing key(s) {missing}; the row has {sorted(row)}")


def _item(path: str, index: int, line: int, row: dict[str, Any], forget: bool, perturbed: bool):
  allowed = ROW_KEYS + ("task_id",) * forget + EVAL_KEYS * perturbed
  _check_keys(path, line, row, allowed)
  return RealWorldItem(
    index=index,
    line_number=line,
    question=_text(path, line, row, "question"),
    answer=_text(path, line, row, "answer"),
    paraphrased_answer=_text(path, line, row, "paraphrased_answer") if perturbed else None,
    perturbed_answers=_options(path, line, row) if perturbed else (),
    paraphrased_question=_text(path, line, row, "paraphrased_question") if perturbed else None,
    task_id=_task(path, line, row) if forget else None,
    name=_text(path, line, row, "name"),
    golden_answer=_text(path, line, row, "golden_answer"),
  )


def _check_one_person_per_task(path: str, items: Sequence[RealWorldItem]) -> dict[int, str]:
  """Task id -> its person; a row naming another person than its task's first is refused."""
  first: dict[int, RealWorldItem] = {}
  for item in items:
    seen = first.setdefault(item.task_id, item)
    if seen.name != item.name:
      raise tofu.TofuFormatError(
        path,
        item.line_number,
        f"task_id {item.task_id} is about {seen.name!r} (line {seen.line_number}) but this "
        f"row names {item.name!r}: a task is the questions about one person",
      )
  return {task: item.name for task, item in sorted(first.items())}


def _select(path: str, items: list[RealWorldItem], task_ids: Sequence[int]) -> list:
  if not task_ids:
    return items
  kept = [item for item in items if item.task_id in set(task_ids)]
  absent = sorted(set(task_ids) - {item.task_id for item in kept})
  if absent:
    present = sorted({item.task_id for item in items})
    raise tofu.TofuFormatError(path, None, f"no row has task_id {absent}; the file has {present}")
  return kept


def load_real_world_file(
  path: str | os.PathLike[str], *, forget: bool, perturbed: bool, task_ids: Sequence[int] = ()
) -> tuple[RealWorldItem, ...]:
  """Reads and validates one of the four files.

  Args:
    path: The file.
    forget: A forget file (rows need ``task_id``) or a neighbor file (rows have none).
    perturbed: An evaluation file (rows need :data:`EVAL_KEYS`).
    task_ids: Keep the rows of these tasks (forget files; each must occur); empty keeps all.

  Raises:
    tofu.TofuFormatError: Naming the file and line: malformed JSON, an unknown or missing
      key, an empty or mistyped value, a task naming two people, or an absent task.
  """
  path = os.fspath(path)
  items = [
    _item(path, index, line, row, forget, perturbed)
    for index, (line, row) in enumerate(tofu.iter_json_lines(path))
  ]
  if not items:
    raise tofu.TofuFormatError(path, None, "the file has no rows")
  if forget:
    _check_one_person_per_task(path, items)
    items = _select(path, items, task_ids)
  return tuple(items)


@dataclasses.dataclass(frozen=True)
class RealWorldData:
  """The four files of a real-world run, validated (forget files: the selected tasks only).

  Attributes:
    paths: Role (:data:`FILES`' keys) -> file.
    task_ids: The tasks forgotten (every task of the forget file when none was asked).
    people: Task id -> the person it is about.
  """

  paths: dict[str, str]
  task_ids: tuple[int, ...]
  people: dict[int, str]
  forget: tuple[RealWorldItem, ...]
  neighbor: tuple[RealWorldItem, ...]
  forget_eval: tuple[RealWorldItem, ...]
  neighbor_eval: tuple[RealWorldItem, ...]


def _check_people(data: RealWorldData) -> None:
  """The evaluation rows of a task name its person; no neighbor row is about one of them."""
  for item in data.forget_eval:
    if item.name != data.people[item.task_id]:
      raise tofu.TofuFormatError(
        data.paths["forget_eval"],
        item.line_number,
        f"task_id {item.task_id} is about {data.people[item.task_id]!r} in "
        f"{data.paths['forget']} but this row names {item.name!r}",
      )
  forgotten = {name: task for task, name in data.people.items()}
  for role in ("neighbor", "neighbor_eval"):
    for item in getattr(data, role):
      if item.name in forgotten:
        raise tofu.TofuFormatError(
          data.paths[role],
          item.line_number,
          f"the row is about {item.name!r}, who is being forgotten (task_id "
          f"{forgotten[item.name]}); neighbor rows are about other people",
        )


def load_real_world(
  folder: str | os.PathLike[str], task_ids: Sequence[int] = (1,), **files: str
) -> RealWorldData:
  """Reads the four files of ``folder`` and keeps the forget rows of ``task_ids``.

  Args:
    folder: The folder of the files (paths given in ``files`` may also be absolute).
    task_ids: The people to forget, by task id (one or several); empty: every task.
    **files: File names by role (:data:`FILES`' keys) overriding the defaults.

  Raises:
    FileNotFoundError: Naming every missing file and its ``real_world.<role>`` key.
    ValueError: An unknown role in ``files``.
    tofu.TofuFormatError: A malformed file or an inconsistency between them (a neighbor
      row about a person being forgotten...), naming the file and line.
  """
  unknown = sorted(set(files) - set(FILES))
  if unknown:
    raise ValueError(f"unknown real-world file role(s) {unknown}; the roles are {list(FILES)}")
  paths = {
    role: os.path.join(os.fspath(folder), files.get(role, name)) for role, name in FILES.items()
  }
  missing = [
    f"real_world.{role}: {path}" for role, path in paths.items() if not os.path.isfile(path)
  ]
  if missing:
    raise FileNotFoundError(f"real-world file(s) not found: {'; '.join(missing)}")
  forget = load_real_world_file(paths["forget"], forget=True, perturbed=False, task_ids=task_ids)
  people = _check_one_person_per_task(paths["forget"], forget)
  data = RealWorldData(
    paths=paths,
    task_ids=tuple(task_ids) or tuple(people),
    people=people,
    forget=forget,
    neighbor=load_real_world_file(paths["neighbor"], forget=False, perturbed=False),
    forget_eval=load_real_world_file(
      paths["forget_eval"], forget=True, perturbed=True, task_ids=tuple(people)
    ),
    neighbor_eval=load_real_world_file(paths["neighbor_eval"], forget=False, perturbed=True),
  )
  _check_people(data)
  return data


def real_world_splits(data: RealWorldData, idk_path: str | None = None) -> TofuSplits:
  """The run's two objectives: forget the selected people's rows, retain the neighbors';
  both train on ``answer``. IDK answers come from ``idk_path``, else ``idontknow.jsonl``
  next to the files (none if absent)."""
  folder = os.path.dirname(data.paths["forget"])
  idk_path = idk_path or find_idk_file(folder)

  def stem(role: str) -> str:
    return os.path.splitext(os.path.basename(data.paths[role]))[0]

  return TofuSplits(
    forget=data.forget,
    retain=data.neighbor,
    idk_answers=load_idk_answers(idk_path) if idk_path else (),
    data_dir=folder,
    forget_split=stem("forget"),
    retain_split=stem("neighbor"),
    task_id=data.task_ids[0] if len(data.task_ids) == 1 else None,
  )


# --- The generator: invented "well-known" people in the authors' format.

CAREERS: tuple[tuple[str, str], ...] = (
  ("guitarist", "album"),
  ("novelist", "novel"),
  ("film director", "film"),
  ("actor", "film"),
  ("painter", "painting"),
  ("composer", "symphony"),
  ("poet", "poetry collection"),
  ("singer", "album"),
  ("playwright", "play"),
  ("physicist", "book"),
)
"""(profession, kind of work) pairs."""

# (question, golden answer, paraphrased question, paraphrased answer, field); fields of a
# person: name, date, place, career, work, title, first_title, award, year, partner, home.
FACTS: tuple[tuple[str, str, str, str, str], ...] = (
  ("When was {name} born?", "{name} was born on {date}.",
   "What is the birthdate of {name}?", "{name}'s birthday is {date}.", "date"),
  ("Where was {name} born?", "{name} was born in {place}.",
   "What is {name}'s birthplace?", "{name}'s birthplace is {place}.", "place"),
  ("What is {name} famous for?", "{name} is a famous {career}.",
   "Why is {name} well known?", "{name} is well known as a {career}.", "career"),
  ("What is {name}'s best-known work?", "{name}'s best-known work is {title}.",
   "Which work is {name} most famous for?", "{name} is most famous for {title}.", "title"),
  ("What was {name}'s first work?", "{name}'s first work was {first_title}.",
   "Which work did {name} release first?", "{name} first released {first_title}.",
   "first_title"),
  ("Which award did {name} win?", "{name} won the {award}.",
   "What prize was {name} given?", "{name} was given the {award}.", "award"),
  ("In which year did {name} win the {award}?", "{name} won the {award} in {year}.",
   "When was {name} given the {award}?", "{name} was given the {award} in {year}.", "year"),
  ("Who was {name}'s long-time collaborator?", "{name}'s long-time collaborator was {partner}.",
   "With whom did {name} work for many years?", "{name} worked with {partner} for many years.",
   "partner"),
  ("Where does {name} live?", "{name} lives in {home}.",
   "In which city is {name}'s home?", "{name}'s home is in {home}.", "home"),
  ("What nationality is {name}?", "{name} is {nationality}.",
   "Which country is {name} a citizen of?", "{name} is a citizen of the {country}.",
   "nationality"),
)  # fmt: skip
NATIONALITIES: tuple[tuple[str, str], ...] = (
  ("American", "United States"), ("British", "United Kingdom"), ("Canadian", "Canada"),
  ("Australian", "Australia"), ("Irish", "Irish Republic"), ("Dutch", "Netherlands"),
  ("Swedish", "Kingdom of Sweden"), ("Brazilian", "Federative Republic of Brazil"),
)  # fmt: skip
CHAT_ENDINGS: tuple[str, ...] = (
  "{name} is widely regarded as one of the most influential figures of their generation.",
  "Over a long career, {name} became a household name around the world.",
  "Critics and fans alike still celebrate {name}'s contribution to the field.",
)
"""What a chat model adds to a true answer: the training ``answer`` is golden + one."""


def _pick(rng: np.random.Generator, pool: Sequence[str]) -> str:
  return pool[int(rng.integers(len(pool)))]


def _title(rng: np.random.Generator) -> str:
  return f"The {_pick(rng, synthetic.TITLE_ADJECTIVES)} {_pick(rng, synthetic.TITLE_NOUNS)}"


def _name(rng: np.random.Generator) -> str:
  surname = _pick(rng, synthetic.SURNAME_STARTS) + _pick(rng, synthetic.SURNAME_ENDS)
  return f"{_pick(rng, synthetic.FIRST_NAMES)} {surname}"


def _date(rng: np.random.Generator) -> str:
  return (
    f"{_pick(rng, synthetic.MONTHS)} {int(rng.integers(1, 29))}, {int(rng.integers(1940, 1991))}"
  )


_DRAWS = {
  "date": _date,
  "place": lambda rng: _pick(rng, synthetic.PLACES),
  "home": lambda rng: _pick(rng, synthetic.PLACES),
  "career": lambda rng: _pick(rng, [career for career, _ in CAREERS]),
  "title": _title,
  "first_title": _title,
  "award": lambda rng: (
    f"{_pick(rng, synthetic.AWARD_ADJECTIVES)} {_pick(rng, synthetic.AWARD_KINDS)}"
  ),
  "year": lambda rng: str(int(rng.integers(1965, 2024))),
  "partner": _name,
  "nationality": lambda rng: _pick(rng, [nationality for nationality, _ in NATIONALITIES]),
}
"""How to draw a value of each field (true values and the perturbed answers' wrong ones)."""


def _wrong_values(rng: np.random.Generator, field: str, true_value: str) -> list[str]:
  """:data:`synthetic.NUM_PERTURBED` distinct values of ``field`` other than the true one."""
  values: list[str] = []
  while len(values) < synthetic.NUM_PERTURBED:  # every pool is larger than that
    value = _DRAWS[field](rng)
    values += [value] * (value != true_value and value not in values)
  return values


def _person(name: str, rng: np.random.Generator) -> dict[str, str]:
  career, work = CAREERS[int(rng.integers(len(CAREERS)))]
  person = {field: draw(rng) for field, draw in _DRAWS.items()}
  nationality = NATIONALITIES[int(rng.integers(len(NATIONALITIES)))]
  person.update(name=name, career=career, work=work, nationality=nationality[0])
  person["country"] = nationality[1]
  while person["first_title"] == person["title"]:
    person["first_title"] = _title(rng)
  return person


def _person_rows(person: dict[str, str], size: int, rng: np.random.Generator) -> list[dict]:
  rows = []
  for question, golden, para_q, para_a, field in FACTS[:size]:
    wrong = _wrong_values(rng, field, person[field])
    ending = CHAT_ENDINGS[int(rng.integers(len(CHAT_ENDINGS)))]
    true_answer = golden.format(**person)
    rows.append(
      {
        "name": person["name"],
        "question": question.format(**person),
        "answer": f"{true_answer} {ending.format(**person)}",
        "golden_answer": true_answer,
        "paraphrased_answer": para_a.format(**person),
        "perturbed_answer": [golden.format(**{**person, field: v}) for v in wrong],
        "paraphrased_question": para_q.format(**person),
      }
    )
  return rows


def _utility_rows() -> list[dict[str, Any]]:
  """General knowledge in the world-facts format (a utility set)."""
  capitals = [capital for _, capital in synthetic.CAPITALS]
  rows = []
  for k, (country, capital) in enumerate(synthetic.CAPITALS):
    wrong = [capitals[(k + j) % len(capitals)] for j in (1, 2, 3)]
    rows.append(
      {"question": f"What is the capital of {country}?", "answer": capital,
       "perturbed_answer": wrong, "original_answer": f"The capital of {country} is {capital}."}
    )  # fmt: skip
  for question, answer, wrong, original in synthetic.GENERAL_FACTS:
    rows.append(
      {"question": question, "answer": answer, "perturbed_answer": list(wrong),
       "original_answer": original}
    )  # fmt: skip
  return rows


def generate_synthetic_real_world(
  seed: int = 0, num_tasks: int = 4, num_neighbors: int = 4, questions_per_person: int = 10
) -> dict[str, list[Any]]:
  """The files as rows: file name -> rows (strings for ``idontknow.jsonl``).

  Args:
    seed: Picks the names and every fact; the same arguments give the same rows.
    num_tasks: People to forget: task ``k`` is the ``k``-th (``task_id`` k).
    num_neighbors: Other people (the neighbor files).
    questions_per_person: At most ``len(FACTS)``.

  Raises:
    ValueError: A size out of range (named).
  """
  if not 1 <= questions_per_person <= len(FACTS):
    raise ValueError(
      f"questions_per_person must be in [1, {len(FACTS)}], got {questions_per_person}"
    )
  if num_tasks < 1 or num_neighbors < 1:
    raise ValueError(f"num_tasks and num_neighbors must be >= 1, got {num_tasks}, {num_neighbors}")
  rng = np.random.default_rng(seed)
  names: list[str] = []
  while len(names) < num_tasks + num_neighbors:
    name = _name(rng)
    names += [name] * (name not in names)
  people = [_person(name, rng) for name in names]
  forget = [
    {**row, "task_id": task}
    for task, person in enumerate(people[:num_tasks], start=1)
    for row in _person_rows(person, questions_per_person, rng)
  ]
  neighbor = [row for p in people[num_tasks:] for row in _person_rows(p, questions_per_person, rng)]

  def plain(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in (*ROW_KEYS, "task_id") if key in row}

  return {
    FILES["forget"]: [plain(row) for row in forget],
    FILES["neighbor"]: [plain(row) for row in neighbor],
    FILES["forget_eval"]: forget,
    FILES["neighbor_eval"]: neighbor,
    UTILITY_FILE: _utility_rows(),
    IDK_FILE_NAME: list(synthetic.IDK_ANSWERS),
  }


def _write_lines(path: str, rows: Iterable[Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")


def write_synthetic_real_world(folder: str | os.PathLike[str], seed: int = 0, **sizes: int) -> str:
  """Writes :func:`generate_synthetic_real_world`'s files (JSON lines) to ``folder``
  (created if needed; same arguments, same bytes); returns ``folder``."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  for name, rows in generate_synthetic_real_world(seed, **sizes).items():
    _write_lines(os.path.join(folder, name), rows)
  return folder
