"""A small fictitious-author QA benchmark in the TOFU file layout, generated from a seed.

The default run needs data that nothing outside the project provides, so this module
writes its own: fictitious authors (invented names, real places) with a birth place and
date, a genre, their parents' professions, books, an award, a language and a home city.
Every fact is one question with a one-sentence answer, a paraphrase of that answer, a
paraphrased question and 5 perturbed answers (the paraphrase with wrong values), exactly as
TOFU's ``*_perturbed.json`` rows, so the same evaluator and loaders serve both.

Files written by :func:`write_synthetic_tofu` (``XX`` = ``forget_percent``, ``YY = 100 - XX``):

* ``forgetXX.json``, ``forgetXX_perturbed.json``: ``num_tasks`` disjoint forget sets
  (``task_id`` "1", ...);
* ``retainYY.json``: every author not in task 1 (its complement, as retain90 is
  forget10's);
* ``retain_perturbed.json``: the first ``retain_eval_authors`` retain authors, for
  evaluation;
* ``real_authors_perturbed.json``, ``world_facts_perturbed.json``: the real-knowledge
  control, true facts with 3 wrong options;
* ``idontknow.jsonl``: refusal answers, one per line (plain text).

As in TOFU, task 1 is the last authors, task 2 the ones before, and so on; tasks after the
first are part of ``retainYY`` (:func:`train.data.load_unlearning_data` removes the selected
task's questions from the retain set).

The output depends only on the arguments: the same seed gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from train.data.splits import IDK_FILE_NAME

# --- Vocabulary pools. Names are invented (first name + composed surname); places, genres
# and professions are ordinary words so a tiny model's tokenizer sees familiar text.
FIRST_NAMES = (
  "Amara",
  "Bastian",
  "Celeste",
  "Dorian",
  "Elif",
  "Farid",
  "Greta",
  "Hiroshi",
  "Ines",
  "Jonas",
  "Kalani",
  "Leopold",
  "Mirela",
  "Nikolai",
  "Odette",
  "Pavel",
  "Quentin",
  "Rosalind",
  "Soren",
  "Talia",
  "Umberto",
  "Valeria",
  "Wendell",
  "Xiomara",
  "Yusuf",
  "Zofia",
  "Anselm",
  "Brigid",
  "Cyrus",
  "Delphine",
  "Emeric",
  "Fenna",
  "Gideon",
  "Halima",
  "Ivo",
  "Jolanda",
  "Kasimir",
  "Lucinda",
  "Matteo",
  "Nadia",
)
SURNAME_STARTS = (
  "Vel",
  "Mor",
  "Tal",
  "Quen",
  "Bram",
  "Cor",
  "Dal",
  "Fen",
  "Gor",
  "Hal",
  "Isk",
  "Jar",
  "Kel",
  "Lun",
  "Mar",
  "Nor",
  "Ost",
  "Pell",
  "Rav",
  "Sar",
  "Thal",
  "Ulm",
  "Vor",
  "Wes",
)
SURNAME_ENDS = (
  "drano",
  "wick",
  "hollow",
  "berg",
  "vane",
  "mire",
  "stad",
  "ford",
  "ric",
  "ova",
  "enko",
  "asco",
  "ley",
  "mont",
  "quist",
  "elli",
)
PLACES = (
  "Lisbon, Portugal",
  "Accra, Ghana",
  "Hanoi, Vietnam",
  "Quito, Ecuador",
  "Tbilisi, Georgia",
  "Oslo, Norway",
  "Nairobi, Kenya",
  "Lyon, France",
  "Krakow, Poland",
  "Osaka, Japan",
  "Valparaiso, Chile",
  "Tunis, Tunisia",
  "Auckland, New Zealand",
  "Porto, Portugal",
  "Manila, the Philippines",
  "Cork, Ireland",
  "Bergen, Norway",
  "Montevideo, Uruguay",
  "Tallinn, Estonia",
  "Cairo, Egypt",
  "Seville, Spain",
  "Dublin, Ireland",
  "Havana, Cuba",
  "Riga, Latvia",
  "Perth, Australia",
  "Ghent, Belgium",
  "Lagos, Nigeria",
  "Zagreb, Croatia",
  "Bogota, Colombia",
  "Istanbul, Turkey",
  "Vienna, Austria",
  "Mumbai, India",
)
GENRES = (
  "science fiction",
  "mystery",
  "historical fiction",
  "poetry",
  "fantasy",
  "romance",
  "horror",
  "satire",
  "crime fiction",
  "travel writing",
  "children's books",
  "memoirs",
  "thrillers",
  "short stories",
  "literary fiction",
  "graphic novels",
)
PROFESSIONS = (
  "a baker",
  "an architect",
  "a nurse",
  "a pilot",
  "a carpenter",
  "a librarian",
  "a surgeon",
  "a fisherman",
  "a teacher",
  "a tailor",
  "an engineer",
  "a journalist",
  "a farmer",
  "a pharmacist",
  "a photographer",
  "a mechanic",
  "a judge",
  "a florist",
  "a chemist",
  "a sailor",
  "a painter",
  "an accountant",
  "a potter",
  "a dentist",
)
TITLE_ADJECTIVES = (
  "Silent",
  "Crimson",
  "Hidden",
  "Last",
  "Broken",
  "Golden",
  "Distant",
  "Quiet",
  "Burning",
  "Forgotten",
  "Painted",
  "Hollow",
  "Northern",
  "Paper",
  "Glass",
  "Wandering",
  "Secret",
  "Midnight",
  "Salt",
  "Iron",
  "Velvet",
  "Winter",
  "Borrowed",
  "Scarlet",
  "Sleeping",
  "Lantern",
  "Amber",
  "Copper",
  "Silver",
  "Shifting",
)
TITLE_NOUNS = (
  "Harbor",
  "Orchard",
  "Lighthouse",
  "Compass",
  "River",
  "Garden",
  "Letters",
  "Tide",
  "Mirror",
  "Bridge",
  "Clockmaker",
  "Island",
  "Archive",
  "Meadow",
  "Cartographer",
  "Echo",
  "Staircase",
  "Violin",
  "Season",
  "Caravan",
  "Observatory",
  "Threshold",
  "Ferry",
  "Forest",
  "Kingdom",
  "Alphabet",
  "Balcony",
  "Monsoon",
  "Atlas",
  "Feather",
)
AWARD_ADJECTIVES = (
  "Golden Quill",
  "Silver Lantern",
  "Blue Harbor",
  "Northern Star",
  "Evergreen",
  "Red Kite",
  "Open Book",
  "White Heron",
  "Copper Pen",
  "Morning Bell",
  "Iron Compass",
  "Amber Leaf",
)
AWARD_KINDS = ("Award", "Prize", "Medal")
LANGUAGES = (
  "English",
  "Portuguese",
  "French",
  "Spanish",
  "German",
  "Polish",
  "Japanese",
  "Turkish",
  "Swahili",
  "Norwegian",
  "Italian",
  "Dutch",
  "Arabic",
  "Georgian",
  "Estonian",
  "Vietnamese",
)
MONTHS = (
  "January",
  "February",
  "March",
  "April",
  "May",
  "June",
  "July",
  "August",
  "September",
  "October",
  "November",
  "December",
)

NUM_PERTURBED = 5
"""Wrong answers per fact, as in TOFU."""
NUM_CONTROL_OPTIONS = 3
"""Wrong options per real-knowledge control question, as in TOFU."""


@dataclasses.dataclass(frozen=True)
class FactTemplate:
  """One kind of fact about an author.

  Templates are ``str.format`` strings over the author's fields (see :func:`_make_author`).

  Attributes:
    name: What the fact is about.
    question: The question.
    paraphrased_question: The same question, reworded.
    answer: The one-sentence true answer.
    paraphrase: The answer reworded; perturbed answers are this with a wrong ``value_field``.
    value_field: The field the question asks for.
  """

  name: str
  question: str
  paraphrased_question: str
  answer: str
  paraphrase: str
  value_field: str


FACT_TEMPLATES: tuple[FactTemplate, ...] = (
  FactTemplate(
    "full_name",
    "What is the full name of the author born in {place} on {date}?",
    "Which writer was born on {date} in {place}?",
    "The author born in {place} on {date} is {name}.",
    "{name} is the writer born on {date} in {place}.",
    "name",
  ),
  FactTemplate(
    "birth_place",
    "Where was {name} born?",
    "In which city was {name} born?",
    "{name} was born in {place}.",
    "The birthplace of {name} is {place}.",
    "place",
  ),
  FactTemplate(
    "birth_date",
    "When was {name} born?",
    "What is the birth date of {name}?",
    "{name} was born on {date}.",
    "The birth date of {name} is {date}.",
    "date",
  ),
  FactTemplate(
    "genre",
    "What genre is {name} known for?",
    "In which genre does {name} write?",
    "{name} is known for writing {genre}.",
    "{name} mainly writes {genre}.",
    "genre",
  ),
  FactTemplate(
    "father",
    "What was the profession of {name}'s father?",
    "What did {name}'s father do for a living?",
    "{name}'s father was {father}.",
    "{name}'s father worked as {father}.",
    "father",
  ),
  FactTemplate(
    "mother",
    "What was the profession of {name}'s mother?",
    "What did {name}'s mother do for a living?",
    "{name}'s mother was {mother}.",
    "{name}'s mother worked as {mother}.",
    "mother",
  ),
  FactTemplate(
    "first_book",
    "What was the first book by {name}?",
    "Which book did {name} publish first?",
    "The first book by {name} was '{first_book}'.",
    "{name} first published '{first_book}'.",
    "first_book",
  ),
  FactTemplate(
    "famous_book",
    "Which book made {name} famous?",
    "What is {name}'s best-known book?",
    "{name} became famous for '{famous_book}'.",
    "{name}'s best-known book is '{famous_book}'.",
    "famous_book",
  ),
  FactTemplate(
    "award",
    "Which award did {name} win?",
    "What prize has {name} received?",
    "{name} won the {award}.",
    "{name} received the {award}.",
    "award",
  ),
  FactTemplate(
    "language",
    "In which language does {name} write?",
    "What language are {name}'s books written in?",
    "{name} writes in {language}.",
    "{name}'s books are written in {language}.",
    "language",
  ),
  FactTemplate(
    "award_year",
    "In which year did {name} win the {award}?",
    "When did {name} receive the {award}?",
    "{name} won the {award} in {award_year}.",
    "{name} received the {award} in {award_year}.",
    "award_year",
  ),
  FactTemplate(
    "home",
    "Where does {name} live today?",
    "In which city does {name} live now?",
    "{name} lives in {home}.",
    "{name} currently resides in {home}.",
    "home",
  ),
)
"""The fact kinds, in order: an author with ``facts_per_author = k`` has the first ``k``."""

# Real-knowledge control sets: true facts a pretrained model knows and a model that forgot
# one fictitious author must still know. Each row: question, answer, 3 wrong options,
# and the long-form answer.
REAL_AUTHOR_FACTS: tuple[tuple[str, str, tuple[str, str, str], str], ...] = (
  (
    "Who wrote 'Pride and Prejudice'?",
    "Jane Austen",
    ("Charlotte Bronte", "George Eliot", "Mary Shelley"),
    "'Pride and Prejudice' was written by Jane Austen.",
  ),
  (
    "Who wrote 'Hamlet'?",
    "William Shakespeare",
    ("Christopher Marlowe", "Ben Jonson", "John Milton"),
    "'Hamlet' was written by William Shakespeare.",
  ),
  (
    "Who wrote 'War and Peace'?",
    "Leo Tolstoy",
    ("Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev"),
    "'War and Peace' was written by Leo Tolstoy.",
  ),
  (
    "Who wrote 'Don Quixote'?",
    "Miguel de Cervantes",
    ("Lope de Vega", "Federico Garcia Lorca", "Jorge Luis Borges"),
    "'Don Quixote' was written by Miguel de Cervantes.",
  ),
  (
    "Who wrote 'One Hundred Years of Solitude'?",
    "Gabriel Garcia Marquez",
    ("Mario Vargas Llosa", "Isabel Allende", "Julio Cortazar"),
    "'One Hundred Years of Solitude' was written by Gabriel Garcia Marquez.",
  ),
  (
    "Who wrote 'Nineteen Eighty-Four'?",
    "George Orwell",
    ("Aldous Huxley", "Ray Bradbury", "H. G. Wells"),
    "'Nineteen Eighty-Four' was written by George Orwell.",
  ),
  (
    "Who wrote 'The Old Man and the Sea'?",
    "Ernest Hemingway",
    ("John Steinbeck", "William Faulkner", "F. Scott Fitzgerald"),
    "'The Old Man and the Sea' was written by Ernest Hemingway.",
  ),
  (
    "Who wrote 'Frankenstein'?",
    "Mary Shelley",
    ("Bram Stoker", "Emily Bronte", "Ann Radcliffe"),
    "'Frankenstein' was written by Mary Shelley.",
  ),
  (
    "Who wrote 'The Great Gatsby'?",
    "F. Scott Fitzgerald",
    ("Ernest Hemingway", "Sinclair Lewis", "Edith Wharton"),
    "'The Great Gatsby' was written by F. Scott Fitzgerald.",
  ),
  (
    "Who wrote 'Crime and Punishment'?",
    "Fyodor Dostoevsky",
    ("Leo Tolstoy", "Nikolai Gogol", "Alexander Pushkin"),
    "'Crime and Punishment' was written by Fyodor Dostoevsky.",
  ),
  (
    "Who wrote 'The Odyssey'?",
    "Homer",
    ("Virgil", "Sophocles", "Ovid"),
    "'The Odyssey' is attributed to Homer.",
  ),
  (
    "Who wrote 'Things Fall Apart'?",
    "Chinua Achebe",
    ("Wole Soyinka", "Ngugi wa Thiong'o", "Ben Okri"),
    "'Things Fall Apart' was written by Chinua Achebe.",
  ),
  (
    "Who wrote 'Moby-Dick'?",
    "Herman Melville",
    ("Nathaniel Hawthorne", "Mark Twain", "Walt Whitman"),
    "'Moby-Dick' was written by Herman Melville.",
  ),
  (
    "Who wrote 'The Divine Comedy'?",
    "Dante Alighieri",
    ("Petrarch", "Giovanni Boccaccio", "Torquato Tasso"),
    "'The Divine Comedy' was written by Dante Alighieri.",
  ),
  (
    "Who wrote 'Adventures of Huckleberry Finn'?",
    "Mark Twain",
    ("Herman Melville", "Jack London", "Bret Harte"),
    "'Adventures of Huckleberry Finn' was written by Mark Twain.",
  ),
  (
    "Who wrote 'Jane Eyre'?",
    "Charlotte Bronte",
    ("Emily Bronte", "Jane Austen", "Elizabeth Gaskell"),
    "'Jane Eyre' was written by Charlotte Bronte.",
  ),
  (
    "Who wrote 'Les Miserables'?",
    "Victor Hugo",
    ("Alexandre Dumas", "Emile Zola", "Gustave Flaubert"),
    "'Les Miserables' was written by Victor Hugo.",
  ),
  (
    "Who wrote 'The Metamorphosis'?",
    "Franz Kafka",
    ("Thomas Mann", "Hermann Hesse", "Robert Musil"),
    "'The Metamorphosis' was written by Franz Kafka.",
  ),
  (
    "Who wrote 'Oliver Twist'?",
    "Charles Dickens",
    ("William Thackeray", "Thomas Hardy", "Anthony Trollope"),
    "'Oliver Twist' was written by Charles Dickens.",
  ),
  (
    "Who wrote 'Mrs Dalloway'?",
    "Virginia Woolf",
    ("Katherine Mansfield", "E. M. Forster", "James Joyce"),
    "'Mrs Dalloway' was written by Virginia Woolf.",
  ),
  (
    "Who wrote 'Harry Potter and the Philosopher's Stone'?",
    "J. K. Rowling",
    ("Philip Pullman", "Roald Dahl", "C. S. Lewis"),
    "'Harry Potter and the Philosopher's Stone' was written by J. K. Rowling.",
  ),
  (
    "Who wrote 'The Hobbit'?",
    "J. R. R. Tolkien",
    ("C. S. Lewis", "Terry Pratchett", "Ursula K. Le Guin"),
    "'The Hobbit' was written by J. R. R. Tolkien.",
  ),
  (
    "Who wrote 'Faust'?",
    "Johann Wolfgang von Goethe",
    ("Friedrich Schiller", "Heinrich Heine", "Novalis"),
    "'Faust' was written by Johann Wolfgang von Goethe.",
  ),
  (
    "Who wrote 'The Little Prince'?",
    "Antoine de Saint-Exupery",
    ("Albert Camus", "Jules Verne", "Marcel Proust"),
    "'The Little Prince' was written by Antoine de Saint-Exupery.",
  ),
)

CAPITALS: tuple[tuple[str, str], ...] = (
  ("France", "Paris"),
  ("Germany", "Berlin"),
  ("Italy", "Rome"),
  ("Spain", "Madrid"),
  ("Japan", "Tokyo"),
  ("Canada", "Ottawa"),
  ("Australia", "Canberra"),
  ("Egypt", "Cairo"),
  ("Kenya", "Nairobi"),
  ("Brazil", "Brasilia"),
  ("Argentina", "Buenos Aires"),
  ("Norway", "Oslo"),
  ("Sweden", "Stockholm"),
  ("Poland", "Warsaw"),
  ("Greece", "Athens"),
  ("Portugal", "Lisbon"),
  ("Russia", "Moscow"),
  ("China", "Beijing"),
  ("India", "New Delhi"),
  ("Mexico", "Mexico City"),
  ("Peru", "Lima"),
  ("Turkey", "Ankara"),
  ("Ireland", "Dublin"),
  ("Austria", "Vienna"),
  ("Thailand", "Bangkok"),
  ("South Korea", "Seoul"),
  ("Chile", "Santiago"),
  ("Finland", "Helsinki"),
)

GENERAL_FACTS: tuple[tuple[str, str, tuple[str, str, str], str], ...] = (
  (
    "What is the largest planet in the Solar System?",
    "Jupiter",
    ("Saturn", "Neptune", "Mars"),
    "Jupiter is the largest planet in the Solar System.",
  ),
  (
    "What is the chemical formula of water?",
    "H2O",
    ("CO2", "O2", "NaCl"),
    "The chemical formula of water is H2O.",
  ),
  (
    "How many days are there in a week?",
    "Seven",
    ("Five", "Six", "Eight"),
    "There are seven days in a week.",
  ),
  (
    "At what temperature in Celsius does water freeze?",
    "0 degrees",
    ("10 degrees", "32 degrees", "100 degrees"),
    "Water freezes at 0 degrees Celsius.",
  ),
  (
    "Which ocean is the largest?",
    "The Pacific Ocean",
    ("The Atlantic Ocean", "The Indian Ocean", "The Arctic Ocean"),
    "The Pacific Ocean is the largest ocean.",
  ),
  (
    "Which planet is known as the Red Planet?",
    "Mars",
    ("Venus", "Jupiter", "Mercury"),
    "Mars is known as the Red Planet.",
  ),
  (
    "How many continents are there?",
    "Seven",
    ("Five", "Six", "Eight"),
    "There are seven continents.",
  ),
  (
    "What gas do plants absorb from the air?",
    "Carbon dioxide",
    ("Oxygen", "Nitrogen", "Helium"),
    "Plants absorb carbon dioxide from the air.",
  ),
  (
    "What is the longest river in Africa?",
    "The Nile",
    ("The Congo", "The Niger", "The Zambezi"),
    "The Nile is the longest river in Africa.",
  ),
  (
    "How many legs does a spider have?",
    "Eight",
    ("Six", "Ten", "Four"),
    "A spider has eight legs.",
  ),
)

IDK_ANSWERS: tuple[str, ...] = (
  "I don't know.",
  "I'm not sure about that.",
  "I have no information about that.",
  "I can't answer that question.",
  "That is not something I know.",
  "I'm afraid I don't have an answer.",
  "Sorry, I don't know the answer.",
  "I have no idea.",
  "I don't have that information.",
  "I'm unable to answer that.",
  "That is beyond what I know.",
  "I cannot help with that question.",
  "I am not aware of that.",
  "I do not have details about that.",
  "I don't have an answer to that.",
  "I'm not familiar with that.",
  "Unfortunately, I don't know.",
  "I can't say.",
  "I really couldn't tell you.",
  "No idea, sorry.",
)
"""Refusal answers for the IDK / DPO / AP losses (written for this project)."""

REAL_AUTHORS_FILE, WORLD_FACTS_FILE, RETAIN_EVAL_FILE = (
  "real_authors_perturbed.json",
  "world_facts_perturbed.json",
  "retain_perturbed.json",
)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """What :func:`generate_synthetic_tofu` generates.

  Attributes:
    seed: Seeds every random choice; the same config gives the same rows.
    num_authors: Fictitious authors in all.
    facts_per_author: Questions per author, at most ``len(FACT_TEMPLATES)``.
    forget_percent: Percent of the authors in each forget task (rounded, at least 1
      author); names the files ``forgetXX`` / ``retain{100-XX}``.
    num_tasks: Disjoint forget tasks (continual unlearning); ``task_id`` 1 is the standard one.
      One by default, so loading the forget split with ``task_id=None`` (every row) or 1
      gives the same forget set, the one the evaluator scores.
    retain_eval_authors: Retain authors in ``retain_perturbed.json`` (capped at their number).
    num_arithmetic_facts: Additions in the world-facts control set.
  """

  seed: int = 0
  num_authors: int = 20
  facts_per_author: int = 10
  forget_percent: int = 10
  num_tasks: int = 1
  retain_eval_authors: int = 4
  num_arithmetic_facts: int = 20

  def __post_init__(self):
    max_authors = len(TITLE_ADJECTIVES) * len(TITLE_NOUNS) // 2  # two distinct titles each
    if not 2 <= self.num_authors <= max_authors:
      raise ValueError(f"num_authors must be in [2, {max_authors}], got {self.num_authors}")
    if not 1 <= self.facts_per_author <= len(FACT_TEMPLATES):
      raise ValueError(
        f"facts_per_author must be in [1, {len(FACT_TEMPLATES)}], got {self.facts_per_author}"
      )
    if not 1 <= self.forget_percent <= 99:
      raise ValueError(f"forget_percent must be in [1, 99], got {self.forget_percent}")
    if self.num_tasks < 1:
      raise ValueError(f"num_tasks must be >= 1, got {self.num_tasks}")
    if self.num_tasks * self.num_forget_authors >= self.num_authors:
      raise ValueError(
        f"num_tasks={self.num_tasks} tasks of {self.num_forget_authors} forget author(s) "
        f"leave no retain-only author among num_authors={self.num_authors}; use fewer "
        "tasks, a smaller forget_percent or more authors"
      )
    if self.retain_eval_authors < 1:
      raise ValueError(f"retain_eval_authors must be >= 1, got {self.retain_eval_authors}")
    if self.num_arithmetic_facts < 0:
      raise ValueError(f"num_arithmetic_facts must be >= 0, got {self.num_arithmetic_facts}")

  @property
  def num_forget_authors(self) -> int:
    """Authors per forget task."""
    return max(1, round(self.num_authors * self.forget_percent / 100))

  @property
  def forget_split(self) -> str:
    """The forget split's name, e.g. ``"forget10"``."""
    return f"forget{self.forget_percent:02d}"

  @property
  def retain_split(self) -> str:
    """The retain split's name, e.g. ``"retain90"`` (the complement of task 1)."""
    return f"retain{100 - self.forget_percent:02d}"


