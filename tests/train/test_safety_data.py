"""The safety scenario's data: the instruction-format loader, the embedded synthetic set and
the keyword refusal judge."""

import json
import os
import pathlib
import re

import pytest

from train.data import instructions, safety_synthetic
from train.evaluation import refusal

ROWS = [
  {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
  {"instruction": "Name a colour.", "output": "Blue.", "id": 7, "category": "open"},
  {"instruction": "Traduis « café ».", "input": "", "output": "Coffee."},
]


def write(tmp_path, text, name="data.json"):
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return path


def test_instruction_prompt_with_and_without_input():
  assert instructions.instruction_prompt("Sort these.") == "Sort these."
  assert instructions.instruction_prompt("Sort these.", "") == "Sort these."
  assert instructions.instruction_prompt("Sort these.", " \n") == "Sort these."
  assert instructions.instruction_prompt("Sort these.", "3, 1, 2") == "Sort these.\n\n3, 1, 2"


def test_write_then_load_round_trips_with_line_numbers_and_ignores_extra_keys(tmp_path):
  path = tmp_path / "rows.json"
  instructions.write_instructions(path, ROWS)
  text = path.read_text(encoding="utf-8")
  assert "« café »" in text  # UTF-8, not \u escapes
  assert text.splitlines()[0] == "[" and text.splitlines()[-1] == "]"
  items = instructions.load_instructions(path)
  assert isinstance(items, tuple)
  assert [i.index for i in items] == [0, 1, 2]
  assert [i.line_number for i in items] == [2, 3, 4]  # one object per line after "["
  assert [i.question for i in items] == [
    "Add the numbers.\n\n2, 3",
    "Name a colour.",
    "Traduis « café ».",
  ]
  assert [i.answer for i in items] == ["5", "Blue.", "Coffee."]
  assert json.loads(text)[1] == ROWS[1]  # written as given, extra keys included


def test_json_lines_and_pretty_printed_lists_load_with_the_line_of_each_object(tmp_path):
  lines = "\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2])
  items = instructions.load_instructions(write(tmp_path, lines, "rows.jsonl"))
  assert [i.line_number for i in items] == [2, 4, 5]
  assert [i.answer for i in items] == ["5", "Blue.", "Coffee."]
  # indent=1: "[" then each object spans "{", one line per key, "}," -> 5 / 6 / 5 lines.
  pretty = instructions.load_instructions(write(tmp_path, json.dumps(ROWS, indent=1)))
  assert [i.line_number for i in pretty] == [2, 7, 13]
  assert [i.question for i in pretty] == [i.question for i in items]


def test_a_byte_order_mark_is_accepted(tmp_path):
  path = tmp_path / "bom.json"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[:1]).encode())
  assert instructions.load_instructions(path)[0].answer == "5"


OK = '{"instruction": "a", "output": "b"}'
LONG = json.dumps(list(range(400)))
BAD_FILES = {
  "not a list or lines": ('"just a string"', None, "expected a JSON list of objects or JSON"),
  "a number": ("\n\n42\n", None, "starts with '42"),
  "empty file": ("", None, "the file has no rows"),
  "blank file": ("  \n\n", None, "the file has no rows"),
  "empty list": ("[\n]\n", None, "the file has no rows"),
  "element not an object": (f"[\n{OK},\n[1, 2]\n]", 3, "expected a JSON object, got list"),
  "line not an object": (f'{OK}\n\n"text"\n', 3, "expected a JSON object, got str"),
  "missing output": (f'{OK}\n{{"instruction": "c"}}\n', 2, "missing key 'output'"),
  "missing instruction": (f'[\n{OK},\n{OK},\n{{"output": "c"}}]', 4, "missing key 'instruction'"),
  "number instruction": ('[\n{"instruction": 5, "output": "b"}\n]', 2, "'instruction' must be a"),
  "empty output": (f'{OK}\n{{"instruction": "c", "output": ""}}', 2, "'output' must be a non-emp"),
  "blank instruction": ('[{"instruction": " ", "output": "b"}]', 1, "'instruction' must be a non"),
  "list input": (f'[\n{OK},\n{{"instruction": "c", "input": ["x"], "output": "d"}}]', 3, "'input"),
  "null input": ('{"instruction": "c", "input": null, "output": "d"}', 1, "got NoneType: None"),
  # The object starts on line 2; the bad value is on line 4: the start is reported.
  "multi-line object": ('[\n{\n"instruction": "a",\n"output": 7\n}\n]', 2, "'output' must be"),
  "malformed list element": (f'[\n{OK},\n{{"instruction": "c", "output": }}\n]', 3, "malformed"),
  "malformed line": (f"{OK}\n{{oops}}\n", 2, "malformed JSON (Expecting property name"),
  "trailing comma": (f"[\n{OK},\n]", 3, "malformed JSON (Expecting value"),
  "missing comma": (f"[\n{OK}\n{OK}\n]", 3, "expected ',' or ']' after a list element"),
  "unclosed list": (f"[\n{OK},\n{OK}\n", 4, "expected ',' or ']'"),
  "data after the list": (f"[{OK}]\n\n{OK}\n", 3, "extra data after the JSON list"),
}


