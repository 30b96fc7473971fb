"""DualOptim+'s denominator guard (``denominator_floor``) and conditioning diagnostic.

States are built by hand so that the delta second moment cancels the base one to a chosen
degree, and the results are checked against float64 NumPy evaluations of the formulas.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax

B1, B2, BB1, BB2, EPS = 0.9, 0.95, 0.8, 0.9, 1e-8
HYPERPARAMS = dict(b1=B1, b2=B2, base_b1=BB1, base_b2=BB2, eps=EPS)
SHAPES = {"b": (6,), "w": (4, 64)}  # "w" is 8-bit with STORAGE_8BIT, "b" float32.
STORAGE_8BIT = dualoptax.MomentStorage(state_bits=8, min_8bit_size=256)
# |Eh_o + Vh| / Vh targets, cycled over the elements: exact and near cancellations, a
# negative sum, and ordinary values.
RHOS = np.array([0.0, 1e-6, -1e-4, 3e-3, -4e-3, 0.05, 0.3, 1.0, 2.5])
# For the diagnostic: no cancellation so deep that float32 rounding of the stored moments
# moves the largest update entry by more than ~1e-4.
DIAGNOSTIC_RHOS = np.array([-2e-3, 3e-3, -4e-3, 7e-3, 0.02, 0.05, 0.3, 1.0, 2.5])


def _transform(floor=None, k=2, storage=None):
  return dualoptax.scale_by_dualoptim_plus(
    **HYPERPARAMS, objective_steps=(1,) * k, storage=storage, denominator_floor=floor
  )


def _params():
  return {name: jnp.zeros(shape, jnp.float32) for name, shape in SHAPES.items()}


def _rhos(shape, k, seed, rhos=RHOS):
  """(k, *shape) targets: ``rhos`` cycled, shuffled per objective."""
  rng = np.random.default_rng(seed)
  size = int(np.prod(shape))
  return np.stack([rng.permutation(np.resize(rhos, size)).reshape(shape) for _ in range(k)])


def _put(like, value, tables):
  """``value`` (float64 NumPy) in the storage of the moment ``like``."""
  if not isinstance(like, dualoptax.QuantizedArray):
    return jnp.asarray(value, jnp.float32)
  table = tables.signed if like.signed else tables.unsigned
  quantize = lambda x: dualoptax.QuantizedArray.quantize(
    jnp.asarray(x, jnp.float32), table, like.block_size, like.signed
  )
  if like.absmax.ndim == 1:  # unstacked: (blocks,); stacked: (K, blocks)
    return quantize(value)
  rows = [quantize(row) for row in value]
  return dataclasses.replace(
    like, codes=jnp.stack([r.codes for r in rows]), absmax=jnp.stack([r.absmax for r in rows])
  )


def _get(moment, tables):
  """A moment as float64 NumPy (8-bit ones dequantized row by row)."""
  if not isinstance(moment, dualoptax.QuantizedArray):
    return np.asarray(moment, np.float64)
  table = tables.signed if moment.signed else tables.unsigned
  if moment.absmax.ndim == 1:
    return np.asarray(moment.dequantize(table), np.float64)
  rows = [
    dataclasses.replace(moment, codes=c, absmax=a) for c, a in zip(moment.codes, moment.absmax)
  ]
  return np.stack([np.asarray(r.dequantize(table), np.float64) for r in rows])


def _state(template, count, counts, moments):
  """``template`` (a ScaleByDualOptimPlusState) with the given counters and moments."""
  put = lambda field: jax.tree.map(
    lambda like, v: _put(like, v, template.tables),
    getattr(template, field),
    moments[field],
    is_leaf=lambda x: isinstance(x, dualoptax.QuantizedArray),
  )
  return template._replace(
    count=jnp.int32(count),
    objective_counts=jnp.asarray(counts, jnp.int32),
    **{f: put(f) for f in ("base_mu", "base_nu", "delta_mu", "delta_nu")},
  )


def _moments_np(state):
  return {
    f: jax.tree.map(
      lambda m: _get(m, state.tables),
      getattr(state, f),
      is_leaf=lambda x: isinstance(x, dualoptax.QuantizedArray),
    )
    for f in ("base_mu", "base_nu", "delta_mu", "delta_nu")
  }


def _random_moments(rng, k):
  """Base and first delta moments, ordinary in size (second deltas set by the caller)."""
  out = {"base_mu": {}, "base_nu": {}, "delta_mu": {}, "delta_nu": {}}
  for name, shape in SHAPES.items():
    out["base_mu"][name] = rng.normal(size=shape)
    out["base_nu"][name] = rng.uniform(0.5, 2.0, size=shape)
    out["delta_mu"][name] = 0.3 * rng.normal(size=(k, *shape))
  return out


def _corrected_bases(moments, name, count):
  return (moments["base_mu"][name] / (1 - BB1**count), moments["base_nu"][name] / (1 - BB2**count))


# ---------------------------------------------------------------------------------------
# The guard in the update.


def _cancelling_state(storage, k, floor=None, seed=0):
  """A state (after 9 steps) whose next step on objective k-1 with a zero gradient gives
  |Eh + Vh| = rho Vh for the targets of `_rhos`, and that step's float64 expectations."""
  rng = np.random.default_rng(seed)
  counts = np.arange(1, k + 1) + 2
  count, active, t_o = 9, k - 1, counts[-1] + 1
  moments = _random_moments(rng, k)
  expected = {}
  for name, shape in SHAPES.items():
    mu_hat, nu_hat = _corrected_bases(moments, name, count)
    c2 = 1 - B2 ** np.append(counts[:-1], t_o)
    # E_new = b2 E + (1 - b2)(0 - Vh) must be (rho - 1) Vh c2(t_o).
    target = (_rhos(shape, k, seed + 1) - 1) * nu_hat * c2.reshape((k,) + (1,) * len(shape))
    moments["delta_nu"][name] = (target + (1 - B2) * nu_hat) / B2
    first = (B1 * moments["delta_mu"][name][active] - (1 - B1) * mu_hat) / (1 - B1**t_o) + mu_hat
    expected[name] = (first, nu_hat, np.abs(target[active] / c2[-1] + nu_hat))
  template = _transform(floor, k, storage).init(_params())
  state = _state(template, count, counts, moments)
  return state, active, expected


