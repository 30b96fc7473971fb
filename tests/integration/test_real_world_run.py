"""The real-world scenario end to end on the tiny model: the embedded people, two of them
forgotten at once through DualOptim+, and the evaluation against ``golden_answer`` before
and after (forget, neighbor and a utility set; model utility from the sets present)."""

import json

import numpy as np
import pytest

from train.config import load_config
from train.scenarios import real_world

SHORT = [
  "training.steps=6",
  "training.diagnostics_every=3",
  "training.checkpoint_every=6",
  "eval.max_items=6",
  "eval.max_new_tokens=8",
  "eval.batch_size=8",
  "data.batch_size=4",
  "optimizer.warmup_steps=1",
  "model.hidden_size=64",
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  out = tmp_path_factory.mktemp("real_world")
  config = load_config("configs/real_world_tiny.yaml", [f"output_dir={out}", *SHORT])
  return out, config, real_world.run(config)


def test_run_unlearns_the_selected_people_and_evaluates_before_and_after(experiment):
  out, config, result = experiment
  rows = result["rows"]
  assert list(rows)[0] == "before" and len(rows) == 2
  before, after = rows.values()
  assert before["forgotten_people"].keys() == {"1", "2"}
  for summary in rows.values():
    for key in real_world.HEADLINE:
      assert np.isfinite(summary[key]), key
    assert summary["model_utility_sets"] == {"neighbor": "retain", "general_knowledge": "utility"}
    assert summary["model_utility_missing"] == ["real_authors (no set)", "world_facts (no set)"]
    assert len(summary["model_utility_terms"]) == 6
    assert summary["sets"]["forget"]["answer_key"] == "golden_answer"
    assert summary["sets"]["forget"]["task_id"] == [1, 2]
  # GD lowers the neighbors' NLL; NPO holds the forgotten people's back (from random
  # weights both start near log(vocabulary), so the gap between them is what widens).
  history = result["history"]
  forget = [r["nll"] for r in history if r["objective"] == 0]
  retain = [r["nll"] for r in history if r["objective"] == 1]
  assert len(forget) == len(retain) == 3 and retain[-1] < retain[0]
  assert forget[-1] - retain[-1] > forget[0] - retain[0]
  assert after["neighbor/probability"] != before["neighbor/probability"]
  items = json.loads((out / "eval" / "tofu_eval_items.json").read_text())
  forget_items = items["sets"]["forget"]["items"]
  golden = {
    json.loads(line)["question"]: json.loads(line)["golden_answer"]
    for line in (out / "data" / "forget_perturbed.json").read_text().splitlines()
  }
  # The evaluation scores golden_answer, and the items come from tasks 1 and 2 only.
  assert all(row["answer"] == golden[row["question"]] for row in forget_items)
  assert {row["task_id"] for row in forget_items} <= {1, 2} and len(forget_items) == 6
  assert (out / real_world.REPORT_FILE).read_text().count("\n| ") == 3
  assert (out / "model" / "config.json").exists()