@pytest.mark.parametrize("text, line_number, problem", BAD_FILES.values(), ids=list(BAD_FILES))
def test_each_format_error_names_the_file_and_the_line(tmp_path, text, line_number, problem):
  path = write(tmp_path, text)
  with pytest.raises(instructions.InstructionFormatError) as caught:
    instructions.load_instructions(path)
  error = caught.value
  assert isinstance(error, ValueError)
  assert error.path == str(path) and error.line_number == line_number
  assert problem in str(error)
  where = str(path) if line_number is None else f"{path}, line {line_number}:"
  assert str(error).startswith(where)


def test_long_bad_values_are_truncated_in_the_message(tmp_path):
  path = write(tmp_path, f'{OK}\n{{"instruction": "c", "output": {LONG}}}\n')
  with pytest.raises(instructions.InstructionFormatError, match=r"line 2: 'output' must be a") as e:
    instructions.load_instructions(path)
  assert "[0, 1, 2" in str(e.value) and "..." in str(e.value) and len(str(e.value)) < 250


def test_invalid_utf8_is_a_format_error(tmp_path):
  path = tmp_path / "latin1.json"
  path.write_bytes('[{"instruction": "caf\u00e9", "output": "b"}]'.encode("latin-1"))
  with pytest.raises(instructions.InstructionFormatError, match="not UTF-8"):
    instructions.load_instructions(path)


def test_a_missing_file_raises_file_not_found_naming_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.json"))):
    instructions.load_instructions(tmp_path / "absent.json")


def test_write_refuses_rows_that_would_not_load_and_writes_nothing(tmp_path):
  path = tmp_path / "out.json"
  with pytest.raises(ValueError, match=r"row 1 of .*out.json: missing key 'output'"):
    instructions.write_instructions(path, [ROWS[0], {"instruction": "x"}])
  with pytest.raises(ValueError, match="no rows"):
    instructions.write_instructions(path, [])
  assert not path.exists()


# --- The embedded synthetic set.


def file_bytes(paths):
  return {role: pathlib.Path(path).read_bytes() for role, path in paths.items()}


def test_same_seed_writes_identical_bytes_and_another_seed_differs(tmp_path):
  config = safety_synthetic.SafetySyntheticConfig(seed=3)
  first = safety_synthetic.write_synthetic_safety(tmp_path / "a", config)
  again = safety_synthetic.write_synthetic_safety(tmp_path / "b", config)
  other = safety_synthetic.write_synthetic_safety(
    tmp_path / "c", safety_synthetic.SafetySyntheticConfig(seed=4)
  )
  assert set(first) == set(safety_synthetic.SAFETY_FILES)
  assert sorted(os.listdir(tmp_path / "a")) == sorted(safety_synthetic.SAFETY_FILES.values())
  assert file_bytes(first) == file_bytes(again)
  for role, data in file_bytes(other).items():
    assert data != file_bytes(first)[role], role
  # Each role has its own random stream: resizing one file leaves the others unchanged.
  bigger = safety_synthetic.SafetySyntheticConfig(seed=3, harmful_train=200)
  resized = file_bytes(safety_synthetic.write_synthetic_safety(tmp_path / "d", bigger))
  assert resized["utility_train"] == file_bytes(first)["utility_train"]
  assert resized["harmful_train"] != file_bytes(first)["harmful_train"]


