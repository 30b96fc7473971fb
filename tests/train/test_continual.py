"""The pieces of continual unlearning that need no model: each task's retain set, the
carried optimizer state, and the settings the mode refuses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dualoptax
from train.config import ConfigError, OptimizerConfig, RunConfig, apply_overrides
from train.data import synthetic
from train.program.optimizer import make_optimizer, restart_learning_rate_schedule
from train.scenarios import continual


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  folder = tmp_path_factory.mktemp("data")
  synthetic.write_synthetic_tofu(folder, num_tasks=3)
  return apply_overrides(
    RunConfig(),
    [f"data.path={folder}", "data.forget_split=forget10", "continual.task_ids=[2, 1, 3]"],
  )


def test_each_task_retains_the_tasks_not_yet_unlearned(config):
  data_dir = config.data.path
  first, second = (continual.task_splits(config, data_dir, k) for k in (1, 2))
  forgotten = {item.question for item in first.forget}  # task 2's rows
  retained_first = {item.question for item in first.retain}
  retained_second = {item.question for item in second.retain}
  assert forgotten and not forgotten & retained_first
  assert not forgotten & retained_second  # unlearned before task 1: no longer retained
  assert {item.question for item in second.forget} & retained_first  # task 1 was retained
  assert retained_second < retained_first
  assert {item.task_id for item in second.forget} == {1}


def test_task_configs_name_their_folder_and_task(config):
  tc = continual.task_config(config, 2, 1)
  assert tc.data.task_id == 1 and tc.output_dir.endswith("task2_id1")
  real = apply_overrides(config, ["scenario=real_world"])
  assert continual.task_config(real, 1, 5).real_world.task_ids == (5,)


def _stepped_state(name):
  tx = make_optimizer(OptimizerConfig(name=name, warmup_steps=2), total_steps=4, steps_per_epoch=2)
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  state = tx.init(params)
  for step in range(3):
    grads = {"w": jnp.full((2, 3), step + 1.0)}
    _, state = tx.update(grads, state, params, objective=jnp.int32(step % 2))
  return state


@pytest.mark.parametrize("name", ["adam", "dualoptim", "dualoptim_plus"])
def test_a_carried_state_restarts_the_schedule_and_keeps_the_moments(name):
  state = _stepped_state(name)
  restarted = restart_learning_rate_schedule(state)
  schedules = lambda s: [  # noqa: E731
    x
    for x in jax.tree.leaves(
      s, is_leaf=lambda x: isinstance(x, dualoptax.ScaleByObjectiveLearningRateState)
    )
    if isinstance(x, dualoptax.ScaleByObjectiveLearningRateState)
  ]
  assert [int(s.count) for s in schedules(state)] == [3]
  assert [int(s.count) for s in schedules(restarted)] == [0]
  others = lambda s: [  # noqa: E731
    np.asarray(x)
    for x in jax.tree.leaves(
      jax.tree.map(
        lambda x: None if isinstance(x, dualoptax.ScaleByObjectiveLearningRateState) else x,
        s,
        is_leaf=lambda x: isinstance(x, dualoptax.ScaleByObjectiveLearningRateState),
      )
    )
  ]
  assert len(others(state)) > 2
  for a, b in zip(others(state), others(restarted)):
    np.testing.assert_array_equal(a, b)


def test_settings_continual_refuses(config):
  with pytest.raises(ConfigError, match="scenario tofu or real_world"):
    continual.check(apply_overrides(config, ["scenario=safety", "loss.name=SFT+GD"]))
  lora = dataclasses.replace(
    config.model, lora=dataclasses.replace(config.model.lora, enabled=True)
  )
  with pytest.raises(ConfigError, match="model.lora.enabled=false"):
    continual.check(dataclasses.replace(config, model=lora))
  with pytest.raises(ConfigError, match="continual.task_ids must be distinct"):
    apply_overrides(config, ["continual.task_ids=[1, 1]"])