def _step(floor, state, active, k=2, storage=None):
  tx = _transform(floor, k, storage)
  grads = jax.tree.map(jnp.zeros_like, _params())
  direction, _ = jax.jit(tx.update)(grads, state, None, objective=active)
  return jax.tree.map(lambda u: np.asarray(u, np.float64), direction)


@pytest.mark.parametrize("k", [2, 3])
def test_floor_bounds_an_update_whose_denominator_cancels(k):
  state, active, expected = _cancelling_state(None, k)
  plain, guarded = _step(None, state, active, k), _step(0.01, state, active, k)
  for name, (first, nu_hat, second) in expected.items():
    # Unguarded: where the delta cancels the base exactly, the entry explodes.
    cancelled = second < 1e-5 * nu_hat
    ordinary = np.abs(first) / np.sqrt(nu_hat)  # the entry if the delta did not cancel
    assert np.all(np.abs(plain[name][cancelled]) > 100 * ordinary[cancelled])
    fine = second > 0.1 * nu_hat
    np.testing.assert_allclose(
      plain[name][fine], first[fine] / np.sqrt(second[fine]), rtol=1e-5, atol=1e-6
    )
    # Guarded: exactly the floored formula, bounded by |Dh + Bh| / sqrt(0.01 Vh).
    want = first / (np.sqrt(np.maximum(second, 0.01 * nu_hat)) + EPS)
    np.testing.assert_allclose(guarded[name], want, rtol=1e-5, atol=1e-6)
    bound = np.abs(first) / np.sqrt(0.01 * nu_hat) * (1 + 1e-5)
    assert np.all(np.abs(guarded[name]) <= bound)
    # Off the floor the same formula (XLA may contract its products differently).
    unfloored = second >= 0.011 * nu_hat
    np.testing.assert_allclose(
      guarded[name][unfloored], plain[name][unfloored], rtol=1e-5, atol=1e-6
    )