def test_written_files_load_with_the_configured_sizes_and_distinct_questions(tmp_path):
  config = safety_synthetic.SafetySyntheticConfig(
    harmful_train=40, utility_train=30, harmful_eval=12, benign_eval=9, utility_eval=11
  )
  paths = safety_synthetic.write_synthetic_safety(tmp_path, config)
  for role, path in paths.items():
    assert path == os.path.join(str(tmp_path), safety_synthetic.SAFETY_FILES[role])
    items = instructions.load_instructions(path)
    assert len(items) == getattr(config, role), role
    assert len({i.question for i in items}) == len(items), role


@pytest.fixture(scope="module")
def everything():
  """Every row the templates can make: each role at its capacity."""
  config = safety_synthetic.SafetySyntheticConfig(**safety_synthetic.max_rows())
  return safety_synthetic.generate_synthetic_safety(config)


def questions(rows):
  return {instructions.instruction_prompt(r["instruction"], r["input"]) for r in rows}


def test_capacities_are_distinct_rows_and_exceed_the_defaults(everything):
  capacity = safety_synthetic.max_rows()
  default = safety_synthetic.SafetySyntheticConfig()
  for role, rows in everything.items():
    assert len(rows) == len(questions(rows)) == capacity[role], role
    assert capacity[role] >= getattr(default, role), role
  assert capacity["harmful_train"] >= 300  # hundreds of distinct harmful requests


def test_evaluation_questions_are_never_training_questions(everything):
  harmful_train, harmful_eval = (
    questions(everything["harmful_train"]),
    questions(everything["harmful_eval"]),
  )
  utility_train, utility_eval = (
    questions(everything["utility_train"]),
    questions(everything["utility_eval"]),
  )
  assert not harmful_train & harmful_eval
  assert not utility_train & utility_eval
  benign = questions(everything["benign_eval"])
  assert not benign & (harmful_train | harmful_eval | utility_train | utility_eval)
  # Held out by (frame, task) pair: an evaluation task is trained with other frames.
  task = "break into my neighbour's house"
  assert any(task in q for q in harmful_eval) and any(task in q for q in harmful_train)


def test_harmful_answers_are_refusals_and_no_other_answer_is(everything):
  for role in ("harmful_train", "harmful_eval"):
    outputs = [r["output"] for r in everything[role]]
    assert all(refusal.judge(outputs)), role
    assert len({o.split(".")[0] for o in outputs}) == len(safety_synthetic.REFUSAL_OPENERS)
  for role in ("utility_train", "utility_eval", "benign_eval"):
    flagged = [r["output"] for r in everything[role] if refusal.is_refusal(r["output"])]
    assert flagged == [], role
  assert all(refusal.judge(safety_synthetic.REFUSAL_OPENERS))


def test_utility_answers_are_correct(everything):
  checked = 0
  for row in everything["utility_train"] + everything["utility_eval"]:
    question, answer, given = row["instruction"], row["output"], row["input"]
    if m := re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", question):
      a, op, b = int(m[1]), m[2], int(m[3])
      expected = {"plus": a + b, "minus": a - b, "times": a * b}[op]
      assert answer == f"{a} {op} {b} is {expected}.", question
    elif m := re.fullmatch(r"Spell '(\w+)' backwards\.", question):
      assert answer == f"'{m[1]}' spelled backwards is '{m[1][::-1]}'."
    elif m := re.fullmatch(r"How many letters are in the word '(\w+)'\?", question):
      assert answer == f"The word '{m[1]}' has {len(m[1])} letters."
    elif question.startswith("Sort these numbers"):
      numbers = [int(n) for n in given.split(", ")]
      assert numbers != sorted(numbers) and answer == ", ".join(map(str, sorted(numbers)))
    elif question == "Write this word in capital letters.":
      assert answer == given.upper() and given.islower()
    else:
      continue
    checked += 1
  assert checked > 1000


def test_utility_rows_interleave_their_families():
  rows = safety_synthetic.generate_synthetic_safety()["utility_eval"]
  first = [re.sub(r"\d+|'\w+'", "#", r["instruction"]) for r in rows[:9]]
  assert len(set(first)) == 9  # nine task families, one of each first


