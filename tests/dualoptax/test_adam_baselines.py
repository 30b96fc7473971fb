"""The Adam baselines (dualoptax.adamw, single-objective DualOptim) against optax's Adam."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from composition_helpers import (
  DUAL_STATE,
  PARAMS0,
  _as_jax,
  _grads,
  _leaves_with_paths,
  _objectives,
  assert_trees_close,
  run,
)

import dualoptax

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
  got = run(dualoptax.multi_objective_dualoptim(lr, objective_steps=(1,), weight_decay=wd), grads)
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
  tx = dualoptax.adamw(lr, weight_decay=wd, forget_lr_ratio=0.5, forget_steps=2, retain_steps=3)
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
