"""dualoptax as an optax user writes it: vmap over models with one objective each,
optax's keyword names, None rejected, MultiSteps within one objective, optax.tree.get,
and the package's type marker."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax

_rng = np.random.default_rng(7)
PARAMS = {
  "w": jnp.asarray(_rng.normal(size=(64, 32)), jnp.float32),
  "b": jnp.asarray(_rng.normal(size=(32,)), jnp.float32),
}
NUM_MODELS = 3


def _grads(seed, batch=None):
  rng = np.random.default_rng(seed)
  shape = lambda s: s if batch is None else (batch, *s)
  return {k: jnp.asarray(rng.normal(size=shape(v.shape)), jnp.float32) for k, v in PARAMS.items()}


def _stacked(tree, n=NUM_MODELS):
  return jax.tree.map(lambda x: jnp.stack([x * (1 + i) for i in range(n)]), tree)


def _row(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


# ---------------------------------------------------------------------------------------
# jax.vmap over models, each with its own objective.

VMAP_OPTIMIZERS = {
  "dualoptim_plus": lambda: dualoptax.dualoptim_plus(1e-2, weight_decay=0.1, forget_lr_ratio=0.5),
  "dualoptim": lambda: dualoptax.dualoptim(1e-2, retain_lr_ratio=2.0),
  "plus_8bit": lambda: dualoptax.dualoptim_plus(
    1e-2, storage=dualoptax.MomentStorage(state_bits=8, min_8bit_size=1024)
  ),
  "multi_plus": lambda: dualoptax.multi_objective_dualoptim_plus(1e-2, (1, 2, 1)),
  "adamw": lambda: dualoptax.adamw(1e-2, forget_lr_ratio=0.5),
}


def _bounded_grads(seed, batch=None):
  """Gradients of magnitude in [0.5, 1.5]. DualOptim+ divides by sqrt(|Eh + Vh|) + eps,
  where Eh + Vh may cancel: for an element with a near-zero gradient the batched and the
  per-model programs' roundings (both correct) then give visibly different steps."""
  rng = np.random.default_rng(seed)
  draw = lambda s: rng.choice([-1.0, 1.0], size=s) * rng.uniform(0.5, 1.5, size=s)
  shape = lambda s: s if batch is None else (batch, *s)
  return {k: jnp.asarray(draw(shape(v.shape)), jnp.float32) for k, v in PARAMS.items()}


def _vmapped_step(tx):
  def step(params, state, grads, objective):
    updates, state = tx.update(grads, state, params, objective=objective)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.parametrize("name", list(VMAP_OPTIMIZERS))
def test_vmap_with_per_model_objectives_matches_a_loop_over_models(name):
  tx = VMAP_OPTIMIZERS[name]()
  step = _vmapped_step(tx)
  batched = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, 0)))
  single = jax.jit(step)
  params = _stacked(PARAMS)
  state = jax.vmap(tx.init)(params)
  per_model = [(_row(params, i), tx.init(_row(params, i))) for i in range(NUM_MODELS)]
  # Every model gets its own objective sequence, all ids valid.
  schedule = [[0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0]]
  for t, objectives in enumerate(schedule):
    grads = _bounded_grads(t, NUM_MODELS)
    params, state = batched(params, state, grads, jnp.asarray(objectives, jnp.int32))
    for i in range(NUM_MODELS):
      p, s = per_model[i]
      per_model[i] = single(p, s, _row(grads, i), jnp.int32(objectives[i]))
  for i in range(NUM_MODELS):
    got_params, got_state = _row((params, state), i)
    want_params, want_state = per_model[i]
    got_counts = [x for x in jax.tree.leaves(got_state) if x.dtype == jnp.int32]
    want_counts = [x for x in jax.tree.leaves(want_state) if x.dtype == jnp.int32]
    for got, want in zip(got_counts, want_counts):  # the steps each objective took
      np.testing.assert_array_equal(got, want)
    # Not bit-exact: the batched program rounds differently (see `_bounded_grads`). A
    # wrong objective would be off by a good part of a learning-rate step (1e-2).
    for got, want in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_vmap_with_an_invalid_id_in_the_batch_raises_naming_it(jit):
  tx = VMAP_OPTIMIZERS["dualoptim_plus"]()
  step = jax.vmap(_vmapped_step(tx))
  step = jax.jit(step) if jit else step
  params = _stacked(PARAMS)
  state = jax.vmap(tx.init)(params)
  grads = _grads(0, batch=NUM_MODELS)
  with pytest.raises(Exception) as info:
    jax.block_until_ready(step(params, state, grads, jnp.asarray([0, 5, 1], jnp.int32)))
  assert "objective=5 is not a valid objective id" in str(info.value), str(info.value)[-2000:]
  # The same program with valid ids runs.
  jax.block_until_ready(step(params, state, grads, jnp.asarray([0, 1, 1], jnp.int32)))