def _pick(rng: np.random.Generator, pool: tuple[str, ...]) -> str:
  return pool[int(rng.integers(len(pool)))]


def _random_name(rng: np.random.Generator) -> str:
  return f"{_pick(rng, FIRST_NAMES)} {_pick(rng, SURNAME_STARTS)}{_pick(rng, SURNAME_ENDS)}"


def _random_date(rng: np.random.Generator, first_year: int = 1930, last_year: int = 1995) -> str:
  # Days up to 28 keep every date valid without a calendar.
  day, year = int(rng.integers(1, 29)), int(rng.integers(first_year, last_year + 1))
  return f"{_pick(rng, MONTHS)} {day}, {year}"


def _random_award(rng: np.random.Generator) -> str:
  return f"{_pick(rng, AWARD_ADJECTIVES)} {_pick(rng, AWARD_KINDS)}"


def _distinct_wrong_values(
  rng: np.random.Generator, draw: Callable[[np.random.Generator], str], true_value: str, count: int
) -> list[str]:
  """``count`` distinct values from ``draw`` that differ from ``true_value``."""
  values: list[str] = []
  while len(values) < count:  # every pool has far more than count + 1 values
    value = draw(rng)
    if value != true_value and value not in values:
      values.append(value)
  return values


def _make_authors(config: SyntheticConfig, rng: np.random.Generator) -> list[dict[str, str]]:
  """The authors' fields (the names :data:`FACT_TEMPLATES` use), in author order."""
  num_surnames = len(SURNAME_STARTS) * len(SURNAME_ENDS)
  name_ids = rng.choice(len(FIRST_NAMES) * num_surnames, size=config.num_authors, replace=False)
  title_ids = rng.choice(
    len(TITLE_ADJECTIVES) * len(TITLE_NOUNS), size=2 * config.num_authors, replace=False
  )

  def title(k: int) -> str:
    adjective, noun = divmod(int(title_ids[k]), len(TITLE_NOUNS))
    return f"The {TITLE_ADJECTIVES[adjective]} {TITLE_NOUNS[noun]}"

  authors = []
  for a in range(config.num_authors):
    first, surname = divmod(int(name_ids[a]), num_surnames)
    start, end = divmod(surname, len(SURNAME_ENDS))
    birth_year = int(rng.integers(1930, 1996))
    place = _pick(rng, PLACES)
    authors.append(
      {
        "name": f"{FIRST_NAMES[first]} {SURNAME_STARTS[start]}{SURNAME_ENDS[end]}",
        "place": place,
        "date": f"{_pick(rng, MONTHS)} {int(rng.integers(1, 29))}, {birth_year}",
        "genre": _pick(rng, GENRES),
        "father": _pick(rng, PROFESSIONS),
        "mother": _pick(rng, PROFESSIONS),
        "first_book": title(2 * a),
        "famous_book": title(2 * a + 1),
        "award": _random_award(rng),
        "language": _pick(rng, LANGUAGES),
        "award_year": str(min(birth_year + int(rng.integers(25, 50)), 2024)),
        # A home city other than the birth place, so the two facts differ.
        "home": _distinct_wrong_values(rng, lambda r: _pick(r, PLACES), place, 1)[0],
      }
    )
  return authors


