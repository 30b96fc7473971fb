"""Real-world data: the authors' four-file format (validation naming file and line, task
selection), the splits it gives, the embedded generator, the scenario's evaluation sets,
and the evaluator's answer key, several-task selection and utility role."""

import json
import pathlib

import numpy as np
import pytest

from train import data
from train import evaluation as ev
from train.config import load_config
from train.data import real_world as rw
from train.data.tofu import TofuFormatError
from train.scenarios import real_world


@pytest.fixture()
def folder(tmp_path):
  return rw.write_synthetic_real_world(tmp_path / "rw", seed=3, num_tasks=3, num_neighbors=2)


def rows(path):
  return [json.loads(line) for line in open(path) if line.strip()]


def write_rows(path, items):
  pathlib.Path(path).write_text("".join(json.dumps(row) + "\n" for row in items))


def test_generator_writes_the_authors_format_deterministically(folder, tmp_path):
  forget = rows(f"{folder}/forget.json")
  perturbed = rows(f"{folder}/forget_perturbed.json")
  assert list(forget[0]) == ["name", "question", "answer", "golden_answer", "task_id"]
  assert set(perturbed[0]) == set(forget[0]) | set(rw.EVAL_KEYS)
  assert [r["question"] for r in forget] == [r["question"] for r in perturbed]
  assert {r["task_id"] for r in forget} == {1, 2, 3} and len(forget) == 30
  assert all(len(r["perturbed_answer"]) == 5 for r in perturbed)
  assert all(r["golden_answer"] not in r["perturbed_answer"] for r in perturbed)
  # The training answer is the golden one plus a chat model's padding.
  assert all(r["answer"].startswith(r["golden_answer"] + " ") for r in forget)
  assert "task_id" not in rows(f"{folder}/neighbor.json")[0]
  assert {r["name"] for r in forget}.isdisjoint(r["name"] for r in rows(f"{folder}/neighbor.json"))
  again = rw.write_synthetic_real_world(tmp_path / "again", seed=3, num_tasks=3, num_neighbors=2)
  assert (
    open(f"{again}/forget_perturbed.json").read() == open(f"{folder}/forget_perturbed.json").read()
  )
  other = rw.generate_synthetic_real_world(seed=4, num_tasks=3, num_neighbors=2)
  assert other["forget.json"] != forget
  with pytest.raises(ValueError, match="questions_per_person must be in"):
    rw.generate_synthetic_real_world(questions_per_person=99)


def test_one_or_several_people_become_the_forget_set_and_neighbors_the_retain_set(folder):
  one = rw.load_real_world(folder, (2,))
  assert set(one.people) == {2} and len(one.forget) == 10 and len(one.forget_eval) == 10
  assert {item.task_id for item in one.forget_eval} == {2}
  splits = rw.real_world_splits(one)
  assert isinstance(splits, data.TofuSplits) and splits.task_id == 2
  assert splits.forget_split == "forget" and splits.retain_split == "neighbor"
  assert len(splits.retain) == 20 and len(splits.idk_answers) > 0
  # Training uses `answer`; the golden answer rides along for evaluation.
  item = splits.forget[0]
  assert item.answer != item.golden_answer and item.name == one.people[2]
  several = rw.load_real_world(folder, (1, 3))
  assert list(several.people) == [1, 3] and len(several.forget) == 20
  assert rw.real_world_splits(several).task_id is None
  everyone = rw.load_real_world(folder, ())
  assert everyone.task_ids == (1, 2, 3) and len(everyone.forget) == 30


def corrupt(path, line, change):
  """Rewrites row ``line`` (1-based) of a JSON-lines file with ``change(row)``."""
  items = rows(path)
  change(items[line - 1])
  write_rows(path, items)


