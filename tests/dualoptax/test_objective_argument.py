"""The objective as an explicit (traced) argument of ``update``, and K objectives."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from composition_helpers import (
  COMMON,
  FACTORIES,
  PARAMS0,
  PLUS_STATE,
  SHAPES,
  STATE_TYPES,
  _as_jax,
  _grads,
  _max_abs_diff,
  _objectives,
  assert_trees_close,
  assert_trees_equal,
  make,
  run,
)

import dualoptax

# ---------------------------------------------------------------------------------------
# The objective as an explicit (traced) extra argument.


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_traced_objective_compiles_once_and_matches_schedule(name):
  n = 10
  tx = make(name, **COMMON)
  traces = [0]

  def step(params, state, grads, objective):
    traces[0] += 1
    updates, state = tx.update(grads, state, params, objective=objective)
    return optax.apply_updates(params, updates), state, updates

  objs = _objectives((2, 3), n)
  assert set(objs) == {dualoptax.FORGET, dualoptax.RETAIN}
  grads = _grads(n, seed=17, objectives=objs)
  explicit = run(tx, grads, objectives=objs, step=jax.jit(step))
  assert traces[0] == 1
  scheduled = run(tx, grads)
  for i in range(n + 1):
    assert_trees_close(explicit.params[i], scheduled.params[i], rtol=1e-6, atol=1e-8)
    assert_trees_close(explicit.states[i], scheduled.states[i], rtol=1e-6, atol=1e-8)


MULTI_FACTORIES = {
  "dualoptim_plus": dualoptax.multi_objective_dualoptim_plus,
  "dualoptim": dualoptax.multi_objective_dualoptim,
}


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_explicit_objective_overrides_the_schedule(name):
  """RETAIN on every step of a (2, 3) run equals a run whose schedule is all retain."""
  n = 6
  grads = _grads(n, seed=18)
  explicit = run(make(name, **COMMON), grads, objectives=[dualoptax.RETAIN] * n)
  all_retain = run(MULTI_FACTORIES[name](1e-2, (0, 3), (0.5, 1.0), weight_decay=0.1), grads)
  for i in range(n + 1):
    assert_trees_close(explicit.params[i], all_retain.params[i], rtol=1e-6, atol=1e-8)
  s = dualoptax.find_state(explicit.states[-1], STATE_TYPES[name])
  np.testing.assert_array_equal(s.objective_counts, [0, n])
  # The forget learning rate ratio (0.5) was never used: a forget-only run differs.
  assert (
    _max_abs_diff(
      explicit.params[-1],
      run(make(name, **COMMON), grads, objectives=[dualoptax.FORGET] * n).params[-1],
    )
    > 1e-3
  )


@pytest.mark.parametrize(
  "name,steps", [("dualoptim_plus", (0, 3)), ("dualoptim_plus", (2, 0)), ("dualoptim", (0, 3))]
)
def test_two_objective_alias_accepts_one_zero_step_count(name, steps):
  """A retain-only (or forget-only) schedule, valid for the multi-objective form."""
  alias = FACTORIES[name](forget_steps=steps[0], retain_steps=steps[1])
  multi = MULTI_FACTORIES[name](1e-2, steps)
  grads = _grads(3, seed=27)
  got, want = run(alias, grads), run(multi, grads)
  for i in range(3):
    assert_trees_equal(got.params[i + 1], want.params[i + 1])


def test_python_int_objective_matches_traced_objective():
  grads = _grads(4, seed=19)
  objs = [dualoptax.RETAIN, dualoptax.FORGET, dualoptax.FORGET, dualoptax.RETAIN]
  tx = make("dualoptim_plus", **COMMON)
  traced = run(tx, grads, objectives=objs)

  traces = []

  @functools.partial(jax.jit, static_argnums=3)
  def step(params, state, grads, objective):  # the objective a plain Python int
    traces.append(objective)
    updates, state = tx.update(grads, state, params, objective=objective)
    return optax.apply_updates(params, updates), state

  params, state = PARAMS0, tx.init(PARAMS0)
  for i, (g, o) in enumerate(zip(grads, objs)):
    params, state = step(params, state, _as_jax(g), o)
    assert_trees_close(params, traced.params[i + 1], rtol=1e-6, atol=1e-7)
    assert_trees_close(state, traced.states[i + 1], rtol=1e-5, atol=1e-7)
  assert sorted(traces) == [dualoptax.FORGET, dualoptax.RETAIN]  # one trace per value


# ---------------------------------------------------------------------------------------
# K objectives.


def test_multi_objective_schedule_counters_and_isolation():
  steps, ratios, n = (1, 2, 1), (1.0, 0.5, 2.0), 12
  tx = dualoptax.multi_objective_dualoptim_plus(
    1e-2, objective_steps=steps, objective_lr_ratios=ratios
  )
  expected = [0, 1, 1, 2] * 3
  assert _objectives(steps, n) == expected
  assert [int(dualoptax.scheduled_objective(jnp.int32(s), steps)) for s in range(n)] == expected
  got = run(tx, _grads(n, seed=20, objectives=expected))
  counts = np.zeros(3, int)
  for i, k in enumerate(expected):
    before = dualoptax.find_state(got.states[i], PLUS_STATE)
    after = dualoptax.find_state(got.states[i + 1], PLUS_STATE)
    counts[k] += 1
    np.testing.assert_array_equal(after.objective_counts, counts)
    assert int(after.count) == i + 1
    for leaf in SHAPES:
      for field in ("delta_mu", "delta_nu"):
        old, new = getattr(before, field)[leaf], getattr(after, field)[leaf]
        assert new.shape == (3, *SHAPES[leaf])
        for j in range(3):
          if j != k:
            np.testing.assert_array_equal(new[j], old[j], err_msg=f"{field}{leaf} row {j}")
        assert not np.array_equal(new[k], old[k])
      assert not np.array_equal(after.base_mu[leaf], before.base_mu[leaf])
  # Per-objective learning rate: with wd = 0 each update is -lr * ratio[k] * u, and u does
  # not depend on the ratios, so the updates are ratio[k] times those of a run whose
  # ratios are all 1.
  ones = dualoptax.multi_objective_dualoptim_plus(1e-2, steps, (1.0, 1.0, 1.0))
  ones_run = run(ones, _grads(n, seed=20, objectives=expected))
  for i, k in enumerate(expected):
    assert_trees_close(
      got.updates[i],
      jax.tree.map(
        lambda u: ratios[k] * u,  # noqa: B023
        ones_run.updates[i],
      ),
      rtol=1e-6,
      atol=1e-12,
    )