def test_floor_bounds_the_8bit_update():
  """8-bit: the guarded direction is the floored formula of the (dequantized) moments."""
  state, active, _ = _cancelling_state(STORAGE_8BIT, 2)
  assert isinstance(state.delta_nu["w"], dualoptax.QuantizedArray)
  m = _moments_np(state)
  guarded = _step(0.1, state, active, storage=STORAGE_8BIT)
  plain = _step(None, state, active, storage=STORAGE_8BIT)
  for name in SHAPES:
    mu_hat, nu_hat = _corrected_bases(m, name, 9)
    t_o = int(state.objective_counts[active]) + 1
    d = (B1 * m["delta_mu"][name][active] - (1 - B1) * mu_hat) / (1 - B1**t_o)
    e = (B2 * m["delta_nu"][name][active] - (1 - B2) * nu_hat) / (1 - B2**t_o)
    second = np.maximum(np.abs(e + nu_hat), 0.1 * nu_hat)
    np.testing.assert_allclose(guarded[name], (d + mu_hat) / (np.sqrt(second) + EPS), rtol=1e-4)
    assert np.all(np.abs(guarded[name]) <= np.abs(d + mu_hat) / np.sqrt(0.1 * nu_hat) * 1.0001)
    assert np.abs(guarded[name]).max() < np.abs(plain[name]).max()


def _trial(floor, storage=None, steps=18, seed=3):
  """Random N(0, 1) gradients, 1 forget : 5 retain: the updates of every step."""
  tx = dualoptax.dualoptim_plus(
    1e-2, retain_steps=5, denominator_floor=floor, storage=storage, weight_decay=0.01
  )
  rng = np.random.default_rng(seed)
  params = {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in SHAPES.items()}
  state, update, out = tx.init(params), jax.jit(tx.update), []
  for _ in range(steps):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out, state


