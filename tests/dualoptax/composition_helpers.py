"""Helpers shared by the optax-composition tests: small trees, gradient sequences, a
cached jitted stepper and the optimizers under test."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def _grads(
  n: int, seed: int = 1, objectives: Sequence[int] | None = None, scale: float = 1.0
) -> list[dict[str, np.ndarray]]:
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
    out.append(
      {k: (scale * np.sign(v) * (0.5 + 0.5 * np.abs(v))).astype(np.float32) for k, v in g.items()}
    )
  return out


def _as_jax(tree):
  return jax.tree.map(jnp.asarray, tree)


def _np(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def _leaves_with_paths(tree):
  return [
    (jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), (_, y) in zip(_leaves_with_paths(a), _leaves_with_paths(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)


def assert_trees_close(a, b, rtol, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), (_, y) in zip(_leaves_with_paths(a), _leaves_with_paths(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=path)


def _max_abs_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


class Run(NamedTuple):
  params: list[Any]  # params[i] after i steps (params[0] the initial ones)
  states: list[Any]  # states[i] after i steps
  updates: list[Any]  # updates[i] of step i (0-based)


@functools.cache
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


@functools.cache
def _make_cached(name, items):
  return FACTORIES[name](**dict(items))


def make(name, **kw):
  """The same transformation object for the same arguments, so that tests share the
  compiled steps of ``_stepper`` (it is cached per transformation)."""
  return _make_cached(name, tuple(sorted(kw.items())))


STATE_TYPES = {"dualoptim_plus": PLUS_STATE, "dualoptim": DUAL_STATE}
COMMON = dict(weight_decay=0.1, forget_lr_ratio=0.5, forget_steps=2, retain_steps=3)
