"""Conflict diagnostics (the paper's Figure 2) against direct computations from the state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax

B1, B2, BB1, BB2, EPS = 0.9, 0.95, 0.8, 0.9, 1e-8


def _run(tx, grads_fn, steps=12, seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
  }
  state = tx.init(params)
  for t in range(steps):
    grads = grads_fn(t, rng)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return state


def _direction(rng):
  return {"w": rng.normal(size=(6, 5)), "b": rng.normal(size=(5,))}


def _grads(relation, noise=0.05):
  """Forget steps (even t) get -c or +c, retain steps +c, plus small noise."""
  c = _direction(np.random.default_rng(123))
  sign = {"aligned": 1.0, "opposed": -1.0}[relation]

  def grads_fn(t, rng):
    s = sign if t % 2 == 0 else 1.0
    return {
      k: jnp.asarray(s * v + noise * rng.normal(size=v.shape), jnp.float32) for k, v in c.items()
    }

  return grads_fn


def _plus():
  return dualoptax.dualoptim_plus(1e-2, b1=B1, b2=B2, base_b1=BB1, base_b2=BB2, eps=EPS)


def _plus_diag(state):
  return dualoptax.dualoptim_plus_diagnostics(state)


def _cos(x, y):
  return float(np.dot(x, y) / np.sqrt(np.dot(x, x) * np.dot(y, y)))


def _manual_plus_terms(state):
  """(K, n) first-moment terms, preconditioned terms and the base, from the raw state."""
  s = dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState)
  t = int(s.count)
  counts = np.asarray(s.objective_counts)
  firsts, preconds, bases = [], [], []
  for leaf in ("b", "w"):  # the order of jax.tree leaves of a dict
    base = np.asarray(s.base_mu[leaf], np.float64).ravel() / (1 - BB1**t)
    base_nu = np.asarray(s.base_nu[leaf], np.float64).ravel() / (1 - BB2**t)
    d = np.asarray(s.delta_mu[leaf], np.float64).reshape(2, -1) / (1 - B1**counts)[:, None]
    e = np.asarray(s.delta_nu[leaf], np.float64).reshape(2, -1) / (1 - B2**counts)[:, None]
    first = d + base
    firsts.append(first)
    preconds.append(first / (np.sqrt(np.abs(e + base_nu)) + EPS))
    bases.append(base)
  return firsts, preconds, bases


@pytest.mark.parametrize("relation", ["aligned", "opposed"])
def test_dualoptim_plus_diagnostics_match_direct_computation(relation):
  state = _run(_plus(), _grads(relation))
  per_leaf, total = _plus_diag(state)
  firsts, preconds, bases = _manual_plus_terms(state)
  for i, leaf in enumerate(("b", "w")):
    np.testing.assert_allclose(per_leaf.update_cosine[leaf], _cos(*firsts[i]), atol=1e-5)
    np.testing.assert_allclose(per_leaf.preconditioned_cosine[leaf], _cos(*preconds[i]), atol=1e-5)
    np.testing.assert_allclose(per_leaf.base_norm[leaf], np.linalg.norm(bases[i]), rtol=1e-5)
    for k in range(2):
      delta = firsts[i][k] - bases[i]
      np.testing.assert_allclose(
        per_leaf.delta_base_cosine[leaf][k], _cos(delta, bases[i]), atol=1e-5
      )
      np.testing.assert_allclose(per_leaf.delta_norm[leaf][k], np.linalg.norm(delta), rtol=1e-4)
      np.testing.assert_allclose(
        per_leaf.update_norm[leaf][k], np.linalg.norm(firsts[i][k]), rtol=1e-5
      )
  all_first = np.concatenate(firsts, axis=1)
  all_precond = np.concatenate(preconds, axis=1)
  np.testing.assert_allclose(total.update_cosine, _cos(*all_first), atol=1e-5)
  np.testing.assert_allclose(total.preconditioned_cosine, _cos(*all_precond), atol=1e-5)
  np.testing.assert_allclose(total.base_norm, np.linalg.norm(np.concatenate(bases)), rtol=1e-5)


def test_bridging_shows_in_the_diagnostics():
  """Aligned objectives share the base (small deltas); opposed ones are kept apart."""
  _, aligned = _plus_diag(_run(_plus(), _grads("aligned"), steps=40))
  _, opposed = _plus_diag(_run(_plus(), _grads("opposed"), steps=40))
  assert float(aligned.update_cosine) > 0.99
  assert float(opposed.update_cosine) < -0.9
  # Aligned: the base explains the gradients, the deltas are small next to it.
  assert float(jnp.max(aligned.delta_norm)) < 0.2 * float(aligned.base_norm)
  # Opposed: the base averages out and the deltas carry each objective's direction.
  assert float(jnp.min(opposed.delta_norm)) > 2.0 * float(opposed.base_norm)


def test_dualoptim_diagnostics_are_the_adam_moments():
  tx = dualoptax.dualoptim(1e-2, b1=B1, b2=B2, eps=EPS)
  state = _run(tx, _grads("opposed"))
  per_leaf, total = dualoptax.dualoptim_diagnostics(state)
  s = dualoptax.find_state(state, dualoptax.ScaleByDualOptimState)
  counts = np.asarray(s.objective_counts)
  m = {
    k: np.asarray(v, np.float64).reshape(2, -1) / (1 - B1**counts)[:, None] for k, v in s.mu.items()
  }
  v = {
    k: np.asarray(x, np.float64).reshape(2, -1) / (1 - B2**counts)[:, None] for k, x in s.nu.items()
  }
  for leaf in m:
    np.testing.assert_allclose(per_leaf.update_cosine[leaf], _cos(*m[leaf]), atol=1e-5)
    pre = m[leaf] / (np.sqrt(v[leaf]) + EPS)
    np.testing.assert_allclose(per_leaf.preconditioned_cosine[leaf], _cos(*pre), atol=1e-5)
  assert float(total.update_cosine) < -0.9
  np.testing.assert_array_equal(total.base_norm, 0.0)


def test_diagnostics_before_any_step_are_finite_zeros():
  tx = _plus()
  state = tx.init({"w": jnp.ones((3, 2))})
  per_leaf, total = _plus_diag(state)
  for x in jax.tree.leaves((per_leaf, total)):
    assert np.all(np.isfinite(x))
  assert float(total.update_cosine) == 0.0


def test_diagnostics_are_jittable_and_find_state_errors():
  state = _run(_plus(), _grads("opposed"))
  eager = _plus_diag(state)[1]
  jitted = jax.jit(_plus_diag)(state)[1]
  np.testing.assert_allclose(jitted.update_cosine, eager.update_cosine, rtol=1e-6)
  with pytest.raises(ValueError, match="ScaleByDualOptimPlusState"):
    dualoptax.dualoptim_plus_diagnostics(optax.adam(1e-3).init({"w": jnp.ones(2)}))


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_diagnostics_of_8bit_states_follow_the_fp32_ones(name):
  """8-bit states dequantize for the diagnostics; cosines stay close to fp32's."""
  make = {
    "dualoptim_plus": lambda **kw: dualoptax.dualoptim_plus(1e-2, **kw),
    "dualoptim": lambda **kw: dualoptax.dualoptim(1e-2, b1=B1, b2=B2, **kw),
  }[name]
  diagnose = {
    "dualoptim_plus": dualoptax.dualoptim_plus_diagnostics,
    "dualoptim": dualoptax.dualoptim_diagnostics,
  }[name]
  c = np.random.default_rng(5).normal(size=(64, 64))

  def grads_fn(t, rng):
    s = -1.0 if t % 2 == 0 else 1.0
    return {"w": jnp.asarray(s * c + 0.3 * rng.normal(size=c.shape), jnp.float32)}

  def run(tx):
    params = {"w": jnp.zeros((64, 64))}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for t in range(10):
      _, state = tx.update(grads_fn(t, rng), state, params)
    return state

  per_leaf8, total8 = diagnose(
    run(make(storage=dualoptax.MomentStorage(state_bits=8, min_8bit_size=1024)))
  )
  _, total32 = diagnose(run(make()))
  assert float(total32.update_cosine) < -0.5
  np.testing.assert_allclose(total8.update_cosine, total32.update_cosine, atol=0.02)
  np.testing.assert_allclose(total8.update_norm, total32.update_norm, rtol=0.05)
  assert per_leaf8.update_cosine["w"].shape == ()


