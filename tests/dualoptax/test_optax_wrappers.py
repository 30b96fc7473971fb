"""The optimizers inside optax's wrappers: clipping, schedules, masked and multi_transform,
inject_hyperparams and apply_if_finite, each checked against an independent computation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from composition_helpers import (
  COMMON,
  DUAL_STATE,
  FACTORIES,
  PARAMS0,
  PLUS_STATE,
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
# optax.chain(clip_by_global_norm, tx)


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_clip_by_global_norm_equals_preclipped_gradients(name):
  c, n = 1.0, 8
  grads = _grads(n, seed=6, scale=2.0)
  grads[3] = {k: 50.0 * v for k, v in grads[3].items()}  # one gradient far larger
  norms = [np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in g.values())) for g in grads]
  assert min(norms) > c  # clipping is active on every step
  clipped = [
    {k: (np.asarray(v, np.float64) * (c / norm)).astype(np.float32) for k, v in g.items()}
    for g, norm in zip(grads, norms)
  ]

  tx = make(name, **COMMON)
  chained = run(optax.chain(optax.clip_by_global_norm(c), tx), grads)
  preclipped = run(tx, clipped)
  unclipped = run(tx, grads)
  for got, want in zip(chained.params, preclipped.params):
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
  # The comparison can tell: without clipping the result is clearly different.
  assert _max_abs_diff(unclipped.params[-1], chained.params[-1]) > 1e-3


# ---------------------------------------------------------------------------------------
# Learning-rate schedules.


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_learning_rate_schedule_is_evaluated_at_the_total_step_count(name):
  n = 12
  schedule = optax.linear_schedule(2e-2, 2e-3, transition_steps=10)
  ratios = (0.5, 1.0)
  tx = FACTORIES[name](schedule, **COMMON)
  grads = _grads(n, seed=7, objectives=_objectives((2, 3), n))
  got = run(tx, grads)

  # Manual reference: the bare direction plus weight decay, then -schedule(t) * ratio[o(t)]
  # with t the 0-based step over the whole run and o(t) the (2, 3) schedule.
  if name == "dualoptim_plus":
    direction = dualoptax.scale_by_dualoptim_plus(objective_steps=(2, 3))
  else:
    direction = dualoptax.scale_by_dualoptim(objective_steps=(2, 3))
  base = optax.chain(direction, optax.add_decayed_weights(0.1))
  base_update = jax.jit(base.update)
  params, state = PARAMS0, base.init(PARAMS0)
  objs = _objectives((2, 3), n)
  for t, g in enumerate(grads):
    d, state = base_update(_as_jax(g), state, params)
    rate = np.float32(schedule(t)) * np.float32(ratios[objs[t]])
    params = jax.tree.map(lambda p, u: p - rate * u, params, d)  # noqa: B023
    assert_trees_close(got.params[t + 1], params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_schedule_that_drops_to_zero_freezes_params(name):
  k, n = 5, 10
  schedule = optax.piecewise_constant_schedule(1e-2, {k: 0.0})
  tx = FACTORIES[name](schedule, **COMMON)
  got = run(tx, _grads(n, seed=8))
  assert _max_abs_diff(got.params[k], got.params[k - 1]) > 1e-4  # still moving at step k-1
  for i in range(k, n + 1):
    assert_trees_equal(got.params[i], got.params[k])
  # The optimizer state keeps advancing while the learning rate is zero.
  s_k = dualoptax.find_state(got.states[k], STATE_TYPES[name])
  s_n = dualoptax.find_state(got.states[n], STATE_TYPES[name])
  assert int(s_n.count) == n
  np.testing.assert_array_equal(s_n.objective_counts, [4, 6])  # (2, 3) schedule, 10 steps
  moments = s_n.base_mu if name == "dualoptim_plus" else s_n.mu
  moments_k = s_k.base_mu if name == "dualoptim_plus" else s_k.mu
  assert _max_abs_diff(moments, moments_k) > 1e-3


# ---------------------------------------------------------------------------------------
# optax.masked and optax.multi_transform: freezing the 'embed' leaf.

MASK = {"embed": False, "w": True, "b": True}
NOT_MASK = {k: not v for k, v in MASK.items()}
LABELS = {"embed": "freeze", "w": "train", "b": "train"}


def _sub(tree):
  return {k: v for k, v in tree.items() if k != "embed"}


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_masked_updates_only_the_masked_leaves(name):
  n = 6
  grads = _grads(n, seed=9)
  tx = make(name, **COMMON)
  masked = run(optax.masked(tx, MASK), grads)
  alone = run(tx, [_sub(g) for g in grads], params=_sub(PARAMS0))
  for i in range(n):
    # optax.masked passes unmasked leaves' updates through unchanged...
    np.testing.assert_array_equal(masked.updates[i]["embed"], grads[i]["embed"])
    # ...and the masked leaves get exactly what tx gives on the sub-tree alone.
    assert_trees_close(_sub(masked.updates[i]), alone.updates[i], rtol=1e-6, atol=1e-9)
  # No moments are allocated for the unmasked leaf.
  s = dualoptax.find_state(masked.states[-1], STATE_TYPES[name])
  moments = s.delta_mu if name == "dualoptim_plus" else s.mu
  assert jax.tree.leaves(moments["embed"]) == []
  assert moments["w"].shape == (2, 4, 4)

  # Freezing: masked(tx) for the trained leaves, masked(set_to_zero) for the rest.
  frozen = run(
    optax.chain(optax.masked(tx, MASK), optax.masked(optax.set_to_zero(), NOT_MASK)), grads
  )
  for i in range(n + 1):
    np.testing.assert_array_equal(frozen.params[i]["embed"], PARAMS0["embed"])
    assert_trees_close(_sub(frozen.params[i]), alone.params[i], rtol=1e-6, atol=1e-7)
  assert _max_abs_diff(frozen.params[-1]["w"], PARAMS0["w"]) > 1e-3


@pytest.mark.parametrize(
  "name,explicit", [("dualoptim_plus", False), ("dualoptim_plus", True), ("dualoptim", True)]
)
def test_multi_transform_freezes_embed(name, explicit):
  n = 6
  grads = _grads(n, seed=10)
  # Explicit objectives that disagree with the (2, 3) schedule: they must reach tx
  # through multi_transform's extra args to give the sub-tree result.
  objs = [1, 0, 0, 1, 0, 1] if explicit else None
  tx = make(name, **COMMON)
  multi = run(
    optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, LABELS),
    grads,
    objectives=objs,
  )
  alone = run(tx, [_sub(g) for g in grads], params=_sub(PARAMS0), objectives=objs)
  for i in range(n + 1):
    np.testing.assert_array_equal(multi.params[i]["embed"], PARAMS0["embed"])
    assert_trees_close(_sub(multi.params[i]), alone.params[i], rtol=1e-6, atol=1e-7)
  s = dualoptax.find_state(multi.states[-1], STATE_TYPES[name])
  want_counts = np.bincount(objs if explicit else _objectives((2, 3), n), minlength=2)
  np.testing.assert_array_equal(s.objective_counts, want_counts)


# ---------------------------------------------------------------------------------------
# optax.inject_hyperparams.

HP = dict(learning_rate=1e-2, **COMMON)


# Betas whose float32 value and 1 - beta are exact (dyadic), and the defaults. Under
# inject_hyperparams every float hyperparameter becomes a float32 array, so 1 - beta is
# computed from the rounded beta: for b2 = 0.999 that is ~1.3e-5 relative off, an error
# the plain alias (which takes 1 - beta in float64) does not have.
EXACT_BETAS = {
  "dualoptim_plus": dict(b1=0.875, b2=0.9375, base_b1=0.75, base_b2=0.96875),
  "dualoptim": dict(b1=0.875, b2=0.9921875),
}


def test_inject_hyperparams_without_static_args():
  kw = {**HP, **EXACT_BETAS["dualoptim_plus"]}
  injected = optax.inject_hyperparams(dualoptax.dualoptim_plus)(**kw)
  grads = _grads(4, seed=26, objectives=_objectives((2, 3), 4))
  got = run(injected, grads)
  want = run(dualoptax.dualoptim_plus(**kw), grads)
  for i in range(4):
    assert_trees_close(got.updates[i], want.updates[i], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize(
  "name,betas", [("dualoptim_plus", "exact"), ("dualoptim_plus", "default"), ("dualoptim", "exact")]
)
def test_inject_hyperparams_matches_plain_alias(name, betas):
  n = 10
  factory = {"dualoptim_plus": dualoptax.dualoptim_plus, "dualoptim": dualoptax.dualoptim}
  kw = {**HP, **(EXACT_BETAS[name] if betas == "exact" else {})}
  injected = optax.inject_hyperparams(factory[name], static_args=("storage",))(**kw)
  plain = make(name, **COMMON) if betas == "default" else factory[name](**kw)
  grads = _grads(n, seed=11, objectives=_objectives((2, 3), n))
  got, want = run(injected, grads), run(plain, grads)
  assert float(got.states[-1].hyperparams["learning_rate"]) == pytest.approx(1e-2)
  rtol = 1e-6 if betas == "exact" else 1e-4
  for i in range(n):
    assert_trees_close(got.updates[i], want.updates[i], rtol=rtol, atol=rtol * 1e-4)
    assert_trees_close(got.params[i + 1], want.params[i + 1], rtol=1e-6, atol=1e-7)
  s_got = dualoptax.find_state(got.states[-1], STATE_TYPES[name])
  s_want = dualoptax.find_state(want.states[-1], STATE_TYPES[name])
  np.testing.assert_array_equal(s_got.objective_counts, s_want.objective_counts)
  assert_trees_close(s_got, s_want, rtol=max(rtol, 1e-5), atol=1e-7)


def test_inject_hyperparams_changes_take_effect_under_jit():
  tx = optax.inject_hyperparams(dualoptax.dualoptim_plus, static_args=("storage",))(**HP)
  traces = [0]

  @jax.jit
  def step(params, state, grads):
    traces[0] += 1
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  grads = [_as_jax(g) for g in _grads(8, seed=12)]
  params, state = PARAMS0, tx.init(PARAMS0)
  for g in grads[:3]:
    params, state, _ = step(params, state, g)
  assert int(dualoptax.find_state(state, PLUS_STATE).count) == 3

  # Step 3 is a retain step of the (2, 3) schedule. Doubling the learning rate doubles the
  # update (the direction does not depend on it; weight decay is scaled by it too).
  reference_params, reference_state, reference_updates = step(params, state, grads[3])
  state.hyperparams["learning_rate"] = jnp.float32(2e-2)
  doubled_params, doubled_state, doubled_updates = step(params, state, grads[3])
  assert_trees_close(
    doubled_updates, jax.tree.map(lambda u: 2 * u, reference_updates), rtol=1e-6, atol=1e-12
  )
  assert float(doubled_state.hyperparams["learning_rate"]) == pytest.approx(2e-2)
  # The moments do not depend on the learning rate.
  assert_trees_equal(
    dualoptax.find_state(doubled_state, PLUS_STATE),
    dualoptax.find_state(reference_state, PLUS_STATE),
  )

  # A zero learning rate leaves the params where they are.
  state.hyperparams["learning_rate"] = jnp.float32(0.0)
  frozen_params, state, _ = step(params, state, grads[3])
  assert_trees_equal(frozen_params, params)

  # A zero forget ratio freezes exactly the forget steps (steps 5, 6 of the schedule).
  state.hyperparams["learning_rate"] = jnp.float32(1e-2)
  state.hyperparams["forget_lr_ratio"] = jnp.float32(0.0)
  params = frozen_params
  for i, g in zip(range(4, 8), grads[4:]):
    new_params, state, _ = step(params, state, g)
    if i in (5, 6):
      assert_trees_equal(new_params, params)
    else:
      assert _max_abs_diff(new_params, params) > 1e-4
    params = new_params
  assert traces[0] == 1  # one compilation served every hyperparameter value


# ---------------------------------------------------------------------------------------
# optax.apply_if_finite, and non-finite gradients without it.


def _poison(g, value, leaf="w", index=(1, 2)):
  g = {k: np.array(v) for k, v in g.items()}
  g[leaf][index] = value
  return g


@functools.cache
def _if_finite(name):
  return optax.apply_if_finite(make(name, **COMMON), max_consecutive_errors=2)


@pytest.mark.parametrize(
  "name,bad",
  [
    ("dualoptim_plus", np.nan),
    ("dualoptim_plus", np.inf),
    ("dualoptim_plus", -np.inf),
    ("dualoptim", np.nan),
  ],
)
def test_apply_if_finite_skips_the_bad_step_entirely(name, bad):
  good = _grads(7, seed=13)
  with_bad = good[:3] + [_poison(good[3], bad)] + good[3:]
  wrapped_tx = _if_finite(name)
  wrapped = run(wrapped_tx, with_bad)
  never_bad = run(wrapped_tx, good)
  plain = run(make(name, **COMMON), good)

  # The bad step (index 3) changes nothing: params, moments, every counter.
  assert_trees_equal(wrapped.params[4], wrapped.params[3])
  assert_trees_equal(wrapped.states[4].inner_state, wrapped.states[3].inner_state)
  assert_trees_equal(wrapped.updates[3], jax.tree.map(jnp.zeros_like, PARAMS0))
  assert int(wrapped.states[4].notfinite_count) == 1
  assert int(wrapped.states[4].total_notfinite) == 1
  assert not bool(wrapped.states[4].last_finite)
  # Later steps proceed as if it never happened.
  for i in range(3, 8):
    assert_trees_equal(wrapped.params[i + 1], never_bad.params[i])
    assert_trees_equal(wrapped.states[i + 1].inner_state, never_bad.states[i].inner_state)
    assert_trees_close(wrapped.params[i + 1], plain.params[i], rtol=1e-6, atol=1e-7)
  assert int(wrapped.states[-1].notfinite_count) == 0
  assert int(wrapped.states[-1].total_notfinite) == 1
  for leaf in jax.tree.leaves(wrapped.states[-1]):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(leaf))


def test_apply_if_finite_gives_up_after_max_consecutive_errors():
  good = _grads(4, seed=14)
  bad = _poison(good[0], np.nan)
  got = run(_if_finite("dualoptim_plus"), [good[0], bad, bad, bad, good[1]])
  assert_trees_equal(got.params[3], got.params[1])  # two rejected
  s = dualoptax.find_state(got.states[4], PLUS_STATE)  # the third is accepted
  assert int(s.count) == 2
  assert np.isnan(s.base_mu["w"][1, 2])
  assert np.isnan(got.params[4]["w"][1, 2])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_gradient_without_wrapper_enters_the_state(bad):
  grads = _grads(4, seed=15)
  grads[2] = _poison(grads[2], bad)
  objs = [dualoptax.FORGET, dualoptax.RETAIN, dualoptax.FORGET, dualoptax.RETAIN]
  got = run(make("dualoptim_plus", **COMMON), grads, objectives=objs)
  f, r = dualoptax.FORGET, dualoptax.RETAIN
  s = dualoptax.find_state(got.states[3], PLUS_STATE)
  assert not np.isfinite(s.base_mu["w"][1, 2])
  assert not np.isfinite(s.base_nu["w"][1, 2])
  assert not np.isfinite(s.delta_mu["w"][f, 1, 2])
  assert not np.isfinite(s.delta_nu["w"][f, 1, 2])
  assert np.all(np.isfinite(s.delta_mu["w"][r]))  # the other objective is untouched
  assert np.all(np.isfinite(s.delta_nu["w"][r]))
  assert not np.isfinite(got.params[3]["w"][1, 2])
  # It stays: the next (retain) step reads the poisoned base.
  s = dualoptax.find_state(got.states[4], PLUS_STATE)
  assert not np.isfinite(s.delta_mu["w"][r, 1, 2])
  assert not np.isfinite(got.updates[3]["w"][1, 2])
  # Elementwise: the other entries and leaves are still finite.
  finite = np.ones((4, 4), bool)
  finite[1, 2] = False
  assert np.all(np.isfinite(np.asarray(s.base_mu["w"])[finite]))
  assert np.all(np.isfinite(s.base_mu["b"])) and np.all(np.isfinite(s.base_mu["embed"]))


def test_nonfinite_gradient_enters_dualoptim_state_of_active_objective_only():
  grads = _grads(3, seed=16)
  grads[1] = _poison(grads[1], np.nan)
  got = run(make("dualoptim", **COMMON), grads, objectives=[0, 0, 1])
  s = dualoptax.find_state(got.states[2], DUAL_STATE)
  assert np.isnan(s.mu["w"][0, 1, 2]) and np.isnan(s.nu["w"][0, 1, 2])
  assert np.all(np.isfinite(s.mu["w"][1])) and np.all(np.isfinite(s.nu["w"][1]))
  s = dualoptax.find_state(got.states[3], DUAL_STATE)
  assert np.all(np.isfinite(s.mu["w"][1]))  # DualOptim's retain state stays clean
