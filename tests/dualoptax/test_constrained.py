"""The Lagrange multiplier of primal-dual unlearning: projected dual ascent (rises while the
constraint is violated, falls while it holds, never below 0 or above its cap), a bound set
from the first observed loss, untouched by steps that did not observe the constrained loss,
and applied to the constrained objective's updates only."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax

NAN = math.nan


def _run(tx, observations, params=None):
  """Feeds ``(objective, [forget loss, retain loss])`` steps with unit gradients; returns
  the states after each step and the updates."""
  params = {"w": jnp.ones(3)} if params is None else params
  state, states, updates = tx.init(params), [], []
  for objective, seen in observations:
    grads = {"w": jnp.ones(3)}
    update, state = tx.update(
      grads, state, params, objective=objective, objective_losses=jnp.asarray(seen, jnp.float32)
    )
    states.append(state)
    updates.append(update)
  return states, updates


def _multipliers(states):
  return [float(dualoptax.lagrange_multiplier(s)) for s in states]


def test_multiplier_rises_while_violated_and_falls_to_zero_while_satisfied():
  tx = dualoptax.scale_by_lagrange_multiplier(bound=1.0, dual_learning_rate=0.5)
  retain_losses = [3.0, 2.0, 1.5, 0.5] + [0.0] * 7
  states, _ = _run(tx, [(1, [NAN, loss]) for loss in retain_losses])
  expected, lam = [], 1.0
  for loss in retain_losses:
    lam = max(0.0, lam + 0.5 * (loss - 1.0))
    expected.append(lam)
  np.testing.assert_allclose(_multipliers(states), expected, rtol=1e-6)
  assert _multipliers(states)[2] > _multipliers(states)[0] > 1.0  # violated: rising
  assert _multipliers(states)[-1] == 0.0  # satisfied long enough: projected at 0, not below
  assert min(_multipliers(states)) >= 0.0


def test_cap_bound_ratio_and_steps_that_do_not_observe_the_constraint():
  tx = dualoptax.scale_by_lagrange_multiplier(
    bound_ratio=1.5, dual_learning_rate=1.0, initial_multiplier=2.0, max_multiplier=3.0
  )
  steps = [(0, [5.0, NAN]), (1, [NAN, 2.0]), (0, [4.0, NAN]), (1, [NAN, 10.0])]
  states, _ = _run(tx, steps)
  # Before any retain loss: no bound, multiplier untouched by the forget step.
  assert math.isnan(float(states[0].bound)) and _multipliers(states)[0] == 2.0
  # The first retain loss sets eps = 1.5 * 2 = 3; lambda += 2 - 3.
  assert float(states[1].bound) == 3.0 and _multipliers(states)[1] == 1.0
  assert _multipliers(states)[2] == 1.0  # a forget step leaves it
  assert float(states[3].bound) == 3.0  # set once
  assert _multipliers(states)[3] == 3.0  # 1 + (10 - 3) = 8, capped at 3
  np.testing.assert_array_equal(states[3].last_losses, [4.0, 10.0])
  metrics = dualoptax.constraint_metrics(states[3])
  assert float(metrics["slack"]) == -7.0


def test_updates_scaled_on_constrained_steps_only_with_the_multiplier_before_the_step():
  tx = dualoptax.scale_by_lagrange_multiplier(bound=0.0, initial_multiplier=0.5)
  _, updates = _run(tx, [(0, [1.0, NAN]), (1, [NAN, 2.0]), (1, [NAN, 2.0])])
  np.testing.assert_array_equal(updates[0]["w"], np.ones(3))  # forget: unscaled
  np.testing.assert_array_equal(updates[1]["w"], 0.5 * np.ones(3))  # lambda_0
  np.testing.assert_array_equal(updates[2]["w"], 2.5 * np.ones(3))  # 0.5 + (2 - 0)
  joint = dualoptax.scale_by_lagrange_multiplier(bound=0.0, scale_updates=False)
  _, updates = _run(joint, [(1, [1.0, 2.0])])
  np.testing.assert_array_equal(updates[0]["w"], np.ones(3))


@pytest.mark.parametrize(
  "kwargs, named",
  [
    (dict(), "bound"),
    (dict(bound=1.0, bound_ratio=1.1), "bound"),
    (dict(bound=math.inf), "bound"),
    (dict(bound_ratio=-1.0), "bound_ratio"),
    (dict(bound=1.0, dual_learning_rate=-0.1), "dual_learning_rate"),
    (dict(bound=1.0, initial_multiplier=-1.0), "initial_multiplier"),
    (dict(bound=1.0, initial_multiplier=2.0, max_multiplier=1.0), "max_multiplier"),
  ],
)
def test_bad_settings_name_the_value(kwargs, named):
  with pytest.raises(ValueError, match=named):
    dualoptax.scale_by_lagrange_multiplier(**kwargs)


def test_update_without_the_losses_is_refused():
  tx = optax.chain(dualoptax.dualoptim_plus(1e-3), dualoptax.scale_by_lagrange_multiplier(bound=1))
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="objective_losses"):
    tx.update(params, tx.init(params), params, objective=1)