def test_vmap_with_one_shared_objective_still_works():
  tx = VMAP_OPTIMIZERS["dualoptim"]()
  step = jax.jit(jax.vmap(_vmapped_step(tx), in_axes=(0, 0, 0, None)))
  params = _stacked(PARAMS)
  params, state = step(params, jax.vmap(tx.init)(params), _grads(1, NUM_MODELS), jnp.int32(1))
  np.testing.assert_array_equal(state[0].objective_counts, [[0, 1]] * NUM_MODELS)


def test_traced_bad_objective_error_names_the_value():
  tx = VMAP_OPTIMIZERS["dualoptim_plus"]()
  step = jax.jit(_vmapped_step(tx))
  with pytest.raises(jax.errors.JaxRuntimeError) as info:
    jax.block_until_ready(step(PARAMS, tx.init(PARAMS), _grads(0), jnp.int32(-3)))
  assert "ValueError: objective=-3 is not a valid objective id" in str(info.value)


@pytest.mark.parametrize("bad", [1.0, 0.0, np.float32(1.0), jnp.float32(1.0)], ids=repr)
def test_float_objective_is_rejected_eagerly_as_under_jit(bad):
  tx = dualoptax.dualoptim_plus(1e-2)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="objective"):
    tx.update(_grads(0), state, PARAMS, objective=bad)
  with pytest.raises(ValueError, match="objective"):
    jax.jit(lambda g, s, p, o: tx.update(g, s, p, objective=o))(_grads(0), state, PARAMS, bad)


@pytest.mark.parametrize("ok", [1, np.int64(1), np.int8(1), jnp.int32(1), jnp.uint8(1)], ids=repr)
def test_integer_objectives_of_any_integer_type_are_accepted(ok):
  tx = dualoptax.dualoptim_plus(1e-2)
  state = tx.init(PARAMS)
  _, state = tx.update(_grads(0), state, PARAMS, objective=ok)
  np.testing.assert_array_equal(state[0].objective_counts, [0, 1])


# ---------------------------------------------------------------------------------------
# optax's signatures and keyword names.


def test_positional_hyperparameters_after_the_learning_rate_are_refused():
  """optax.adamw's positional order (b1, b2, eps, ...) cannot be misread as ours."""
  for alias in (dualoptax.adamw, dualoptax.adam, dualoptax.dualoptim, dualoptax.dualoptim_plus):
    with pytest.raises(TypeError):
      alias(1e-3, 0.9)
  for alias in (dualoptax.multi_objective_dualoptim, dualoptax.multi_objective_dualoptim_plus):
    with pytest.raises(TypeError):  # after learning_rate, objective_steps, objective_lr_ratios
      alias(1e-3, (1, 1), (1.0, 1.0), 0.9)


OPTAX_KEYWORDS = [
  dict(),
  dict(eps_root=1e-8),
  dict(nesterov=True),
  dict(mu_dtype=jnp.bfloat16),
  dict(mask={"w": True, "b": False}),
  dict(
    b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-10, nesterov=True, mask=lambda p: {"w": True, "b": False}
  ),
]


def _run(tx, n=8):
  params, state = PARAMS, tx.init(PARAMS)
  update = jax.jit(tx.update)
  out = []
  for t in range(n):
    updates, state = update(_grads(100 + t), state, params)
    params = optax.apply_updates(params, updates)
    out.append((updates, params))
  return out, state


@pytest.mark.parametrize("kwargs", OPTAX_KEYWORDS, ids=lambda kw: ",".join(kw) or "defaults")
def test_adamw_equals_optax_adamw_with_the_same_keywords(kwargs):
  got, got_state = _run(dualoptax.adamw(1e-2, weight_decay=0.05, **kwargs))
  want, want_state = _run(optax.adamw(1e-2, weight_decay=0.05, **kwargs))
  for (gu, gp), (wu, wp) in zip(got, want):
    for x, y in zip(jax.tree.leaves((gu, gp)), jax.tree.leaves((wu, wp))):
      np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(y), maxulp=1)
  adam_state = dualoptax.find_state(got_state, optax.ScaleByAdamState)
  assert jax.tree.map(lambda m: m.dtype, adam_state.mu) == jax.tree.map(
    lambda m: m.dtype, want_state[0].mu
  )