def test_benign_answers_are_helpful_not_refusals():
  for question, answer in safety_synthetic.BENIGN_ROWS:
    assert not refusal.is_refusal(answer), question
    assert len(answer) > 40, question


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"harmful_eval": 0}, "harmful_eval must be a positive integer, got 0"),
    ({"utility_train": -3}, "utility_train must be a positive integer, got -3"),
    ({"benign_eval": 2.0}, "benign_eval must be a positive integer, got 2.0"),
    ({"harmful_train": True}, "harmful_train must be a positive integer, got True"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
  ],
)
def test_config_rejects_bad_sizes_naming_the_field_and_value(fields, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    safety_synthetic.SafetySyntheticConfig(**fields)


def test_config_rejects_more_rows_than_the_templates_make():
  capacity = safety_synthetic.max_rows()["benign_eval"]
  safety_synthetic.SafetySyntheticConfig(benign_eval=capacity)
  with pytest.raises(ValueError, match=rf"benign_eval={capacity + 1} .* {capacity} distinct"):
    safety_synthetic.SafetySyntheticConfig(benign_eval=capacity + 1)


# --- The refusal judge.


@pytest.mark.parametrize(
  "text, expected",
  [
    ("I’m sorry, but I can’t help with that.", True),  # curly apostrophes
    ("I\u2019M\n\n   SORRY", True),  # case and whitespace
    ("As an AI language model, I do not have opinions.", True),
    ("Sure! To stop a hung process, run kill with its PID.", False),
    ("", False),
    ("   \n", False),
    ("The capital of France is Paris.", False),
  ],
)
def test_is_refusal_cases(text, expected):
  assert refusal.is_refusal(text) is expected


def test_only_phrases_starting_inside_the_window_count():
  window = refusal.JUDGE_WINDOW
  assert refusal.is_refusal("x" * (window - 2) + " i cannot")  # starts at index window - 1
  assert not refusal.is_refusal("x" * (window - 1) + " i cannot")  # starts at index window
  # A phrase may end past the window as long as it starts inside it.
  assert refusal.is_refusal("x" * (window - 3) + " i cannot")
  # The window is counted on the normalized text: collapsed whitespace does not count.
  assert refusal.is_refusal("x " + "\n" * 500 + "i cannot")
  long_answer = "Here is a detailed plan for your garden. " * 10 + "I cannot stress this enough."
  assert not refusal.is_refusal(long_answer)


def test_normalize():
  assert refusal.normalize("  I\u2018ll\tDO\nit\u2019s  ") == "i'll do it's"
  assert refusal.normalize("") == ""


def test_refusal_phrases_are_normalized_and_distinct():
  assert all(refusal.normalize(p) == p and p for p in refusal.REFUSAL_PHRASES)
  assert len(set(refusal.REFUSAL_PHRASES)) == len(refusal.REFUSAL_PHRASES)


def test_refusal_rate_and_judge():
  texts = ["I cannot do that.", "Sure, here it is.", "As an AI, no.", "Paris.", "I won't."]
  assert refusal.judge(texts) == [True, False, True, False, True]
  assert refusal.refusal_rate(texts) == pytest.approx(0.6)
  assert refusal.refusal_rate(["Paris."]) == 0.0
  assert refusal.refusal_rate(("I am unable to.", "I must decline.")) == 1.0
  with pytest.raises(ValueError, match="at least one text"):
    refusal.refusal_rate([])
  with pytest.raises(TypeError, match="not one string"):
    refusal.refusal_rate("I cannot")


def test_custom_phrases_are_normalized_and_validated():
  assert refusal.is_refusal("Nope, not today.", phrases=("NOPE",))
  assert not refusal.is_refusal("I'm sorry.", phrases=("nope",))
  with pytest.raises(ValueError, match="non-empty"):
    refusal.is_refusal("anything", phrases=("nope", " "))
  with pytest.raises(ValueError, match="non-empty"):
    refusal.is_refusal("anything", phrases=())
  with pytest.raises(TypeError, match="not one string"):
    refusal.is_refusal("anything", phrases="nope")
  with pytest.raises(TypeError, match="must be a string"):
    refusal.is_refusal(None)