@pytest.mark.parametrize("storage", [None, STORAGE_8BIT], ids=["fp32", "8bit"])
def test_a_floor_that_never_binds_is_the_unguarded_optimizer(storage):
  """The floor touches no moment; the updates differ by float32 rounding only (XLA may
  contract the direction's products differently, which near-cancelling elements show
  most), so the two runs stay together."""
  plain, plain_state = _trial(None, storage)
  tiny, tiny_state = _trial(1e-30, storage)
  inner = lambda s: dualoptax.find_state(s, dualoptax.ScaleByDualOptimPlusState)
  for x, y in zip(jax.tree.leaves(inner(plain_state)), jax.tree.leaves(inner(tiny_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for u, v in zip(plain, tiny):
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3)


def test_default_is_the_papers_formula_and_records_no_floor():
  """No floor: the transform's direction is the paper's, to float32 accuracy, and the
  alias records nothing new (its state keeps the tree it always had)."""
  state, active, expected = _cancelling_state(None, 2)
  default = _step(None, state, active)
  for name, (first, nu_hat, second) in expected.items():
    fine = second > 0.1 * nu_hat
    np.testing.assert_allclose(
      default[name][fine], first[fine] / np.sqrt(second[fine]), rtol=1e-5, atol=1e-6
    )
  plus = dualoptax.ScaleByDualOptimPlusState
  default_state = dualoptax.dualoptim_plus(1e-3).init(_params())
  assert "denominator_floor" not in dualoptax.hyperparameters(default_state, plus)
  floored = dualoptax.dualoptim_plus(1e-3, denominator_floor=0.05).init(_params())
  assert dualoptax.hyperparameters(floored, plus)["denominator_floor"] == 0.05


BAD_FLOORS = [0, 0.0, -0.01, 1.0001, 2, float("nan"), float("inf"), "0.1", True, [0.1]]


@pytest.mark.parametrize("bad", BAD_FLOORS, ids=repr)
def test_bad_floors_are_refused_naming_the_value(bad):
  makers = (
    lambda: dualoptax.scale_by_dualoptim_plus(denominator_floor=bad),
    lambda: dualoptax.dualoptim_plus(1e-3, denominator_floor=bad),
    lambda: dualoptax.multi_objective_dualoptim_plus(1e-3, (1, 2, 1), denominator_floor=bad),
  )
  for make in makers:
    with pytest.raises(ValueError, match="denominator_floor") as error:
      make()
    assert f"denominator_floor={bad!r}" in str(error.value)


@pytest.mark.parametrize("good", [1e-12, 0.01, 1, 1.0])
def test_floors_in_the_interval_are_accepted(good):
  dualoptax.dualoptim_plus(1e-3, denominator_floor=good)


def test_an_injected_floor_acts_as_a_static_one():
  static, static_state = _trial(0.2)
  make = optax.inject_hyperparams(dualoptax.dualoptim_plus, static_args=("retain_steps",))
  tx = make(1e-2, retain_steps=5, denominator_floor=0.2, weight_decay=0.01)
  rng = np.random.default_rng(3)
  params = {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in SHAPES.items()}
  state, update = tx.init(params), jax.jit(tx.update)
  for want in static:
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-9)
  _, got = dualoptax.dualoptim_plus_conditioning(state)
  _, want = dualoptax.dualoptim_plus_conditioning(static_state)
  np.testing.assert_allclose(got.floored_fraction, want.floored_fraction)
  assert float(want.floored_fraction.max()) > 0


# ---------------------------------------------------------------------------------------
# The diagnostic.


def _conditioned_state(k, storage=None, floor=None, seed=0):
  """An alias state whose moments give |Eh_o + Vh| = rho Vh (targets of `_rhos`) now,
  with Vh = 0 at a few elements; returns it and per leaf (|Dh_o + Bh|, Vh, rho)."""
  rng = np.random.default_rng(seed)
  count, counts = 7, np.arange(k) + 2
  moments = _random_moments(rng, k)
  expected = {}
  for name, shape in SHAPES.items():
    for field in ("base_mu", "base_nu"):  # No gradient yet there: nothing to cancel.
      moments[field][name].reshape(-1)[:2] = 0.0
    moments["delta_mu"][name].reshape(k, -1)[:, :2] = 0.0
    mu_hat, nu_hat = _corrected_bases(moments, name, count)
    rho = _rhos(shape, k, seed + 1, DIAGNOSTIC_RHOS)
    c1, c2 = (1 - b ** counts.reshape((k,) + (1,) * len(shape)) for b in (B1, B2))
    moments["delta_nu"][name] = (rho - 1) * nu_hat * c2
    first = np.abs(moments["delta_mu"][name] / c1 + mu_hat)
    expected[name] = (first, np.broadcast_to(nu_hat, rho.shape), np.abs(rho))
  tx = dualoptax.multi_objective_dualoptim_plus(
    1e-3, (1,) * k, **HYPERPARAMS, storage=storage, denominator_floor=floor
  )
  state = tx.init(_params())
  inner = _state(state[0], count, counts, moments)
  return (inner, *state[1:]), expected


def _hand_counted(expected, fraction, floor):
  """Per leaf and total: (cancelled, floored) fractions, max update, max unguarded."""
  per_leaf, totals = {}, np.zeros((4, len(next(iter(expected.values()))[0])))
  size = 0
  for name, (first, nu_hat, rho) in expected.items():
    axes = tuple(range(1, first.ndim))
    cancelled = ((rho < fraction) & (nu_hat > 0)).sum(axis=axes)
    floored = ((rho < floor) & (nu_hat > 0)).sum(axis=axes) if floor else 0 * cancelled
    second = rho * nu_hat
    unguarded = (first / (np.sqrt(second) + EPS)).max(axis=axes)
    guarded = unguarded
    if floor:
      guarded = (first / (np.sqrt(np.maximum(second, floor * nu_hat)) + EPS)).max(axis=axes)
    n = first[0].size
    per_leaf[name] = (cancelled / n, floored / n, guarded, unguarded)
    totals[:2] += np.stack([cancelled, floored])
    totals[2:] = np.maximum(totals[2:], np.stack([guarded, unguarded]))
    size += n
  totals[:2] /= size
  return per_leaf, totals


FIELDS = ("cancelled_fraction", "floored_fraction", "max_update", "max_unguarded_update")


@pytest.mark.parametrize("fraction", [0.01, 2.5e-3, 0.5])
@pytest.mark.parametrize("floor", [None, 0.005])
@pytest.mark.parametrize("k", [2, 3])
def test_diagnostic_matches_a_hand_count(k, floor, fraction):
  state, expected = _conditioned_state(k, floor=floor)
  per_leaf, total = dualoptax.dualoptim_plus_conditioning(state, fraction=fraction)
  want_leaves, want_total = _hand_counted(expected, fraction, floor)
  # Fractions are counts (float32 quotients). Maxima include exact cancellations, where
  # float32 rounding of the stored moments matters.
  for i, field in enumerate(FIELDS):
    rtol = 1e-6 if i < 2 else 1e-4
    np.testing.assert_allclose(getattr(total, field), want_total[i], rtol=rtol, err_msg=field)
    for name in SHAPES:
      got = getattr(per_leaf, field)[name]
      np.testing.assert_allclose(got, want_leaves[name][i], rtol=rtol, err_msg=f"{field}/{name}")
  assert float(total.cancelled_fraction.min()) > 0  # the hand-built state does cancel


def test_diagnostic_counts_only_elements_with_a_base():
  state, _ = _conditioned_state(2)
  s = state[0]
  zero_delta = s._replace(delta_nu=jax.tree.map(jnp.zeros_like, s.delta_nu))
  _, total = dualoptax.dualoptim_plus_conditioning((zero_delta, *state[1:]))
  np.testing.assert_array_equal(total.cancelled_fraction, [0.0, 0.0])
  fresh = dualoptax.dualoptim_plus(1e-3).init(_params())
  _, total = dualoptax.dualoptim_plus_conditioning(fresh)
  for field in FIELDS:
    np.testing.assert_array_equal(getattr(total, field), [0.0, 0.0])


def test_diagnostic_is_jittable_and_reads_8bit_states():
  state, _ = _conditioned_state(2, storage=STORAGE_8BIT, floor=0.01)
  assert isinstance(state[0].delta_nu["w"], dualoptax.QuantizedArray)
  # The hand count from the dequantized moments (8-bit codes move rho a little).
  m, s = _moments_np(state[0]), state[0]
  expected = {}
  for name in SHAPES:
    mu_hat, nu_hat = _corrected_bases(m, name, int(s.count))
    counts = np.asarray(s.objective_counts).reshape((2,) + (1,) * len(SHAPES[name]))
    first = np.abs(m["delta_mu"][name] / (1 - B1**counts) + mu_hat)
    second = np.abs(m["delta_nu"][name] / (1 - B2**counts) + nu_hat)
    safe = np.where(nu_hat > 0, nu_hat, 1.0)
    expected[name] = (first, np.broadcast_to(nu_hat, first.shape), second / safe)
  _, want = _hand_counted(expected, 0.05, 0.01)
  diagnose = jax.jit(lambda st, f: dualoptax.dualoptim_plus_conditioning(st, fraction=f))
  jitted = diagnose(state, jnp.float32(0.05))
  eager = dualoptax.dualoptim_plus_conditioning(state, fraction=0.05)
  # Quantization leaves some elements cancelled far deeper than the targets: the
  # unguarded maximum is then sensitive to float32 rounding (the guarded one is not).
  for i, field in enumerate(FIELDS):
    rtol = 1e-2 if field == "max_unguarded_update" else 1e-4
    np.testing.assert_allclose(getattr(eager[1], field), want[i], rtol=rtol, err_msg=field)
    np.testing.assert_allclose(getattr(jitted[1], field), getattr(eager[1], field), rtol=rtol)
  assert float(eager[1].cancelled_fraction.min()) > float(eager[1].floored_fraction.max()) > 0


def test_diagnostic_of_a_chain_without_a_record_takes_hyperparams():
  state, _ = _conditioned_state(2, floor=0.005)
  bare = state[0]
  with_record = dualoptax.dualoptim_plus_conditioning(state)[1]
  given = dualoptax.dualoptim_plus_conditioning(
    bare, hyperparams={**HYPERPARAMS, "denominator_floor": 0.005}
  )[1]
  for field in FIELDS:
    np.testing.assert_array_equal(getattr(given, field), getattr(with_record, field))
  with pytest.raises(ValueError, match="do not pass hyperparams"):
    dualoptax.dualoptim_plus_conditioning(state, hyperparams=HYPERPARAMS)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "0.1"], ids=repr)
def test_bad_fractions_are_refused_naming_the_value(bad):
  state = dualoptax.dualoptim_plus(1e-3).init(_params())
  with pytest.raises(ValueError, match="fraction") as error:
    dualoptax.dualoptim_plus_conditioning(state, fraction=bad)
  assert f"fraction={bad!r}" in str(error.value)