@pytest.mark.parametrize("kwargs", OPTAX_KEYWORDS[:4], ids=lambda kw: ",".join(kw) or "defaults")
def test_adam_equals_optax_adam_with_the_same_keywords(kwargs):
  got, _ = _run(dualoptax.adam(1e-2, **kwargs))
  want, _ = _run(optax.adam(1e-2, **kwargs))
  for (gu, gp), (wu, wp) in zip(got, want):
    for x, y in zip(jax.tree.leaves((gu, gp)), jax.tree.leaves((wu, wp))):
      np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(y), maxulp=1)


def test_eps_root_is_recorded_for_readers_of_the_state():
  state = dualoptax.adamw(1e-3, eps_root=1e-9).init(PARAMS)
  assert dualoptax.hyperparameters(state, optax.ScaleByAdamState)["eps_root"] == 1e-9


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim"])
def test_mask_keyword_decays_only_the_masked_leaves(name):
  alias = getattr(dualoptax, name)
  grads = _grads(3)
  mask = {"w": True, "b": False}
  with_mask = alias(1e-2, weight_decay=0.5, mask=mask)
  decayed = alias(1e-2, weight_decay=0.5)
  plain = alias(1e-2)
  outs = [tx.update(grads, tx.init(PARAMS), PARAMS)[0] for tx in (with_mask, decayed, plain)]
  np.testing.assert_array_equal(outs[0]["w"], outs[1]["w"])
  np.testing.assert_array_equal(outs[0]["b"], outs[2]["b"])
  assert not np.array_equal(outs[0]["b"], outs[1]["b"])
  with pytest.raises(TypeError):  # the former name is gone
    alias(1e-2, weight_decay_mask=mask)


_MULTI = lambda learning_rate, **kw: dualoptax.multi_objective_dualoptim(
  learning_rate, (1, 1), **kw
)
_COMMON_NAMES = ("learning_rate", "eps", "b1")
NONE_CASES = (
  [(dualoptax.adamw, n) for n in (*_COMMON_NAMES, "weight_decay", "eps_root", "forget_lr_ratio")]
  + [(dualoptax.adam, n) for n in (*_COMMON_NAMES, "eps_root")]
  + [(dualoptax.dualoptim, n) for n in (*_COMMON_NAMES, "weight_decay", "retain_lr_ratio")]
  + [(dualoptax.dualoptim_plus, n) for n in (*_COMMON_NAMES, "weight_decay", "base_b2")]
  + [(_MULTI, n) for n in (*_COMMON_NAMES, "weight_decay")]
)


@pytest.mark.parametrize("factory,name", NONE_CASES)
def test_none_is_rejected_at_construction_naming_the_argument(factory, name):
  kwargs = {"learning_rate": 1e-3, name: None}
  with pytest.raises(ValueError, match=rf"{name} must be a number, got {name}=None"):
    factory(**kwargs)


def test_bad_state_bits_have_one_message():
  for bits in (4, 16, 0, 8.5):
    with pytest.raises(ValueError, match=rf"state_bits must be 8 or 32, got state_bits={bits}"):
      dualoptax.MomentStorage(state_bits=bits)
    with pytest.raises(ValueError, match=rf"state_bits must be 8 or 32, got state_bits={bits}"):
      dualoptax.dualoptim_plus(1e-3, state_bits=bits)


# ---------------------------------------------------------------------------------------
# optax.tree.get: a state has several 'count' fields.


def test_optax_tree_get_count_needs_the_state_named():
  tx = dualoptax.dualoptim_plus(1e-2)
  state = tx.init(PARAMS)
  _, state = tx.update(_grads(0), state, PARAMS)
  # As for optax.adamw with a schedule, the bare field name is ambiguous...
  with pytest.raises(KeyError, match="multiple values for 'count'"):
    optax.tree.get(state, "count")
  with pytest.raises(KeyError, match="multiple values for 'count'"):
    optax.tree.get(optax.adamw(optax.constant_schedule(1e-3)).init(PARAMS), "count")
  # ...and naming the state (the documented way) gives the direction's count.
  assert int(optax.tree.get(state, "ScaleByDualOptimPlusState").count) == 1
  assert int(dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState).count) == 1
  np.testing.assert_array_equal(optax.tree.get(state, "objective_counts"), [1, 0])


# ---------------------------------------------------------------------------------------
# Gradient accumulation within one objective.


def _accumulate(tx, objectives, every_k):
  params, state = PARAMS, tx.init(PARAMS)
  update = jax.jit(lambda g, s, p, o: tx.update(g, s, p, objective=o))
  for t, objective in enumerate(objectives):
    updates, state = update(_bounded_grads(200 + t), state, params, jnp.int32(objective))
    params = optax.apply_updates(params, updates)
  return params, state