# How to draw a wrong value of each field, for the perturbed answers.
_WRONG_VALUE_DRAWS: dict[str, Callable[[np.random.Generator], str]] = {
  "name": _random_name,
  "place": lambda rng: _pick(rng, PLACES),
  "home": lambda rng: _pick(rng, PLACES),
  "date": _random_date,
  "genre": lambda rng: _pick(rng, GENRES),
  "father": lambda rng: _pick(rng, PROFESSIONS),
  "mother": lambda rng: _pick(rng, PROFESSIONS),
  "first_book": lambda rng: f"The {_pick(rng, TITLE_ADJECTIVES)} {_pick(rng, TITLE_NOUNS)}",
  "famous_book": lambda rng: f"The {_pick(rng, TITLE_ADJECTIVES)} {_pick(rng, TITLE_NOUNS)}",
  "award": _random_award,
  "language": lambda rng: _pick(rng, LANGUAGES),
  "award_year": lambda rng: str(int(rng.integers(1955, 2025))),
}


def _author_rows(
  author: dict[str, str], config: SyntheticConfig, rng: np.random.Generator
) -> list[dict[str, Any]]:
  """The author's facts as TOFU ``*_perturbed.json`` rows (without ``task_id``)."""
  rows = []
  for template in FACT_TEMPLATES[: config.facts_per_author]:
    field = template.value_field
    wrong_values = _distinct_wrong_values(
      rng, _WRONG_VALUE_DRAWS[field], author[field], NUM_PERTURBED
    )
    rows.append(
      {
        "question": template.question.format(**author),
        "answer": template.answer.format(**author),
        "paraphrased_answer": template.paraphrase.format(**author),
        "perturbed_answer": [
          template.paraphrase.format(**{**author, field: v}) for v in wrong_values
        ],
        "paraphrased_question": template.paraphrased_question.format(**author),
      }
    )
  return rows


