"""``train.scenarios`` routes each scenario's data to the program: the two objectives'
rows of TOFU, real-world and safety data, read through one entry point."""

import pytest

from train import scenarios
from train.config import ConfigError, RunConfig, apply_overrides
from train.data import real_world, safety_synthetic, synthetic


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("scenarios")
  synthetic.write_synthetic_tofu(root / "tofu")
  real_world.write_synthetic_real_world(root / "real_world")
  safety_synthetic.write_synthetic_safety(root / "safety")
  return root


def test_each_scenario_gives_its_own_two_objectives(folders):
  tofu = apply_overrides(RunConfig(), [f"data.path={folders / 'tofu'}"])
  splits = scenarios.load_splits(tofu, str(folders / "tofu"))
  assert splits.forget_split == "forget10" and {i.task_id for i in splits.forget} == {1}

  rw = apply_overrides(
    RunConfig(),
    ["scenario=real_world", f"real_world.path={folders / 'real_world'}", "real_world.task_ids=[2]"],
  )
  splits = scenarios.load_splits(rw, None)
  assert {i.task_id for i in splits.forget} == {2}
  assert not {i.question for i in splits.forget} & {i.question for i in splits.retain}

  safe = apply_overrides(
    RunConfig(), ["scenario=safety", "loss.name=SFT+GD", f"safety.path={folders / 'safety'}"]
  )
  splits = scenarios.load_splits(safe, None)
  assert splits.forget_split == "harmful_train" and splits.retain_split == "utility_train"
  assert set(splits.idk_answers) == {i.answer for i in splits.forget}  # the refusals


def test_only_the_experiment_runs_multitask(folders):
  config = apply_overrides(RunConfig(), ["scenario=multitask"])
  for command in ("unlearn", "evaluate", "finetune"):
    with pytest.raises(ConfigError, match=f"no {command} stage"):
      scenarios.check_stage(command, config)
  scenarios.check_stage("unlearn", RunConfig())  # tofu runs every stage