# ---------------------------------------------------------------------------------------
# The hyperparameters the diagnostics use come from the optimizer's state.


def test_the_state_records_the_optimizers_hyperparameters():
  params = {"w": jnp.ones((6, 5))}
  plus = dualoptax.hyperparameters(_plus().init(params), dualoptax.ScaleByDualOptimPlusState)
  assert plus == dict(b1=B1, b2=B2, base_b1=BB1, base_b2=BB2, eps=EPS)
  dual = dualoptax.dualoptim(1e-2, b1=0.8, b2=0.99, eps=1e-6).init(params)
  assert dualoptax.hyperparameters(dual, dualoptax.ScaleByDualOptimState) == dict(
    b1=0.8, b2=0.99, eps=1e-6
  )
  adam = dualoptax.adamw(1e-2, b2=0.95).init(params)
  assert dualoptax.hyperparameters(adam, optax.ScaleByAdamState)["b2"] == 0.95


def test_the_record_takes_no_bytes_and_leaves_the_arrays_where_they_were():
  """The alias's state holds the same arrays, under the same paths, as the chain it is
  made of: checkpoints and ``state_nbytes`` do not see the record."""
  params = {"w": jnp.ones((6, 5)), "b": jnp.ones(5)}
  alias = _plus().init(params)
  chain = optax.chain(
    dualoptax.scale_by_dualoptim_plus(B1, B2, BB1, BB2, EPS),
    optax.add_decayed_weights(0.0),
    dualoptax.scale_by_objective_learning_rate(1e-2),
  ).init(params)
  paths = lambda tree: [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(tree)]
  assert paths(alias) == paths(chain)
  assert dualoptax.state_nbytes(alias) == dualoptax.state_nbytes(chain)