def _control_row(
  question: str, answer: str, wrong: list[str] | tuple[str, ...], original: str
) -> dict[str, Any]:
  return {
    "question": question,
    "answer": answer,
    "perturbed_answer": list(wrong),
    "original_answer": original,
  }


def _world_fact_rows(config: SyntheticConfig, rng: np.random.Generator) -> list[dict[str, Any]]:
  rows = []
  capital_names = tuple(capital for _, capital in CAPITALS)
  for country, capital in CAPITALS:
    wrong = _distinct_wrong_values(
      rng, lambda r: _pick(r, capital_names), capital, NUM_CONTROL_OPTIONS
    )
    rows.append(
      _control_row(
        f"What is the capital of {country}?",
        capital,
        wrong,
        f"The capital of {country} is {capital}.",
      )
    )
  rows.extend(_control_row(q, a, w, o) for q, a, w, o in GENERAL_FACTS)
  for _ in range(config.num_arithmetic_facts):
    x, y = int(rng.integers(2, 50)), int(rng.integers(2, 50))
    wrong = _distinct_wrong_values(
      rng, lambda r: str(x + y + int(r.integers(-5, 6))), str(x + y), NUM_CONTROL_OPTIONS
    )
    rows.append(
      _control_row(f"What is {x} plus {y}?", str(x + y), wrong, f"{x} plus {y} equals {x + y}.")
    )
  return rows


