"""Primal-dual unlearning in the training program: the multiplier acts where it changes the
step (a larger lambda moves the parameters further toward the retain objective, with Adam,
DualOptim and DualOptim+, where weighting the retain LOSS is undone by DualOptim's own
moments), the joint step weights the retain loss by it, the metrics log it, and a resumed
run repeats the uninterrupted one, multiplier included."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_lm import table_inputs, table_logits_fn, table_params

import dualoptax
from train import losses, program
from train.config import (
  ConfigError,
  ConstraintSection,
  DataConfig,
  LossSection,
  ModelConfig,
  OptimizerConfig,
  RunConfig,
  TrainingConfig,
)
from train.program.optimizer import make_optimizer, with_constraint
from train.program.step import TrainStep

_logits_fn, _params, _inputs = table_logits_fn, table_params, table_inputs


def _retain_loss_after(name, multiplier=None, retain_coeff=1.0, steps=6):
  """The retain loss after ``steps`` alternating GA+GD steps (1 forget, 2 retain), with the
  multiplier fixed at ``multiplier`` (dual step 0) or no constraint (None)."""
  config = OptimizerConfig(name=name, learning_rate=3e-2, retain_steps=2, warmup_steps=0)
  tx = make_optimizer(config, total_steps=steps)
  if multiplier is not None:
    section = ConstraintSection(
      enabled=True, bound=0.0, dual_learning_rate=0.0, initial_multiplier=multiplier
    )
    tx = with_constraint(tx, section, joint=False)
  spec = losses.LossConfig.from_spec("GA+GD", retain_coeff=retain_coeff)
  step = TrainStep(_logits_fn, tx, spec, constrained=multiplier is not None)
  run = jax.jit(step.alternating)
  params, forget, retain = _params(), _inputs(1), _inputs(2)
  state = tx.init(params)
  for i in range(steps):
    objective = 0 if i % 3 == 0 else 1
    inputs = forget if objective == 0 else retain
    params, state, _ = run(params, state, None, inputs, jnp.int32(objective))
  return float(
    losses.gd_loss(
      _logits_fn(params, retain.answers.input_ids[0], None),
      jax.tree.map(lambda x: x[0], retain.answers),
    )
  )


@pytest.mark.parametrize("name", ["adam", "dualoptim", "dualoptim_plus"])
def test_a_larger_multiplier_moves_further_toward_the_retain_objective(name):
  after = [_retain_loss_after(name, lam) for lam in (0.25, 1.0, 4.0)]
  assert after[0] > after[1] > after[2], after
  # lambda = 1 is the unconstrained run.
  np.testing.assert_allclose(after[1], _retain_loss_after(name), rtol=1e-6)


def test_weighting_the_retain_loss_instead_is_undone_by_dualoptims_own_moments():
  """Why lambda is a learning-rate ratio: DualOptim normalises each objective's step by its
  own moments, so a retain loss 4x heavier gives (almost) the same run."""
  plain, heavier = _retain_loss_after("dualoptim"), _retain_loss_after("dualoptim", None, 4.0)
  np.testing.assert_allclose(heavier, plain, rtol=1e-4)
  assert abs(_retain_loss_after("dualoptim", 4.0) - plain) > 100 * abs(heavier - plain)


def test_joint_step_weights_the_retain_loss_by_the_multiplier():
  params, forget, retain = _params(), _inputs(1), _inputs(2)
  spec = losses.LossConfig.from_spec("GA+GD")
  grads_of = {}
  for lam in (0.0, 3.0):
    section = ConstraintSection(enabled=True, bound=0.0, initial_multiplier=lam)
    # SGD: the update is the gradient itself, so it shows the weighted loss's gradient.
    tx = with_constraint(optax.sgd(1.0), section, joint=True)
    step = TrainStep(_logits_fn, tx, spec, constrained=True)
    new, state, metrics = step.joint(params, tx.init(params), None, forget, retain)
    grads_of[lam] = jax.tree.map(jnp.subtract, params, new)
    assert float(metrics["multiplier"]) == pytest.approx(lam + float(metrics["last_retain_loss"]))
  # Linear in lambda: g(3) - g(0) = 3 * retain gradient, nonzero.
  diff = jax.tree.map(jnp.subtract, grads_of[3.0], grads_of[0.0])
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(diff)) > 1e-3


def test_constraint_needs_a_retain_loss_and_refuses_multitask():
  with pytest.raises(ConfigError, match="loss.name 'GA' has none"):
    RunConfig(loss=LossSection(name="GA"), constraint=ConstraintSection(enabled=True)).validate()
  with pytest.raises(ConfigError, match="not supported with scenario=multitask"):
    RunConfig(scenario="multitask", constraint=ConstraintSection(enabled=True)).validate()
  with pytest.raises(ConfigError, match="constraint.max_multiplier"):
    ConstraintSection(enabled=True, max_multiplier=0.5).validate("constraint")


def _run_config(tmp_path, data_dir, mode, name):
  return RunConfig(
    output_dir=str(tmp_path),
    model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2),
    data=DataConfig(path=str(data_dir), template="phi", max_length=48, batch_size=4),
    optimizer=OptimizerConfig(name=name, learning_rate=1e-2, retain_steps=2, warmup_steps=0),
    loss=LossSection(name="LMF+GD"),
    training=TrainingConfig(steps=6, mode=mode, diagnostics_every=100, checkpoint_every=2),
    constraint=ConstraintSection(enabled=True, bound_ratio=0.999, dual_learning_rate=2.0),
  ).validate()


def _unlearn(config, tokenizer, data_dir, run_dir):
  from train.program.modeling import FunctionalModel, build_model

  module, model_config = build_model(config.model, tokenizer, seed=1)
  model, params = FunctionalModel.split(module, model_config)
  splits = program.load_splits(config, str(data_dir))
  streams = program.make_streams(config, splits, tokenizer, config.loss.build())
  return program.unlearn(config, model, params, params, *streams, run_dir)


@pytest.mark.parametrize("mode, name", [("alternating", "dualoptim_plus"), ("joint", "adam")])
def test_constrained_run_logs_the_multiplier_and_resumes_exactly(
  tmp_path, data_dir, trained_tokenizer, mode, name
):
  config = _run_config(tmp_path, data_dir, mode, name)
  whole = _unlearn(config, trained_tokenizer, data_dir, tmp_path / "whole")
  history = whole.history
  assert all(key in h for h in history for key in ("multiplier", "bound", "slack"))
  assert all(h["multiplier"] >= 0 for h in history)
  retain_steps = [h for h in history if h["objective"] != 0]
  # The bound is 0.999 x the first retain loss, so that step already violates it: lambda rises.
  first = retain_steps[0]
  assert first["bound"] == pytest.approx(0.999 * first["last_retain_loss"], rel=1e-5)
  assert first["multiplier"] > 1.0
  assert float(dualoptax.lagrange_multiplier(whole.opt_state)) == history[-1]["multiplier"]
  if mode == "alternating":
    return  # one resume check is enough: the multiplier is in the optimizer state either way
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(tmp_path / "whole", resumed_dir)
  shutil.rmtree(resumed_dir / "checkpoints" / "6")
  resumed = _unlearn(config, trained_tokenizer, data_dir, resumed_dir)
  assert [h["step"] for h in resumed.history] == [5, 6]
  assert [h["multiplier"] for h in resumed.history] == [h["multiplier"] for h in history[4:]]
  for a, b in zip(jax.tree.leaves(whole.opt_state), jax.tree.leaves(resumed.opt_state)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