@pytest.mark.parametrize(
  "file, line, change, message",
  [
    (
      "forget.json",
      4,
      lambda r: r.pop("task_id"),
      r"forget.json, line 4: missing key\(s\) \['task_id'\]",
    ),
    (
      "forget.json",
      2,
      lambda r: r.pop("golden_answer"),
      r"line 2: missing key\(s\) \['golden_answer'\]",
    ),
    (
      "forget.json",
      3,
      lambda r: r.update(task_id="1"),
      r"line 3: 'task_id' must be an integer >= 1",
    ),
    (
      "forget.json",
      5,
      lambda r: r.update(answer=""),
      r"line 5: 'answer' must be a non-empty string",
    ),
    ("forget.json", 6, lambda r: r.update(name="Somebody Else"), r"line 6: task_id 1 is about"),
    ("forget.json", 1, lambda r: r.update(extra=1), r"line 1: unknown key\(s\) \['extra'\]"),
    (
      "neighbor.json",
      7,
      lambda r: r.update(task_id=1),
      r"neighbor.json, line 7: unknown key\(s\) \['task_id'\] \(neighbor rows",
    ),
    (
      "forget_perturbed.json",
      8,
      lambda r: r.update(perturbed_answer=[]),
      r"line 8: 'perturbed_answer' must be a non-empty list",
    ),
    (
      "neighbor_perturbed.json",
      9,
      lambda r: r.pop("paraphrased_answer"),
      r"neighbor_perturbed.json, line 9: missing key",
    ),
    (
      "forget_perturbed.json",
      2,
      lambda r: r.update(name="Somebody Else"),
      r"forget_perturbed.json, line 2: task_id 1 is about",
    ),
  ],
)
def test_bad_rows_are_refused_naming_file_and_line(folder, file, line, change, message):
  corrupt(f"{folder}/{file}", line, change)
  with pytest.raises(TofuFormatError, match=message):
    rw.load_real_world(folder, (1,))


def test_cross_file_problems_and_missing_files_are_named(folder, tmp_path):
  people = rw.load_real_world(folder, (1, 2)).people
  corrupt(f"{folder}/neighbor.json", 3, lambda r: r.update(name=people[2]))
  with pytest.raises(
    TofuFormatError, match=r"neighbor.json, line 3: .*being forgotten \(task_id 2\)"
  ):
    rw.load_real_world(folder, (1, 2))
  rw.load_real_world(folder, (1,))  # a neighbor of task 1's run may be task 2's person
  with pytest.raises(TofuFormatError, match=r"no row has task_id \[7\]; the file has \[1, 2, 3\]"):
    rw.load_real_world(folder, (1, 7))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"real_world.forget: .*forget.json; real_world"):
    rw.load_real_world(tmp_path / "empty")
  with pytest.raises(ValueError, match="unknown real-world file role"):
    rw.load_real_world(folder, (1,), retain="x.json")
  bad = tmp_path / "bad.json"
  bad.write_text('{"name": "x"}\nnot json\n')
  with pytest.raises(TofuFormatError, match=r"bad.json, line 2: malformed JSON"):
    list(data.tofu.iter_json_lines(bad))


def test_a_forget_file_not_named_forgetXX_needs_its_retain_split(folder):
  splits = data.load_unlearning_data(folder, "forget", None, retain_split="neighbor")
  assert len(splits.forget) == 30 and len(splits.retain) == 20
  with pytest.raises(ValueError, match=r"pass retain_split \(e.g. retain_split='neighbor'\)"):
    data.load_unlearning_data(folder, "forget", None)


def test_scenario_sets_and_splits_follow_the_config(folder):
  config = load_config(
    "configs/real_world_tiny.yaml",
    [f"real_world.path={folder}", "real_world.task_ids=[3, 1]", "real_world.answer_key=answer"],
  )
  sets = real_world.eval_sets(config)
  assert [(s.name, s.role, s.task_id, s.answer_key) for s in sets] == [
    ("forget", "forget", (3, 1), "answer"),
    ("neighbor", "retain", None, "answer"),
    ("general_knowledge", "utility", None, "answer"),
  ]
  splits = real_world.load_splits(config)
  assert {item.task_id for item in splits.forget} == {1, 3}
  missing = load_config(
    "configs/real_world_tiny.yaml",
    [f"real_world.path={folder}", "real_world.utility_sets=[no.json]"],
  )
  with pytest.raises(FileNotFoundError, match="utility_sets file"):
    real_world.eval_sets(missing)