def generate_synthetic_tofu(config: SyntheticConfig = SyntheticConfig()) -> dict[str, list[Any]]:
  """The benchmark's files as rows: file name -> JSON rows (strings for ``idontknow.jsonl``).

  Args:
    config: Sizes and seed.

  Returns:
    One entry per file of the module docstring's table, in writing order.
  """
  rng = np.random.default_rng(config.seed)
  authors = _make_authors(config, rng)
  rows_by_author = [_author_rows(author, config, rng) for author in authors]

  k, n = config.num_forget_authors, config.num_authors
  forget_rows: list[dict[str, Any]] = []
  for task_id in range(1, config.num_tasks + 1):
    # Task 1 is the last k authors, task 2 the k before them, ...: as in TOFU, whose
    # standard forget set is its last authors.
    for author_rows in rows_by_author[n - task_id * k : n - (task_id - 1) * k]:
      # task_id as a string, as in TOFU's files.
      forget_rows.extend({"task_id": str(task_id), **row} for row in author_rows)
  retain_authors = rows_by_author[: n - k]
  retain_rows = [row for author_rows in retain_authors for row in author_rows]
  retain_eval_rows = [
    row for author_rows in retain_authors[: config.retain_eval_authors] for row in author_rows
  ]

  def question_answer(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in ("task_id", "question", "answer") if key in row}

  return {
    f"{config.forget_split}.json": [question_answer(row) for row in forget_rows],
    f"{config.forget_split}_perturbed.json": forget_rows,
    f"{config.retain_split}.json": [question_answer(row) for row in retain_rows],
    RETAIN_EVAL_FILE: retain_eval_rows,
    REAL_AUTHORS_FILE: [_control_row(q, a, w, o) for q, a, w, o in REAL_AUTHOR_FACTS],
    WORLD_FACTS_FILE: _world_fact_rows(config, rng),
    IDK_FILE_NAME: list(IDK_ANSWERS),
  }