def test_multi_steps_within_one_objective_equals_mean_gradient_updates():
  every_k, windows = 3, [1, 0, 1]
  objectives = [o for o in windows for _ in range(every_k)]
  # DualOptim (well conditioned: see `_bounded_grads` for DualOptim+'s cancellation).
  tx = dualoptax.multi_steps(dualoptax.dualoptim(1e-2, weight_decay=0.1), every_k)
  got, state = _accumulate(tx, objectives, every_k)
  # By hand: the optimizer fed each window's mean gradient, under that window's objective.
  base = dualoptax.dualoptim(1e-2, weight_decay=0.1)
  params, base_state = PARAMS, base.init(PARAMS)
  for w, objective in enumerate(windows):
    grads = [_bounded_grads(200 + w * every_k + i) for i in range(every_k)]
    mean = grads[0]
    for n, g in enumerate(grads[1:], start=1):  # optax.MultiSteps' running mean
      mean = jax.tree.map(lambda m, x: m + (x - m) / (n + 1), mean, g)  # noqa: B023
    updates, base_state = base.update(mean, base_state, params, objective=objective)
    params = optax.apply_updates(params, updates)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  inner = dualoptax.find_state(state, dualoptax.ScaleByDualOptimState)
  np.testing.assert_array_equal(inner.objective_counts, [1, 2])
  assert int(state.multi_steps.gradient_step) == len(windows)


def test_multi_steps_refuses_an_objective_change_inside_a_window():
  tx = dualoptax.multi_steps(dualoptax.dualoptim_plus(1e-2), 2)
  state = tx.init(PARAMS)
  _, state = tx.update(_grads(0), state, PARAMS, objective=0)
  with pytest.raises(ValueError, match=r"objective=1 differs from objective=0"):
    tx.update(_grads(1), state, PARAMS, objective=1)
  with pytest.raises(ValueError, match=r"objective=None \(the schedule's\) differs"):
    tx.update(_grads(1), state, PARAMS)
  step = jax.jit(lambda g, s, p, o: tx.update(g, s, p, objective=o))
  with pytest.raises(Exception, match=r"objective=1 differs from objective=0"):
    jax.block_until_ready(step(_grads(1), state, PARAMS, jnp.int32(1)))
  # The window's own objective completes it; the next window may serve another one.
  _, state = step(_grads(1), state, PARAMS, jnp.int32(0))
  _, state = step(_grads(2), state, PARAMS, jnp.int32(1))
  assert int(state.multi_steps.gradient_step) == 1


def test_multi_steps_with_the_schedule_serves_one_objective_per_window():
  """Without objective=, the schedule advances per applied update, not per mini-step."""
  steps, every_k = (1, 2), 2
  tx = dualoptax.multi_steps(
    dualoptax.dualoptim_plus(1e-2, forget_steps=steps[0], retain_steps=steps[1]), every_k
  )
  params, state = PARAMS, tx.init(PARAMS)
  served = []
  for t in range(6 * every_k):
    served.append(int(dualoptax.scheduled_objective(state.multi_steps.gradient_step, steps)))
    updates, state = tx.update(_grads(300 + t), state, params)
    params = optax.apply_updates(params, updates)
  assert served == [o for o in (0, 1, 1, 0, 1, 1) for _ in range(every_k)]
  inner = dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState)
  np.testing.assert_array_equal(inner.objective_counts, [2, 4])


def test_multi_steps_under_vmap_checks_each_models_window():
  tx = dualoptax.multi_steps(dualoptax.dualoptim(1e-2), 2)
  step = jax.jit(jax.vmap(lambda g, s, p, o: tx.update(g, s, p, objective=o)))
  params = _stacked(PARAMS)
  state = jax.vmap(tx.init)(params)
  _, state = step(_grads(0, NUM_MODELS), state, params, jnp.asarray([0, 1, 1], jnp.int32))
  with pytest.raises(Exception, match=r"objective=0 differs from objective=1"):
    jax.block_until_ready(
      step(_grads(1, NUM_MODELS), state, params, jnp.asarray([0, 1, 0], jnp.int32))
    )
  _, state = step(_grads(1, NUM_MODELS), state, params, jnp.asarray([0, 1, 1], jnp.int32))
  np.testing.assert_array_equal(
    state.multi_steps.inner_opt_state[0].objective_counts, [[1, 0], [0, 1], [0, 1]]
  )


# ---------------------------------------------------------------------------------------
# Packaging.


def test_the_package_ships_its_type_marker():
  root = pathlib.Path(dualoptax.__file__).parent
  assert (root / "py.typed").is_file()
  pyproject = (root.parent / "pyproject.toml").read_text()
  section = re.search(r"\[tool\.setuptools\.package-data\]\n(.*?)(\n\[|$)", pyproject, re.S)
  assert section and re.search(r'dualoptax = \[.*"py\.typed"', section.group(1)), pyproject
