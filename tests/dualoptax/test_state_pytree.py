"""The optimizer state as a pytree: flattening, donation."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from composition_helpers import (
  COMMON,
  PARAMS0,
  STATE_TYPES,
  _as_jax,
  _grads,
  _stepper,
  assert_trees_close,
  assert_trees_equal,
  make,
  run,
)

import dualoptax

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
