"""The multi-task scenario's data: the embedded three-task generator and the task files'
errors (missing, empty, malformed rows naming file and line)."""

import json

import pytest

from train.config import load_config
from train.data import multitask_synthetic as synthetic
from train.data import tofu
from train.scenarios import multitask

SMALL = synthetic.MultitaskSyntheticConfig(train_per_task=30, eval_per_task=10, seed=3)


def test_same_config_same_bytes_and_another_seed_other_rows(tmp_path):
  first = synthetic.write_synthetic_multitask(tmp_path / "a", SMALL)
  second = synthetic.write_synthetic_multitask(tmp_path / "b", SMALL)
  assert list(first) == list(synthetic.TASKS)
  for task in synthetic.TASKS:
    for path_a, path_b in zip(first[task], second[task]):
      assert open(path_a, "rb").read() == open(path_b, "rb").read()
  other = synthetic.synthetic_multitask(synthetic.MultitaskSyntheticConfig(30, 10, seed=4))
  assert other["arithmetic"] != synthetic.synthetic_multitask(SMALL)["arithmetic"]


def test_sizes_kinds_and_disjoint_train_and_eval_questions(tmp_path):
  paths = synthetic.write_synthetic_multitask(tmp_path, SMALL)
  for task, (train_path, eval_path) in paths.items():
    train, held = tofu.load_tofu(train_path), tofu.load_tofu(eval_path)
    assert (len(train), len(held)) == (30, 10), task
    train_questions = {i.question for i in train}
    assert len(train_questions) == 30 and not train_questions & {i.question for i in held}
  rows = synthetic.synthetic_multitask(SMALL)
  for row in rows["arithmetic"][0] + rows["arithmetic"][1]:
    a, b = (int(w) for w in row["question"].removesuffix("?").split() if w.isdigit())
    assert row["answer"] == str(a + b)
  for row in rows["strings"][0]:
    word = row["question"].split("'")[1]
    assert row["answer"] in (word[::-1], word.upper())
  # Held-out operands: no held-out word appears in a training question.
  train_words = {r["question"].split("'")[1] for r in rows["strings"][0]}
  assert not train_words & {r["question"].split("'")[1] for r in rows["strings"][1]}
  # facts: held-out questions paraphrase trained facts (same answers, other questions).
  facts_train, facts_eval = rows["facts"]
  assert {r["answer"] for r in facts_eval} <= {r["answer"] for r in facts_train}
  assert facts_train[0]["answer"].startswith(("The capital of", "The currency of", "People in"))


@pytest.mark.parametrize(
  "kwargs, field",
  [
    ({"train_per_task": 0}, "train_per_task"),
    ({"eval_per_task": -1}, "eval_per_task"),
    ({"train_per_task": 2.5}, "train_per_task"),
    ({"seed": -1}, "seed"),
    ({"train_per_task": 20, "eval_per_task": 30}, "eval_per_task"),
    ({"train_per_task": 450, "eval_per_task": 100}, "train_per_task \\+ eval_per_task"),
  ],
)
def test_bad_sizes_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"^{field}"):
    synthetic.MultitaskSyntheticConfig(**kwargs)


PER_TASK_DEFAULTS = ["multitask.coeffs=[]", "multitask.steps=[]", "multitask.lr_ratios=[]"]


def _config(path, tasks=("facts", "arithmetic")):
  return load_config(
    "configs/multitask_tiny.yaml",
    [f"multitask.path={path}", f"multitask.tasks={list(tasks)}", *PER_TASK_DEFAULTS],
  )


def test_task_files_missing_empty_and_bad_rows(tmp_path):
  synthetic.write_synthetic_multitask(tmp_path, SMALL)
  assert set(multitask.task_files(_config(tmp_path))) == {"facts", "arithmetic"}
  with pytest.raises(FileNotFoundError, match=r"multitask.tasks\[1\] 'poems': .*poems.json"):
    multitask.task_files(_config(tmp_path, ("facts", "poems")))
  (tmp_path / "arithmetic_eval.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"'arithmetic': .*arithmetic_eval.json"):
    multitask.load_tasks(_config(tmp_path))
  synthetic.write_synthetic_multitask(tmp_path, SMALL)
  (tmp_path / "facts.json").write_text("\n\n")
  with pytest.raises(ValueError, match=r"task 'facts': the file .*facts.json has no rows"):
    multitask.load_tasks(_config(tmp_path))
  good = json.dumps({"question": "q", "answer": "a"})
  (tmp_path / "facts.json").write_text(f'{good}\n{good}\n{{"question": 1, "answer": "a"}}\n')
  with pytest.raises(tofu.TofuFormatError, match=r"facts.json, line 3: 'question' must be a str"):
    multitask.load_tasks(_config(tmp_path))
  (tmp_path / "facts.json").write_text(f"{good}\nnot json\n")
  with pytest.raises(tofu.TofuFormatError, match=r"facts.json, line 2: malformed JSON"):
    multitask.load_tasks(_config(tmp_path))


def test_schedule_and_answer_normalization():
  assert [multitask.scheduled_task(s, (1, 2, 1)) for s in range(8)] == [0, 1, 1, 2, 0, 1, 1, 2]
  assert multitask.normalize_answer("  The Capital  of X is Y. ") == "the capital of x is y"
  assert list(multitask.exact_match(["42.", "NEDRAG", "4 2"], ["42", "nedrag", "42"])) == [1, 1, 0]