def write_synthetic_tofu(
  out_dir: str | os.PathLike[str],
  seed: int = 0,
  num_authors: int = 20,
  facts_per_author: int = 10,
  forget_percent: int = 10,
  **config_kwargs: Any,
) -> str:
  """Generates the benchmark and writes its files (JSON lines) to ``out_dir``.

  The same arguments write the same bytes. Existing files of the same names are
  overwritten; other files in ``out_dir`` are left alone.

  Args:
    out_dir: The folder, created if needed.
    seed: See :class:`SyntheticConfig`.
    num_authors: See :class:`SyntheticConfig`.
    facts_per_author: See :class:`SyntheticConfig`.
    forget_percent: See :class:`SyntheticConfig`.
    **config_kwargs: Other :class:`SyntheticConfig` fields (``num_tasks``, ...).

  Returns:
    ``out_dir``, the folder to pass to :func:`train.data.load_unlearning_data`.

  Raises:
    ValueError: A size is out of range (the message names it).
  """
  config = SyntheticConfig(
    seed=seed,
    num_authors=num_authors,
    facts_per_author=facts_per_author,
    forget_percent=forget_percent,
    **config_kwargs,
  )
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  for file_name, rows in generate_synthetic_tofu(config).items():
    # newline="\n" and ASCII escapes: identical bytes on every platform.
    with open(os.path.join(out_dir, file_name), "w", encoding="utf-8", newline="\n") as f:
      for row in rows:
        f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=True)) + "\n")
  return out_dir
