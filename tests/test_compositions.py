"""The optimizers compose with optax, checked numerically.

Each test runs a few jitted steps on a small parameter tree and compares against an
independent computation: the same optimizer fed hand-transformed inputs, a manual learning
rate, a sub-tree run, optax's own Adam, or a float64 numpy implementation of the
algorithm written here from the specification (design/ALGORITHM.md).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax

SHAPES = {"embed": (8, 4), "w": (4, 4), "b": (4,)}
PLUS_STATE = dualoptax.ScaleByDualOptimPlusState
DUAL_STATE = dualoptax.ScaleByDualOptimState


# ---------------------------------------------------------------------------------------
# Helpers.


def _tree(rng: np.random.Generator, scale: float = 1.0, shapes=None) -> dict[str, np.ndarray]:
  shapes = SHAPES if shapes is None else shapes
  return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


PARAMS0 = {k: jnp.asarray(v) for k, v in _tree(np.random.default_rng(0)).items()}


def _objectives(objective_steps: Sequence[int], n: int) -> list[int]:
  """The alternating schedule, written out independently of dualoptax."""
  cycle = [k for k, count in enumerate(objective_steps) for _ in range(count)]
  return [cycle[s % len(cycle)] for s in range(n)]


def _grads(n: int, seed: int = 1, objectives: Optional[Sequence[int]] = None,
           scale: float = 1.0) -> list[dict[str, np.ndarray]]:
  """Random gradients; with ``objectives``, each objective also has its own mean direction
  (objective 0 against the others) so forget and retain partly conflict."""
  rng = np.random.default_rng(seed)
  means = [_tree(rng) for _ in range(4)]
  out = []
  for s in range(n):
    g = _tree(rng)
    if objectives is not None:
      sign = -1.0 if objectives[s] == 0 else 1.0
      mean = means[objectives[s]]
      g = {k: g[k] + sign * means[3][k] + 0.5 * mean[k] for k in g}
    # Magnitudes in [0.5, ~3]: DualOptim+ takes sqrt(|Eh + Vh|), which cancels in float32
    # when a gradient entry is tiny next to its history (then eager, jit and float64 all
    # disagree at the 1e-3 level in that entry); keeping entries away from 0 avoids it.
    out.append({k: (scale * np.sign(v) * (0.5 + 0.5 * np.abs(v))).astype(np.float32)
                for k, v in g.items()})
  return out


def _as_jax(tree):
  return jax.tree.map(jnp.asarray, tree)


def _np(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def _leaves_with_paths(tree):
  return [(jax.tree_util.keystr(p), leaf)
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), (_, y) in zip(_leaves_with_paths(a), _leaves_with_paths(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)


def assert_trees_close(a, b, rtol, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), (_, y) in zip(_leaves_with_paths(a), _leaves_with_paths(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=path)


def _max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class Run(NamedTuple):
  params: list[Any]  # params[i] after i steps (params[0] the initial ones)
  states: list[Any]  # states[i] after i steps
  updates: list[Any]  # updates[i] of step i (0-based)


@functools.lru_cache(maxsize=None)
def _stepper(tx, explicit: bool):
  if explicit:
    def step(params, state, grads, objective):
      updates, state = tx.update(grads, state, params, objective=objective)
      return optax.apply_updates(params, updates), state, updates
  else:
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, updates
  return jax.jit(step)


def run(tx, grads, params=None, objectives=None, step=None) -> Run:
  params = PARAMS0 if params is None else _as_jax(params)
  state = tx.init(params)
  step = step or _stepper(tx, objectives is not None)
  out = Run([params], [state], [])
  for i, g in enumerate(grads):
    args = (params, state, _as_jax(g))
    if objectives is not None:
      args += (jnp.int32(objectives[i]),)
    params, state, updates = step(*args)
    out.params.append(params)
    out.states.append(state)
    out.updates.append(updates)
  return out


def _plus(lr=1e-2, **kw):
  return dualoptax.dualoptim_plus(lr, **kw)


def _dual(lr=1e-2, **kw):
  return dualoptax.dualoptim(lr, **kw)


FACTORIES = {"dualoptim_plus": _plus, "dualoptim": _dual}


@functools.lru_cache(maxsize=None)
def _make_cached(name, items):
  return FACTORIES[name](**dict(items))


def make(name, **kw):
  """The same transformation object for the same arguments, so that tests share the
  compiled steps of ``_stepper`` (it is cached per transformation)."""
  return _make_cached(name, tuple(sorted(kw.items())))
STATE_TYPES = {"dualoptim_plus": PLUS_STATE, "dualoptim": DUAL_STATE}
COMMON = dict(weight_decay=0.1, forget_lr_ratio=0.5, forget_steps=2, retain_steps=3)


# ---------------------------------------------------------------------------------------
# Float64 numpy references, written from design/ALGORITHM.md.


def reference_dualoptim_plus(params0, grads, objectives, lr, ratios, b1, b2, bb1, bb2,
                             eps, wd):
  """DualOptim+ for K objectives in float64. Returns (params trajectory, final state)."""
  k_obj = len(ratios)
  p = {k: np.asarray(v, np.float64) for k, v in params0.items()}
  zeros = lambda: {k: np.zeros_like(v) for k, v in p.items()}  # noqa: E731
  base_m, base_v = zeros(), zeros()
  delta_m = [zeros() for _ in range(k_obj)]
  delta_v = [zeros() for _ in range(k_obj)]
  t, t_obj = 0, [0] * k_obj
  trajectory = [dict(p)]
  for g, o in zip(grads, objectives):
    t += 1
    t_obj[o] += 1
    eta = lr * ratios[o]
    new_p = {}
    for k in p:
      gk = np.asarray(g[k], np.float64)
      bh = base_m[k] / (1 - bb1 ** (t - 1)) if t > 1 else base_m[k]
      vh = base_v[k] / (1 - bb2 ** (t - 1)) if t > 1 else base_v[k]
      delta_m[o][k] = b1 * delta_m[o][k] + (1 - b1) * (gk - bh)
      delta_v[o][k] = b2 * delta_v[o][k] + (1 - b2) * (gk * gk - vh)
      dh = delta_m[o][k] / (1 - b1 ** t_obj[o])
      eh = delta_v[o][k] / (1 - b2 ** t_obj[o])
      u = (dh + bh) / (np.sqrt(np.abs(eh + vh)) + eps)
      new_p[k] = p[k] * (1 - eta * wd) - eta * u
      base_m[k] = bb1 * base_m[k] + (1 - bb1) * gk
      base_v[k] = bb2 * base_v[k] + (1 - bb2) * gk * gk
    p = new_p
    trajectory.append(dict(p))
  state = dict(count=t, objective_counts=t_obj, base_mu=base_m, base_nu=base_v,
               delta_mu={k: np.stack([d[k] for d in delta_m]) for k in p},
               delta_nu={k: np.stack([d[k] for d in delta_v]) for k in p})
  return trajectory, state


def reference_dualoptim(params0, grads, objectives, lr, ratios, b1, b2, eps, wd):
  """DualOptim (an AdamW state per objective) in float64."""
  k_obj = len(ratios)
  p = {k: np.asarray(v, np.float64) for k, v in params0.items()}
  m = [{k: np.zeros_like(v) for k, v in p.items()} for _ in range(k_obj)]
  v2 = [{k: np.zeros_like(v) for k, v in p.items()} for _ in range(k_obj)]
  t_obj = [0] * k_obj
  trajectory = [dict(p)]
  for g, o in zip(grads, objectives):
    t_obj[o] += 1
    eta = lr * ratios[o]
    new_p = {}
    for k in p:
      gk = np.asarray(g[k], np.float64)
      m[o][k] = b1 * m[o][k] + (1 - b1) * gk
      v2[o][k] = b2 * v2[o][k] + (1 - b2) * gk * gk
      u = (m[o][k] / (1 - b1 ** t_obj[o])) / (np.sqrt(v2[o][k] / (1 - b2 ** t_obj[o])) + eps)
      new_p[k] = p[k] * (1 - eta * wd) - eta * u
    p = new_p
    trajectory.append(dict(p))
  return trajectory, dict(mu={k: np.stack([x[k] for x in m]) for k in p},
                          nu={k: np.stack([x[k] for x in v2]) for k in p},
                          objective_counts=t_obj)


def _assert_trajectory_close(got: Run, ref_traj, rtol):
  """Compares each step's update with the reference's, then each step's displacement from
  the initial params. Params are float32 of size O(1), so the displacement is also allowed
  a few of their ulps of accumulated rounding."""
  for i in range(len(got.updates)):
    for k in ref_traj[0]:
      ref_update = ref_traj[i + 1][k] - ref_traj[i][k]
      np.testing.assert_allclose(
          np.asarray(got.updates[i][k], np.float64), ref_update, rtol=rtol,
          atol=rtol * 1e-2 * np.max(np.abs(ref_update)), err_msg=f"update {i} leaf {k}")
      d_got = np.asarray(got.params[i + 1][k], np.float64) - np.asarray(got.params[0][k])
      d_ref = ref_traj[i + 1][k] - ref_traj[0][k]
      ulps = 8 * np.finfo(np.float32).eps * np.max(np.abs(ref_traj[0][k]))
      np.testing.assert_allclose(d_got, d_ref, rtol=rtol, atol=ulps,
                                 err_msg=f"step {i + 1} leaf {k}")


def _assert_state_close(got, ref, rtol):
  for k, ref_leaf in ref.items():
    scale = float(np.max(np.abs(ref_leaf)))
    np.testing.assert_allclose(np.asarray(got[k], np.float64), ref_leaf, rtol=rtol,
                               atol=rtol * scale, err_msg=k)


@pytest.mark.parametrize(
    "objective_steps,ratios", [((2, 3), (0.5, 1.0)), ((1, 2, 1), (1.0, 0.5, 2.0))])
def test_dualoptim_plus_matches_float64_reference(objective_steps, ratios):
  n, lr, wd = 30, 1e-2, 0.1
  hp = dict(b1=0.9, b2=0.95, base_b1=0.8, base_b2=0.9, eps=1e-8)
  objs = _objectives(objective_steps, n)
  grads = _grads(n, seed=3, objectives=objs)
  tx = dualoptax.multi_objective_dualoptim_plus(
      lr, objective_steps, ratios, weight_decay=wd, **hp)
  got = run(tx, grads)
  ref_traj, ref_state = reference_dualoptim_plus(
      _np(PARAMS0), grads, objs, lr, ratios, hp["b1"], hp["b2"], hp["base_b1"],
      hp["base_b2"], hp["eps"], wd)
  _assert_trajectory_close(got, ref_traj, rtol=1e-4)
  s = dualoptax.find_state(got.states[-1], PLUS_STATE)
  assert int(s.count) == ref_state["count"] == n
  np.testing.assert_array_equal(s.objective_counts, ref_state["objective_counts"])
  for name in ("base_mu", "base_nu", "delta_mu", "delta_nu"):
    _assert_state_close(getattr(s, name), ref_state[name], rtol=1e-4)


def test_dualoptim_matches_float64_reference():
  n, lr, wd, ratios, steps = 30, 1e-2, 0.1, (0.5, 1.0), (2, 3)
  objs = _objectives(steps, n)
  grads = _grads(n, seed=4, objectives=objs)
  tx = dualoptax.dualoptim(lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=wd,
                           forget_lr_ratio=0.5, forget_steps=2, retain_steps=3)
  got = run(tx, grads)
  ref_traj, ref_state = reference_dualoptim(
      _np(PARAMS0), grads, objs, lr, ratios, 0.9, 0.99, 1e-8, wd)
  _assert_trajectory_close(got, ref_traj, rtol=1e-4)
  s = dualoptax.find_state(got.states[-1], DUAL_STATE)
  np.testing.assert_array_equal(s.objective_counts, ref_state["objective_counts"])
  _assert_state_close(s.mu, ref_state["mu"], rtol=1e-4)
  _assert_state_close(s.nu, ref_state["nu"], rtol=1e-4)


def test_first_step_is_sign_of_gradient_times_objective_lr():
  """At t = 1 the spec gives u = g / (|g| + eps): a step of lr * ratio, sign of g."""
  g = _grads(1, seed=5, scale=1e-6)[0]  # small enough for eps = 1e-8 to show
  tx = dualoptax.multi_objective_dualoptim_plus(0.1, (1, 1), (0.25, 1.0), eps=1e-8)
  updates = run(tx, [g]).updates[0]
  for k in g:
    g64 = np.asarray(g[k], np.float64)
    np.testing.assert_allclose(updates[k], -0.025 * g64 / (np.abs(g64) + 1e-8), rtol=1e-6)
    assert np.all(np.abs(updates[k]) < 0.025 * (1 - 4e-3))


# ---------------------------------------------------------------------------------------
# optax.chain(clip_by_global_norm, tx)


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_clip_by_global_norm_equals_preclipped_gradients(name):
  c, n = 1.0, 8
  grads = _grads(n, seed=6, scale=2.0)
  grads[3] = {k: 50.0 * v for k, v in grads[3].items()}  # one gradient far larger
  norms = [np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in g.values()))
           for g in grads]
  assert min(norms) > c  # clipping is active on every step
  clipped = [{k: (np.asarray(v, np.float64) * (c / norm)).astype(np.float32)
              for k, v in g.items()} for g, norm in zip(grads, norms)]

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
  frozen = run(optax.chain(optax.masked(tx, MASK),
                           optax.masked(optax.set_to_zero(), NOT_MASK)), grads)
  for i in range(n + 1):
    np.testing.assert_array_equal(frozen.params[i]["embed"], PARAMS0["embed"])
    assert_trees_close(_sub(frozen.params[i]), alone.params[i], rtol=1e-6, atol=1e-7)
  assert _max_abs_diff(frozen.params[-1]["w"], PARAMS0["w"]) > 1e-3


@pytest.mark.parametrize("name,explicit", [
    ("dualoptim_plus", False), ("dualoptim_plus", True), ("dualoptim", True)])
def test_multi_transform_freezes_embed(name, explicit):
  n = 6
  grads = _grads(n, seed=10)
  # Explicit objectives that disagree with the (2, 3) schedule: they must reach tx
  # through multi_transform's extra args to give the sub-tree result.
  objs = [1, 0, 0, 1, 0, 1] if explicit else None
  tx = make(name, **COMMON)
  multi = run(optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, LABELS),
              grads, objectives=objs)
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
EXACT_BETAS = {"dualoptim_plus": dict(b1=0.875, b2=0.9375, base_b1=0.75, base_b2=0.96875),
               "dualoptim": dict(b1=0.875, b2=0.9921875)}


def test_inject_hyperparams_without_static_args():
  kw = {**HP, **EXACT_BETAS["dualoptim_plus"]}
  injected = optax.inject_hyperparams(dualoptax.dualoptim_plus)(**kw)
  grads = _grads(4, seed=26, objectives=_objectives((2, 3), 4))
  got = run(injected, grads)
  want = run(dualoptax.dualoptim_plus(**kw), grads)
  for i in range(4):
    assert_trees_close(got.updates[i], want.updates[i], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name,betas", [
    ("dualoptim_plus", "exact"), ("dualoptim_plus", "default"), ("dualoptim", "exact")])
def test_inject_hyperparams_matches_plain_alias(name, betas):
  n = 10
  factory = {"dualoptim_plus": dualoptax.dualoptim_plus, "dualoptim": dualoptax.dualoptim}
  kw = {**HP, **(EXACT_BETAS[name] if betas == "exact" else {})}
  injected = optax.inject_hyperparams(factory[name], static_args=("state_dtype",))(**kw)
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
  tx = optax.inject_hyperparams(dualoptax.dualoptim_plus, static_args=("state_dtype",))(**HP)
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
  assert_trees_close(doubled_updates, jax.tree.map(lambda u: 2 * u, reference_updates),
                     rtol=1e-6, atol=1e-12)
  assert float(doubled_state.hyperparams["learning_rate"]) == pytest.approx(2e-2)
  # The moments do not depend on the learning rate.
  assert_trees_equal(dualoptax.find_state(doubled_state, PLUS_STATE),
                     dualoptax.find_state(reference_state, PLUS_STATE))

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


@functools.lru_cache(maxsize=None)
def _if_finite(name):
  return optax.apply_if_finite(make(name, **COMMON), max_consecutive_errors=2)


@pytest.mark.parametrize("name,bad", [
    ("dualoptim_plus", np.nan), ("dualoptim_plus", np.inf), ("dualoptim_plus", -np.inf),
    ("dualoptim", np.nan)])
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


MULTI_FACTORIES = {"dualoptim_plus": dualoptax.multi_objective_dualoptim_plus,
                   "dualoptim": dualoptax.multi_objective_dualoptim}


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
  assert _max_abs_diff(explicit.params[-1], run(
      make(name, **COMMON), grads, objectives=[dualoptax.FORGET] * n).params[-1]) > 1e-3


@pytest.mark.parametrize("name,steps", [
    ("dualoptim_plus", (0, 3)), ("dualoptim_plus", (2, 0)), ("dualoptim", (0, 3))])
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
  tx = dualoptax.multi_objective_dualoptim_plus(1e-2, objective_steps=steps,
                                                objective_lr_ratios=ratios)
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
    assert_trees_close(got.updates[i], jax.tree.map(lambda u: ratios[k] * u,  # noqa: B023
                                                    ones_run.updates[i]),
                       rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------------------
# The Adam baselines against optax.


def _assert_max_ulp(a, b, maxulp=1):
  for (path, x), (_, y) in zip(_leaves_with_paths(a), _leaves_with_paths(b)):
    np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(y), maxulp=maxulp)


def test_adamw_alias_equals_optax_adamw():
  n, lr, wd = 20, 1e-2, 0.05
  grads = _grads(n, seed=21)
  got = run(dualoptax.adamw(lr, weight_decay=wd), grads)
  want = run(optax.adamw(lr, weight_decay=wd), grads)
  for i in range(n):
    _assert_max_ulp(got.updates[i], want.updates[i])
    _assert_max_ulp(got.params[i + 1], want.params[i + 1])
  got = run(dualoptax.adam(lr), grads[:5])
  want = run(optax.adam(lr), grads[:5])
  for i in range(5):
    _assert_max_ulp(got.params[i + 1], want.params[i + 1])


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_single_objective_dualoptim_equals_optax_adam(wd):
  n, lr = 20, 1e-2
  grads = _grads(n, seed=22)
  got = run(dualoptax.multi_objective_dualoptim(lr, objective_steps=(1,), weight_decay=wd),
            grads)
  want = run(optax.adamw(lr, weight_decay=wd) if wd else optax.adam(lr), grads)
  s = dualoptax.find_state(got.states[-1], DUAL_STATE)
  np.testing.assert_array_equal(s.objective_counts, [n])
  # Not bit-exact: optax computes the bias correction 1 - b**t in float32, dualoptax
  # without cancellation (about 1e-5 relative apart at b2 = 0.999, t = 1).
  for i in range(n):
    assert_trees_close(got.updates[i], want.updates[i], rtol=3e-5, atol=3e-5 * lr)
  adam_state = want.states[-1][0]
  assert_trees_close(jax.tree.map(lambda m: m[0], s.mu), adam_state.mu, rtol=1e-6, atol=1e-9)
  assert_trees_close(jax.tree.map(lambda m: m[0], s.nu), adam_state.nu, rtol=1e-6, atol=1e-9)


def test_adamw_forget_ratio_scales_forget_updates():
  n, lr, wd = 10, 1e-2, 0.05
  objs = _objectives((2, 3), n)
  grads = _grads(n, seed=23, objectives=objs)
  tx = dualoptax.adamw(lr, weight_decay=wd, forget_lr_ratio=0.5, forget_steps=2,
                       retain_steps=3)
  got = run(tx, grads)
  # Feed optax.adamw the same gradients at the same params: its Adam state is the same
  # (it does not depend on the learning rate), so the updates differ only by the ratio.
  ref = optax.adamw(lr, weight_decay=wd)
  ref_update = jax.jit(ref.update)
  ref_state = ref.init(PARAMS0)
  for i, g in enumerate(grads):
    want, ref_state = ref_update(_as_jax(g), ref_state, got.params[i])
    ratio = 0.5 if objs[i] == dualoptax.FORGET else 1.0
    _assert_max_ulp(got.updates[i], jax.tree.map(lambda u: ratio * u, want))  # noqa: B023
  assert objs.count(dualoptax.FORGET) == 4


# ---------------------------------------------------------------------------------------
# The state as a pytree.


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_state_is_a_pytree(name):
  tx = make(name, **COMMON)
  state = tx.init(PARAMS0)
  leaves, treedef = jax.tree.flatten(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  assert_trees_equal(jax.tree.unflatten(treedef, leaves), state)
  doubled = jax.tree.map(lambda x: x + x, state)
  assert jax.tree.structure(doubled) == treedef
  assert isinstance(dualoptax.find_state(doubled, STATE_TYPES[name]), STATE_TYPES[name])

  # Same structure, shapes and dtypes after a step: usable as a lax.scan carry.
  grads = _grads(6, seed=24)
  stepped = run(tx, grads)
  assert jax.tree.structure(stepped.states[-1]) == treedef
  for x, y in zip(leaves, jax.tree.leaves(stepped.states[-1])):
    assert (x.shape, x.dtype) == (y.shape, y.dtype)

  stacked = jax.tree.map(lambda *gs: jnp.stack(gs), *[_as_jax(g) for g in grads])

  @jax.jit
  def scanned(params, state, stacked):
    def body(carry, g):
      params, state = carry
      updates, state = tx.update(g, state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, state), stacked)[0]

  params, final_state = scanned(PARAMS0, state, stacked)
  assert_trees_close(params, stepped.params[-1], rtol=1e-6, atol=1e-8)
  assert_trees_close(final_state, stepped.states[-1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_donated_state_gives_the_same_run(name):
  tx = make(name, **COMMON)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  grads = [_as_jax(g) for g in _grads(6, seed=25)]
  donated_step = jax.jit(step, donate_argnums=(0, 1))
  plain_step = _stepper(tx, explicit=False)

  def copy(tree):
    return jax.tree.map(jnp.array, tree)

  params_d, state_d = copy(PARAMS0), tx.init(copy(PARAMS0))
  params_p, state_p = PARAMS0, tx.init(PARAMS0)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for g in grads:
      inputs = jax.tree.leaves((params_d, state_d))
      params_d, state_d = donated_step(params_d, state_d, g)
      assert all(x.is_deleted() for x in inputs)  # the buffers really were donated
      params_p, state_p, _ = plain_step(params_p, state_p, g)
    jax.block_until_ready((params_d, state_d))
  # Every donated buffer had an output of the same shape and dtype to go to.
  assert not [w for w in caught if "donated" in str(w.message)], [str(w.message) for w in caught]
  assert_trees_equal(params_d, params_p)
  assert_trees_equal(state_d, state_p)