def test_diagnostics_of_a_hand_built_chain_need_its_hyperparameters():
  """A chain of ``scale_by_*`` has no record: the diagnostics say so, and take the
  hyperparameters explicitly; a state with a record refuses them."""
  hp = dict(b1=B1, b2=B2, base_b1=BB1, base_b2=BB2, eps=EPS)
  chain = optax.chain(
    dualoptax.scale_by_dualoptim_plus(**hp), dualoptax.scale_by_objective_learning_rate(1e-2)
  )
  state = _run(chain, _grads("opposed"))
  with pytest.raises(ValueError, match="record"):
    dualoptax.dualoptim_plus_diagnostics(state)
  _, explicit = dualoptax.dualoptim_plus_diagnostics(state, hyperparams=hp)
  _, recorded = _plus_diag(_run(_plus(), _grads("opposed")))
  np.testing.assert_allclose(explicit.update_cosine, recorded.update_cosine, rtol=1e-6)
  with pytest.raises(ValueError, match="do not pass hyperparams"):
    dualoptax.dualoptim_plus_diagnostics(_run(_plus(), _grads("opposed")), hyperparams=hp)


@pytest.mark.parametrize("jit", [False, True])
def test_diagnostics_under_inject_hyperparams_read_the_injected_values(jit):
  exact = dict(b1=0.875, b2=0.9375, base_b1=0.75, base_b2=0.96875)  # exact in float32
  injected = optax.inject_hyperparams(dualoptax.dualoptim_plus)(learning_rate=1e-2, **exact)
  plain = dualoptax.dualoptim_plus(1e-2, **exact)
  diagnose = jax.jit(_plus_diag) if jit else _plus_diag
  _, got = diagnose(_run(injected, _grads("opposed")))
  _, want = _plus_diag(_run(plain, _grads("opposed")))
  np.testing.assert_allclose(got.update_cosine, want.update_cosine, rtol=1e-5)
  np.testing.assert_allclose(got.preconditioned_cosine, want.preconditioned_cosine, rtol=1e-5)
  # A value changed in the injected hyperparameters is the one the diagnostics use.
  state = _run(injected, _grads("opposed"))
  hp = dualoptax.hyperparameters(state, dualoptax.ScaleByDualOptimPlusState)
  assert float(hp["base_b1"]) == 0.75
  state.hyperparams["base_b1"] = jnp.float32(0.5)
  _, changed = diagnose(state)
  assert abs(float(changed.base_norm) / float(got.base_norm) - 1.0) > 0.01  # Bh changed


def test_a_value_given_as_an_array_outside_inject_hyperparams_fails_clearly():
  state = dualoptax.dualoptim_plus(1e-2, b1=jnp.float32(0.9)).init({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="b1 of the ScaleByDualOptimPlusState was given as an"):
    dualoptax.dualoptim_plus_diagnostics(state)
