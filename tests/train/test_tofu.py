"""TOFU-format loading: validation errors name the file and line; task_id and max_items."""

import json
import pathlib

import pytest

from train.data import tofu

DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tofu"


def write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def row(**kw):
  return json.dumps({"question": "q?", "answer": "a.", **kw})


def test_loads_items_with_indices_line_numbers_and_optional_fields(tmp_path):
  path = write_lines(
    tmp_path / "f.json",
    [
      row(task_id="2", paraphrased_answer="p.", perturbed_answer=["x.", "y."]),
      "",  # blank lines are skipped, line numbers still count them
      row(task_id=1, paraphrased_answer="p2.", perturbed_answer=["z."], paraphrased_question="pq?"),
    ],
  )
  items = tofu.load_tofu(path, required_keys=tofu.PARAPHRASE_KEYS)
  assert [(i.index, i.line_number, i.task_id) for i in items] == [(0, 1, 2), (1, 3, 1)]
  assert items[0].perturbed_answers == ("x.", "y.") and items[0].paraphrased_answer == "p."
  assert items[1].paraphrased_question == "pq?" and items[1].original_answer is None


def test_task_id_selection_and_max_items(tmp_path):
  path = write_lines(tmp_path / "f.json", [row(task_id=t) for t in (1, 2, 1, 2, 1)])
  assert [i.index for i in tofu.load_tofu(path, task_id=1)] == [0, 2, 4]
  assert [i.index for i in tofu.load_tofu(path, task_id=2, max_items=1)] == [1]
  assert len(tofu.load_tofu(path, max_items=3)) == 3
  assert tofu.count_rows(path) == 5 and tofu.count_rows(path, task_id=2) == 2
  with pytest.raises(
    tofu.TofuFormatError, match=r"no row has task_id=3; the file has task ids \[1, 2\]"
  ):
    tofu.load_tofu(path, task_id=3)


@pytest.mark.parametrize(
  "bad_line, message",
  [
    ('{"question": "q?", "answer": ', r"line 2: malformed JSON"),
    ('["question", "answer"]', r"line 2: expected a JSON object, got list"),
    ('{"question": "q?"}', r"line 2: missing key\(s\) \['answer'\]"),
    ('{"question": "q?", "answer": 3}', r"line 2: 'answer' must be a string, got int"),
    (
      row(perturbed_answer="just one"),
      r"line 2: 'perturbed_answer' must be a non-empty list of strings",
    ),
    (row(perturbed_answer=[]), r"line 2: 'perturbed_answer' must be a non-empty list of strings"),
    (row(task_id="one"), r"line 2: 'task_id' must be an integer, got 'one'"),
  ],
)
def test_malformed_line_fails_with_file_name_and_line_number(tmp_path, bad_line, message):
  path = write_lines(tmp_path / "broken.json", [row(), bad_line, row()])
  with pytest.raises(tofu.TofuFormatError, match=r"broken\.json, " + message) as info:
    tofu.load_tofu(path)
  assert info.value.line_number == 2 and info.value.path == str(path)


def test_missing_evaluation_key_is_reported(tmp_path):
  path = write_lines(
    tmp_path / "forget_perturbed.json",
    [row(paraphrased_answer="p.", perturbed_answer=["x."]), row(perturbed_answer=["x."])],
  )
  with pytest.raises(
    tofu.TofuFormatError,
    match=r"forget_perturbed\.json, line 2: missing key\(s\) "
    r"\['paraphrased_answer'\]",
  ):
    tofu.load_tofu(path, required_keys=tofu.PARAPHRASE_KEYS)


def test_task_id_requested_on_a_file_without_task_ids(tmp_path):
  path = write_lines(tmp_path / "retain.json", [row()])
  with pytest.raises(tofu.TofuFormatError, match=r"retain\.json, line 1: task_id=1 was requested"):
    tofu.load_tofu(path, task_id=1)


def test_empty_file_and_bad_max_items(tmp_path):
  path = tmp_path / "empty.json"
  path.write_text("\n\n", encoding="utf-8")
  with pytest.raises(tofu.TofuFormatError, match=r"empty\.json: the file has no rows"):
    tofu.load_tofu(path)
  with pytest.raises(ValueError, match="max_items must be >= 0"):
    tofu.load_tofu(path, max_items=-1)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"TOFU data not found at {DATA}")
@pytest.mark.parametrize(
  "name, keys, rows",
  [
    ("forget01_perturbed.json", tofu.PARAPHRASE_KEYS, 400),
    ("retain_perturbed.json", tofu.PARAPHRASE_KEYS, 400),
    ("real_authors_perturbed.json", tofu.OPTION_KEYS, 100),
    ("world_facts_perturbed.json", tofu.OPTION_KEYS, 117),
    ("retain10.json", tofu.QA_KEYS, 400),  # its last line has no newline
    ("forget10.json", tofu.QA_KEYS, 3600),
  ],
)
def test_real_tofu_files_load_completely(name, keys, rows):
  items = tofu.load_tofu(DATA / name, required_keys=keys)
  assert len(items) == rows == tofu.count_rows(DATA / name)
  if "perturbed" in name:
    assert all(item.perturbed_answers for item in items)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"TOFU data not found at {DATA}")
def test_real_forget_task_ids():
  items = tofu.load_tofu(
    DATA / "forget01_perturbed.json", task_id=1, required_keys=tofu.PARAPHRASE_KEYS
  )
  assert len(items) == 40 and all(item.task_id == 1 for item in items)
  assert items[0].question.startswith("What is the full name of the author born in Kuwait City")