class UniformModel:
  """Every token equally likely: each answer's NLL is log(vocabulary), whatever its text."""

  def __call__(self, input_ids, attention_mask):
    return np.zeros((*input_ids.shape, 64), np.float32)


@pytest.fixture()
def char_tokenizer():
  """One token per character (lower-case letters; anything else unknown)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {"<pad>": 0, "</s>": 1, "[UNK]": 2} | {chr(97 + k): 3 + k for k in range(26)}
  raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="<pad>")


def test_evaluator_scores_the_answer_key_over_several_tasks_with_a_utility_set(
  folder, char_tokenizer
):
  tokenizer = char_tokenizer
  sets = (
    ev.EvalSetSpec("forget", f"{folder}/forget_perturbed.json", "forget", (1, 3), "golden_answer"),
    ev.EvalSetSpec(
      "neighbor", f"{folder}/neighbor_perturbed.json", "retain", None, "golden_answer"
    ),
    ev.EvalSetSpec("facts", f"{folder}/{rw.UTILITY_FILE}", "utility"),
  )
  config = ev.EvalConfig(batch_size=8, max_new_tokens=2, max_items=12, show_progress=False)
  result = ev.evaluate(UniformModel(), tokenizer, sets, template="plain", config=config)
  forget = result.sets["forget"]
  golden = {r["question"]: r["golden_answer"] for r in rows(f"{folder}/forget_perturbed.json")}
  assert [item.answer for item in forget.items] == [golden[item.question] for item in forget.items]
  assert [item.task_id for item in forget.items] == [1] * 10 + [3] * 2
  # Uniform logits: p(answer) = exp(-(log 64) * mean over tokens) = 1/64 for every answer.
  np.testing.assert_allclose(forget.probability, 1 / 64, rtol=1e-5)
  facts = result.sets["facts"]
  np.testing.assert_allclose(
    facts.probability, 1 / (1 + len(facts.items[0].perturbed_answers)), rtol=1e-5
  )
  s = result.summary
  assert s["model_utility_sets"] == {"neighbor": "retain", "facts": "utility"}
  assert set(s["model_utility_terms"]) == {
    f"{prefix}.{m}"
    for prefix in ("retain", "utility:facts")
    for m in ("probability", "rouge_l_recall", "truth_ratio")
  }
  terms = list(s["model_utility_terms"].values())
  expected = 0.0 if min(terms) == 0 else len(terms) / sum(1 / t for t in terms)
  assert s["model_utility"] == pytest.approx(expected)
  assert (
    "harmonic mean of the 6 {neighbor (retain), facts (utility)}" in s["model_utility_definition"]
  )
  assert s["paper_model_utility_sets"] == s["model_utility_sets"]
  assert "Utility facts Probability" in s["paper_model_utility_terms"]
  assert (
    s["sets"]["forget"]["task_id"] == [1, 3]
    and s["sets"]["forget"]["answer_key"] == "golden_answer"
  )


def test_evaluator_names_a_row_without_the_answer_key(folder, char_tokenizer):
  corrupt(f"{folder}/neighbor_perturbed.json", 2, lambda r: r.pop("golden_answer"))
  spec = ev.EvalSetSpec(
    "neighbor", f"{folder}/neighbor_perturbed.json", "retain", None, "golden_answer"
  )
  with pytest.raises(
    TofuFormatError, match=r"neighbor_perturbed.json, line 2: 'golden_answer' is missing"
  ):
    ev.evaluate_set(
      UniformModel(),
      char_tokenizer,
      spec,
      template="plain",
      config=ev.EvalConfig(show_progress=False),
    )
  with pytest.raises(ValueError, match="empty tuple"):
    ev.EvalSetSpec("forget", "f.json", "forget", ())
