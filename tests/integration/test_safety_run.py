"""The safety-alignment scenario end to end on the tiny model: the embedded data, both
objectives descending through DualOptim+, refusal rates before and after, and the CLI's
``unlearn`` / ``evaluate`` stages with ``scenario=safety``."""

import json

import numpy as np
import pytest

from train import cli
from train.config import ConfigError, apply_overrides, load_config
from train.scenarios import safety

SHORT = [
  "training.steps=6",
  "training.diagnostics_every=3",
  "training.checkpoint_every=6",
  "eval.max_items=4",
  "eval.max_new_tokens=8",
  "eval.batch_size=4",
  "safety.refusal_tokens=8",
  "data.batch_size=4",
  "optimizer.warmup_steps=1",
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  out = tmp_path_factory.mktemp("safety")
  config = load_config("configs/safety_tiny.yaml", [f"output_dir={out}", *SHORT])
  return out, config, safety.run(config)


def test_experiment_evaluates_before_and_after_and_descends_on_both(experiment):
  out, config, result = experiment
  rows = result["rows"]
  assert list(rows)[0] == "before" and len(rows) == 2
  for summary in rows.values():
    for key in safety.HEADLINE:
      assert np.isfinite(summary[key]), key
    assert 0.0 <= summary["refusal_rate/harmful"] <= 1.0
    assert summary["sizes"] == {"harmful": 4, "benign": 4, "utility": 4}
  # Both objectives descend: the refusal (SFT) and utility (GD) NLLs fall over the run.
  history = result["history"]
  forget = [r["nll"] for r in history if r["objective"] == 0]
  retain = [r["nll"] for r in history if r["objective"] == 1]
  assert forget[-1] < forget[0] and retain[-1] < retain[0]
  assert rows["before"]["utility/nll"] > list(rows.values())[1]["utility/nll"]
  stored = json.loads((out / "eval" / safety.SUMMARY_FILE).read_text())
  assert len(stored["items"]["harmful"]) == 4
  assert {"question", "generation", "refusal"} <= set(stored["items"]["harmful"][0])
  assert (out / safety.REPORT_FILE).read_text().count("\n| ") == 3  # header, before, after
  assert (out / "model" / "config.json").exists()
  assert (out / "data" / "harmful_train.json").exists()


def test_cli_stages_run_the_scenario(experiment, tmp_path, capsys):
  out, _, _ = experiment
  args = ["configs/safety_tiny.yaml", f"output_dir={tmp_path}", *SHORT]
  assert cli.main(["unlearn", *args, "training.steps=2", "training.checkpoint_every=2"]) == 0
  assert (tmp_path / "metrics.jsonl").exists()
  model = tmp_path / "model"
  # A fresh tiny model trains its tokenizer on the data; evaluate the aligned one.
  assert cli.main(["evaluate", *args, f"model.path={model}"]) == 0
  assert "refusal_rate/harmful" in capsys.readouterr().out
  assert (tmp_path / "eval" / safety.SUMMARY_FILE).exists()


def test_safety_needs_a_descent_forget_loss_and_its_files(tmp_path):
  with pytest.raises(ConfigError, match="loss.name must start with one of"):
    load_config("configs/safety_tiny.yaml", ["loss.name=NPO+GD"])
  with pytest.raises(ConfigError, match="safety.refusal_tokens must be positive"):
    load_config("configs/safety_tiny.yaml", ["safety.refusal_tokens=0"])
  config = load_config(
    "configs/safety_tiny.yaml", [f"safety.path={tmp_path}", "safety.benign_eval=nope.json"]
  )
  with pytest.raises(FileNotFoundError, match=r"safety.benign_eval: .*nope.json"):
    safety.safety_files(config)
  assert apply_overrides(config, ["scenario=tofu"]).scenario == "tofu"
