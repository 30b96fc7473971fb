"""Invalid arguments fail early, with messages that name the parameter and the bad value.

Construction-time checks: every hyperparameter of every public optimizer. Update-time
checks: an unknown objective id (concrete: ``ValueError`` at the call; traced under
``jax.jit``: the computation fails when it runs) and a gradient tree that does not match
the parameters the state was built for. Update-time errors leave the state untouched: the
state passed in is unchanged and still gives the same next step as a run that never saw
the error.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax

SHAPES = {"embed": (8, 4), "w": (4, 4), "b": (4,)}
_rng = np.random.default_rng(0)
PARAMS = {k: jnp.asarray(_rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
GRADS = [
  {k: jnp.asarray(_rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()} for _ in range(3)
]


def _mentions(message: str, name: str) -> bool:
  """``name`` appears as a whole identifier (so 'b1' is not found inside 'base_b1')."""
  return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


# ---------------------------------------------------------------------------------------
# Hyperparameters.

D = dualoptax
PLUS = ("dualoptim_plus", lambda **kw: D.dualoptim_plus(kw.pop("learning_rate", 1e-3), **kw))
DUAL = ("dualoptim", lambda **kw: D.dualoptim(kw.pop("learning_rate", 1e-3), **kw))
ADAMW = ("adamw", lambda **kw: D.adamw(kw.pop("learning_rate", 1e-3), **kw))
ADAM = ("adam", lambda **kw: D.adam(kw.pop("learning_rate", 1e-3), **kw))
MULTI_PLUS = (
  "multi_objective_dualoptim_plus",
  lambda **kw: D.multi_objective_dualoptim_plus(
    kw.pop("learning_rate", 1e-3), kw.pop("objective_steps", (1, 2, 1)), **kw
  ),
)
MULTI_DUAL = (
  "multi_objective_dualoptim",
  lambda **kw: D.multi_objective_dualoptim(
    kw.pop("learning_rate", 1e-3), kw.pop("objective_steps", (1, 2, 1)), **kw
  ),
)
SCALE_PLUS = ("scale_by_dualoptim_plus", D.scale_by_dualoptim_plus)
SCALE_DUAL = ("scale_by_dualoptim", D.scale_by_dualoptim)
ALL_OPTIMIZERS = (PLUS, DUAL, ADAMW, ADAM, MULTI_PLUS, MULTI_DUAL)


def _cases(optimizers, name, values):
  return [
    pytest.param(factory, name, value, id=f"{label}-{name}={value!r}")
    for label, factory in optimizers
    for value in values
  ]


DECAYS = (1.0, -0.1, 1.5)
HYPERPARAMETER_CASES = (
  _cases(ALL_OPTIMIZERS, "learning_rate", (-1e-3, math.nan, math.inf))
  + _cases(ALL_OPTIMIZERS + (SCALE_PLUS, SCALE_DUAL), "b1", DECAYS)
  + _cases(ALL_OPTIMIZERS + (SCALE_PLUS, SCALE_DUAL), "b2", DECAYS)
  + _cases((PLUS, MULTI_PLUS, SCALE_PLUS), "base_b1", DECAYS)
  + _cases((PLUS, MULTI_PLUS, SCALE_PLUS), "base_b2", DECAYS)
  + _cases(ALL_OPTIMIZERS + (SCALE_PLUS, SCALE_DUAL), "eps", (-1e-8, math.inf))
  + _cases((PLUS, DUAL, ADAMW, MULTI_PLUS, MULTI_DUAL), "weight_decay", (-0.1, math.nan))
  + _cases(
    (MULTI_PLUS, MULTI_DUAL, SCALE_PLUS, SCALE_DUAL),
    "objective_steps",
    ((0, 0), (0, 0, 0), (1, -1), (1, 1.5), ()),
  )
)


@pytest.mark.parametrize("factory,name,value", HYPERPARAMETER_CASES)
def test_invalid_hyperparameter_is_named_with_its_value(factory, name, value):
  with pytest.raises(ValueError) as info:
    factory(**{name: value})
  message = str(info.value)
  assert _mentions(message, name), message
  # The bad value itself, or for a sequence the offending entry.
  shown = [repr(value)] + (
    [repr(v) for v in value if not 0 <= v == int(v)] if isinstance(value, tuple) else []
  )
  assert any(s in message for s in shown), message


# The two-objective aliases take the schedule and the ratios as separate arguments
# (forget_steps, retain_steps, forget_lr_ratio, retain_lr_ratio) that become internal
# sequences; the multi-objective forms take objective_lr_ratios. The messages must name
# the argument the caller passed, not the internal 'lr_ratios[0]' or 'objective_steps[1]'.
RATIO_ARGUMENTS = [
  (dict(forget_lr_ratio=-0.5), "forget_lr_ratio", "-0.5"),
  (dict(retain_lr_ratio=-2.0), "retain_lr_ratio", "-2.0"),
  (dict(forget_lr_ratio=math.inf), "forget_lr_ratio", "inf"),
]
STEP_ARGUMENTS = [
  (dict(forget_steps=-1), "forget_steps", "-1"),
  (dict(retain_steps=-3), "retain_steps", "-3"),
  (dict(forget_steps=1.5), "forget_steps", "1.5"),
  (dict(retain_steps=2.25), "retain_steps", "2.25"),
  (dict(forget_steps=0, retain_steps=0), "forget_steps", "0"),
]
MULTI_RATIO_ARGUMENTS = [
  (dict(objective_lr_ratios=(1.0, 0.5)), "objective_lr_ratios", "(1.0, 0.5)"),
  (dict(objective_lr_ratios=(1.0, 0.5, 1.0, 1.0)), "objective_lr_ratios", "(1.0, 0.5, 1.0, 1.0)"),
  (dict(objective_lr_ratios=(1.0, -0.5, 1.0)), "objective_lr_ratios", "-0.5"),
]
TWO_OBJECTIVE = (PLUS, DUAL, ADAMW, ADAM)
GROUPS = {
  "ratios": (TWO_OBJECTIVE, RATIO_ARGUMENTS, "lr_ratios"),
  "steps": (TWO_OBJECTIVE, STEP_ARGUMENTS, "objective_steps"),
  "multi_ratios": ((MULTI_PLUS, MULTI_DUAL), MULTI_RATIO_ARGUMENTS, "lr_ratios"),
}


def _group_cases(group):
  optimizers, arguments, _ = GROUPS[group]
  return [
    (label, factory, kwargs, name, shown)
    for label, factory in optimizers
    for kwargs, name, shown in arguments
  ]


@pytest.mark.parametrize(
  "label,factory,kwargs,name,shown",
  [
    pytest.param(*case, id=f"{case[0]}-{case[3]}={case[4]}")
    for group in GROUPS
    for case in _group_cases(group)
  ],
)
def test_invalid_schedule_or_ratio_raises_with_the_value(label, factory, kwargs, name, shown):
  with pytest.raises(ValueError) as info:
    factory(**kwargs)
  message = str(info.value)
  assert shown in message, message
  assert _mentions(message, name), message


@pytest.mark.parametrize("group", list(GROUPS))
def test_invalid_schedule_or_ratio_names_the_argument_passed(group):
  """E.g. dualoptim_plus(forget_lr_ratio=-0.5) says 'forget_lr_ratio', not an internal name."""
  unnamed = []
  for label, factory, kwargs, name, shown in _group_cases(group):
    with pytest.raises(ValueError) as info:
      factory(**kwargs)
    if not _mentions(str(info.value), name):
      unnamed.append(f"{label}({kwargs}): {info.value}")
  assert not unnamed, "\n".join(unnamed)


@pytest.mark.parametrize(
  "factory",
  [
    lambda: dualoptax.scale_by_objective_learning_rate(1e-3, (1.0,), (1, 1)),
    lambda: dualoptax.scale_by_objective_learning_rate(1e-3, (1.0, 1.0, 1.0), (1, 1)),
  ],
  ids=["too-few", "too-many"],
)
def test_lr_ratios_length_mismatch_in_the_transform(factory):
  with pytest.raises(ValueError, match=r"lr_ratios must have one entry per objective"):
    factory()


@pytest.mark.parametrize("label,factory", [PLUS, DUAL, ADAMW, MULTI_PLUS])
def test_valid_edge_values_are_accepted(label, factory):
  """The checks are not over-eager: zero learning rate, decay 0, eps 0 are allowed."""
  kwargs = dict(learning_rate=0.0, b1=0.0, b2=0.0, eps=0.0)
  tx = factory(**kwargs)
  state = tx.init(PARAMS)
  updates, _ = jax.jit(tx.update)(GRADS[0], state, PARAMS)
  for u in jax.tree.leaves(updates):
    assert np.all(np.asarray(u) == 0)


# ---------------------------------------------------------------------------------------
# Update-time errors, and the state they leave behind.

OPTIMIZERS = {
  "dualoptim_plus": lambda: dualoptax.dualoptim_plus(1e-2, weight_decay=0.1),
  "dualoptim": lambda: dualoptax.dualoptim(1e-2, weight_decay=0.1),
  "adamw": lambda: dualoptax.adamw(1e-2, forget_lr_ratio=0.5),
  "multi_plus": lambda: dualoptax.multi_objective_dualoptim_plus(1e-2, (1, 2, 1)),
  "clipped_plus": lambda: optax.chain(
    optax.clip_by_global_norm(1.0), dualoptax.dualoptim_plus(1e-2)
  ),
}
NUM_OBJECTIVES = {"multi_plus": 3}


@functools.cache
def _setup(name):
  """The optimizer, a jitted step with a traced objective, the state after two steps, and
  the result of a third (RETAIN) step from that state."""
  tx = OPTIMIZERS[name]()

  @jax.jit
  def step(params, state, grads, objective):
    updates, state = tx.update(grads, state, params, objective=objective)
    return optax.apply_updates(params, updates), state

  params, state = PARAMS, tx.init(PARAMS)
  for g, o in zip(GRADS[:2], (0, 1)):
    params, state = step(params, state, g, jnp.int32(o))
  expected = step(params, state, GRADS[2], jnp.int32(1))
  return tx, step, params, state, expected


def _snapshot(tree):
  return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]


def _assert_untouched_and_usable(name, params, state, snapshot):
  """The state is what it was, and the next valid step gives the undisturbed result."""
  _, step, _, _, expected = _setup(name)
  after = jax.tree.leaves(state)
  assert len(after) == len(snapshot)
  for x, y in zip(after, snapshot):
    np.testing.assert_array_equal(np.asarray(x), y)
  got = step(params, state, GRADS[2], jnp.int32(1))
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _bad_ids(name):
  k = NUM_OBJECTIVES.get(name, 2)
  return [k, k + 3, -1]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unknown_python_objective_raises_at_the_call(name):
  tx, _, params, state, _ = _setup(name)
  snapshot = _snapshot(state)
  for bad in _bad_ids(name):
    with pytest.raises(ValueError) as info:
      tx.update(GRADS[2], state, params, objective=bad)
    assert f"objective={bad}" in str(info.value), str(info.value)
  # Also when traced under jit with a Python int baked in.
  with pytest.raises(ValueError, match=r"objective=-1\b"):
    jax.jit(lambda g, s, p: tx.update(g, s, p, objective=-1))(GRADS[2], state, params)
  _assert_untouched_and_usable(name, params, state, snapshot)


@pytest.mark.parametrize("bad", [0.5, 1.5, -0.5])
def test_objective_that_is_not_an_integer_is_rejected(bad):
  tx, _, params, state, _ = _setup("dualoptim_plus")
  snapshot = _snapshot(state)
  with pytest.raises(ValueError) as info:
    tx.update(GRADS[2], state, params, objective=bad)
  assert f"objective={bad!r}" in str(info.value), str(info.value)
  _assert_untouched_and_usable("dualoptim_plus", params, state, snapshot)


@pytest.mark.parametrize(
  "bad", [jnp.float32(1.0), jnp.array([0, 1], jnp.int32)], ids=["float-array", "vector"]
)
def test_objective_array_of_wrong_kind_is_rejected_under_jit(bad):
  tx, _, params, state, _ = _setup("dualoptim_plus")
  with pytest.raises(ValueError, match="objective must be an integer scalar"):
    jax.jit(lambda g, s, p, o: tx.update(g, s, p, objective=o))(GRADS[2], state, params, bad)


@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim", "adamw", "multi_plus"])
def test_unknown_traced_objective_fails_when_the_step_runs(name):
  _, step, params, state, _ = _setup(name)
  snapshot = _snapshot(state)
  for bad in (5, -1):
    with pytest.raises(Exception) as info:
      jax.block_until_ready(step(params, state, GRADS[2], jnp.int32(bad)))
    assert f"objective={bad}" in str(info.value), str(info.value)[-2000:]
  # A valid id through the same compiled step still works, from the same state.
  _assert_untouched_and_usable(name, params, state, snapshot)


def _without(tree, key):
  return {k: v for k, v in tree.items() if k != key}


MISMATCHES = {
  "missing": (lambda g: _without(g, "w"), ["['w']", "missing"]),
  "extra": (lambda g: {**g, "x": jnp.ones(3)}, ["['x']", "unexpected"]),
  "shape": (lambda g: {**g, "w": jnp.ones((4, 5))}, ["['w']", "(4, 5)", "(4, 4)"]),
  "transposed": (lambda g: {**g, "embed": g["embed"].T}, ["['embed']", "(4, 8)"]),
  "scalar": (lambda g: {**g, "b": jnp.float32(1.0)}, ["['b']", "()"]),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mismatch", list(MISMATCHES))
@pytest.mark.parametrize("name", ["dualoptim_plus", "dualoptim", "multi_plus", "clipped_plus"])
def test_gradient_tree_mismatch_names_the_path(name, mismatch, jit):
  tx, _, params, state, _ = _setup(name)
  snapshot = _snapshot(state)
  make_bad, expected_fragments = MISMATCHES[mismatch]
  bad = make_bad(GRADS[2])
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError) as info:
    update(bad, state, params)
  message = str(info.value)
  for fragment in expected_fragments:
    assert fragment in message, message
  _assert_untouched_and_usable(name, params, state, snapshot)


def test_nested_path_is_named_in_full():
  params = {"layer": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, "head": jnp.ones(2)}
  tx = dualoptax.dualoptim_plus(1e-2)
  state = tx.init(params)
  bad = {"layer": {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}, "head": jnp.ones(2)}
  with pytest.raises(ValueError, match=re.escape("['layer']['w']")):
    tx.update(bad, state, params)
  missing = {"layer": {"w": jnp.ones((3, 2))}, "head": jnp.ones(2)}
  with pytest.raises(ValueError, match=re.escape("['layer']['b']")):
    tx.update(missing, state, params)


@pytest.mark.parametrize(
  "kwargs", [dict(learning_rate="0.01"), dict(forget_steps=True), dict(b1="0.9")]
)
def test_strings_and_bools_are_not_numbers(kwargs):
  kwargs = {"learning_rate": 1e-3, **kwargs}
  with pytest.raises(
    ValueError,
    match=next(k for k in kwargs if k != "learning_rate") if len(kwargs) > 1 else "learning_rate",
  ):
    dualoptax.dualoptim_plus(**kwargs)


@pytest.mark.parametrize("objective", ["1", True])
def test_objective_must_be_an_int(objective):
  tx = dualoptax.dualoptim_plus(1e-3)
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="objective"):
    tx.update(params, tx.init(params), params, objective=objective)
