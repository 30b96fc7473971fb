"""Gradient transformations of DualOptim and DualOptim+.

Each transformation here does one thing and composes with any optax transformation:

* :func:`scale_by_dualoptim_plus` turns a gradient into the DualOptim+ direction
  ``(Dh + Bh) / (sqrt(|Eh + Vh|) + eps)`` (shared base moments plus per-objective deltas);
* :func:`scale_by_dualoptim` turns it into the Adam direction of the active objective's own
  moments (DualOptim);
* :func:`scale_by_objective_learning_rate` multiplies by ``-learning_rate * ratio[o]``.

Which objective ``o`` a step serves comes from the alternating schedule
(:mod:`dualoptax.objectives`) or from the ``objective=`` extra argument.

Per-objective moments are stored stacked: a parameter of shape ``S`` has delta (or Adam)
moments of shape ``(K, *S)``. A step reads and writes only row ``o`` of them, with a
dynamic slice and an in-place dynamic update, so the other objectives' moments are
neither copied nor touched and one compiled step serves every objective.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from dualoptax import _checks, _numerics, _tree, objectives

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class ScaleByDualOptimPlusState(NamedTuple):
  """State of :func:`scale_by_dualoptim_plus`."""

  count: jax.Array  # int32 (), steps taken over all objectives (t).
  objective_counts: jax.Array  # int32 (K,), steps taken per objective (t_o).
  base_mu: optax.Updates  # B: EMA of every step's gradient, like the params.
  base_nu: optax.Updates  # V: EMA of every step's squared gradient.
  delta_mu: optax.Updates  # D: per objective, EMA of g - Bh; leaves (K, *param.shape).
  delta_nu: optax.Updates  # E: per objective, EMA of g^2 - Vh; may be negative.


class ScaleByDualOptimState(NamedTuple):
  """State of :func:`scale_by_dualoptim`."""

  count: jax.Array  # int32 (), steps taken over all objectives (drives the schedule).
  objective_counts: jax.Array  # int32 (K,), steps taken per objective.
  mu: optax.Updates  # per objective Adam first moment; leaves (K, *param.shape).
  nu: optax.Updates  # per objective Adam second moment; leaves (K, *param.shape).


class ScaleByObjectiveLearningRateState(NamedTuple):
  """State of :func:`scale_by_objective_learning_rate`."""

  count: jax.Array  # int32 (), steps taken: input to the schedule and the lr schedule.


def _zeros_stacked(params: Any, num_objectives: int, dtype: Any) -> Any:
  return jax.tree.map(
      lambda p: jnp.zeros((num_objectives, *jnp.shape(p)), dtype or jnp.result_type(p)),
      params)


def _row(stacked: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(stacked, index, axis=0, keepdims=False)


def _set_row(stacked: jax.Array, row: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(stacked, row.astype(stacked.dtype), index, 0)


def _check_common(b1: Any, b2: Any, eps: Any, objective_steps: Sequence[Any]) -> None:
  _checks.check_decay("b1", b1)
  _checks.check_decay("b2", b2)
  _checks.check_non_negative("eps", eps)
  objectives.validate_objective_steps(objective_steps)


def scale_by_dualoptim_plus(
    b1: float = 0.9,
    b2: float = 0.95,
    base_b1: float = 0.9,
    base_b2: float = 0.95,
    eps: float = 1e-8,
    objective_steps: Sequence[int] = (1, 1),
    state_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by the DualOptim+ rule (shared base + per-objective deltas).

  A step on objective ``o`` with gradient ``g`` (``t`` counts all steps, ``t_o`` the
  steps of ``o``, both including this one)::

      Bh = B / (1 - base_b1^(t-1)),  Vh = V / (1 - base_b2^(t-1))   (B, V at t = 1)
      D_o = b1 D_o + (1 - b1) (g - Bh);   E_o = b2 E_o + (1 - b2) (g^2 - Vh)
      u = (D_o / (1 - b1^t_o) + Bh) / (sqrt(|E_o / (1 - b2^t_o) + Vh|) + eps)
      B = base_b1 B + (1 - base_b1) g;    V = base_b2 V + (1 - base_b2) g^2

  The output ``u`` is the descent direction (multiply by ``-learning_rate``, e.g. with
  :func:`scale_by_objective_learning_rate`). The base is bias-corrected as of the
  previous step because it absorbs ``g`` only after the update.

  NaN or Inf in ``g`` enters the base and the active delta and stays there; wrap the
  optimizer in ``optax.apply_if_finite`` to skip such steps instead.

  Args:
    b1: decay of the delta first moments ``D``.
    b2: decay of the delta second moments ``E``.
    base_b1: decay of the base first moment ``B``.
    base_b2: decay of the base second moment ``V``.
    eps: added to the square root, after bias correction.
    objective_steps: steps per objective in one cycle of the alternating schedule; its
      length is the number of objectives K.
    state_dtype: dtype of all moments (float32 by default, whatever the params are).

  Returns:
    A transformation accepting the ``objective=`` extra argument (an int or int32 array).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import dualoptax
    >>> tx = optax.chain(dualoptax.scale_by_dualoptim_plus(), optax.scale(-1e-3))
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params,
    ...                            objective=dualoptax.RETAIN)
  """
  _check_common(b1, b2, eps, objective_steps)
  _checks.check_decay("base_b1", base_b1)
  _checks.check_decay("base_b2", base_b2)
  num_objectives = len(objective_steps)

  def init_fn(params):
    return ScaleByDualOptimPlusState(
        count=jnp.zeros([], jnp.int32),
        objective_counts=jnp.zeros([num_objectives], jnp.int32),
        base_mu=otu.zeros_like(params, dtype=state_dtype),
        base_nu=otu.zeros_like(params, dtype=state_dtype),
        delta_mu=_zeros_stacked(params, num_objectives, state_dtype),
        delta_nu=_zeros_stacked(params, num_objectives, state_dtype),
    )

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    del params, extra_args
    _checks.check_tree_matches(updates, state.base_mu, "DualOptim+ state")
    active = objectives.active_objective(state.count, objective, objective_steps)
    count = optax.safe_increment(state.count)
    objective_counts = state.objective_counts.at[active].add(1)
    active_count = objective_counts[active]

    # The base has absorbed count - 1 gradients; it is still all-zero at count 1.
    base_previous = count - 1
    base_c1 = jnp.where(base_previous > 0, _numerics.one_minus_power(base_b1, base_previous), 1.0)
    base_c2 = jnp.where(base_previous > 0, _numerics.one_minus_power(base_b2, base_previous), 1.0)
    delta_c1 = _numerics.one_minus_power(b1, active_count)
    delta_c2 = _numerics.one_minus_power(b2, active_count)
    one_minus_b1, one_minus_b2 = _numerics.one_minus(b1), _numerics.one_minus(b2)
    one_minus_bb1 = _numerics.one_minus(base_b1)
    one_minus_bb2 = _numerics.one_minus(base_b2)

    def leaf_update(g, base_mu, base_nu, delta_mu, delta_nu):
      g32 = g.astype(jnp.float32)
      g_sq = g32 * g32
      mu_hat_base = base_mu.astype(jnp.float32) / base_c1
      nu_hat_base = base_nu.astype(jnp.float32) / base_c2
      d = b1 * _row(delta_mu, active).astype(jnp.float32) + one_minus_b1 * (g32 - mu_hat_base)
      e = b2 * _row(delta_nu, active).astype(jnp.float32) + one_minus_b2 * (g_sq - nu_hat_base)
      direction = (d / delta_c1 + mu_hat_base) / (
          jnp.sqrt(jnp.abs(e / delta_c2 + nu_hat_base)) + eps)
      new_base_mu = base_b1 * base_mu.astype(jnp.float32) + one_minus_bb1 * g32
      new_base_nu = base_b2 * base_nu.astype(jnp.float32) + one_minus_bb2 * g_sq
      return (direction.astype(g.dtype), new_base_mu.astype(base_mu.dtype),
              new_base_nu.astype(base_nu.dtype), _set_row(delta_mu, d, active),
              _set_row(delta_nu, e, active))

    out = jax.tree.map(
        leaf_update, updates, state.base_mu, state.base_nu, state.delta_mu, state.delta_nu)
    direction, base_mu, base_nu, delta_mu, delta_nu = _tree.unzip(out, updates, 5)
    return direction, ScaleByDualOptimPlusState(
        count=count, objective_counts=objective_counts, base_mu=base_mu,
        base_nu=base_nu, delta_mu=delta_mu, delta_nu=delta_nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_dualoptim(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    objective_steps: Sequence[int] = (1, 1),
    state_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Adam on the active objective's own moments (DualOptim).

  Each objective ``o`` keeps ``m_o, v_o, t_o``; a step on ``o`` updates only those::

      m_o = b1 m_o + (1 - b1) g;  v_o = b2 v_o + (1 - b2) g^2
      u = (m_o / (1 - b1^t_o)) / (sqrt(v_o / (1 - b2^t_o)) + eps)

  With one objective this is exactly ``optax.scale_by_adam``.

  Args:
    b1: decay of the first moments.
    b2: decay of the second moments.
    eps: added to the square root, after bias correction.
    objective_steps: steps per objective in one cycle of the alternating schedule; its
      length is the number of objectives K.
    state_dtype: dtype of the moments (float32 by default).

  Returns:
    A transformation accepting the ``objective=`` extra argument.
  """
  _check_common(b1, b2, eps, objective_steps)
  num_objectives = len(objective_steps)

  def init_fn(params):
    return ScaleByDualOptimState(
        count=jnp.zeros([], jnp.int32),
        objective_counts=jnp.zeros([num_objectives], jnp.int32),
        mu=_zeros_stacked(params, num_objectives, state_dtype),
        nu=_zeros_stacked(params, num_objectives, state_dtype),
    )

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    del params, extra_args
    _checks.check_tree_matches(
        updates, jax.tree.map(lambda m: m[0], state.mu), "DualOptim state")
    active = objectives.active_objective(state.count, objective, objective_steps)
    objective_counts = state.objective_counts.at[active].add(1)
    active_count = objective_counts[active]
    c1 = _numerics.one_minus_power(b1, active_count)
    c2 = _numerics.one_minus_power(b2, active_count)
    one_minus_b1, one_minus_b2 = _numerics.one_minus(b1), _numerics.one_minus(b2)

    def leaf_update(g, mu, nu):
      g32 = g.astype(jnp.float32)
      m = b1 * _row(mu, active).astype(jnp.float32) + one_minus_b1 * g32
      v = b2 * _row(nu, active).astype(jnp.float32) + one_minus_b2 * (g32 * g32)
      direction = (m / c1) / (jnp.sqrt(v / c2) + eps)
      return direction.astype(g.dtype), _set_row(mu, m, active), _set_row(nu, v, active)

    out = jax.tree.map(leaf_update, updates, state.mu, state.nu)
    direction, mu, nu = _tree.unzip(out, updates, 3)
    return direction, ScaleByDualOptimState(
        count=optax.safe_increment(state.count), objective_counts=objective_counts,
        mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_objective_learning_rate(
    learning_rate: ScalarOrSchedule,
    lr_ratios: Sequence[float] = (1.0, 1.0),
    objective_steps: Sequence[int] = (1, 1),
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by ``-learning_rate * lr_ratios[o]`` for the active objective ``o``.

  Put it last in a chain (after any weight decay) so that decay is scaled by the same
  per-objective learning rate, as DualOptim and DualOptim+ do.

  Args:
    learning_rate: a float or an optax schedule of the total step count.
    lr_ratios: multiplier per objective (the reference's forget/retain lr ratio).
    objective_steps: the alternating schedule; must match the direction transform's.

  Returns:
    A transformation accepting the ``objective=`` extra argument.
  """
  _checks.check_non_negative("learning_rate", learning_rate)
  objectives.validate_objective_steps(objective_steps)
  _checks.check_same_length(
      "lr_ratios", lr_ratios, len(objective_steps), "the length of objective_steps")
  for i, ratio in enumerate(lr_ratios):
    _checks.check_non_negative(f"lr_ratios[{i}]", ratio)
  constant_rates = None
  if not callable(learning_rate) and all(
      _numerics.is_concrete_number(v) for v in (learning_rate, *lr_ratios)):
    # As the reference: lr * ratio in float64, rounded once to float32.
    constant_rates = tuple(float(learning_rate) * float(r) for r in lr_ratios)

  def init_fn(params):
    del params
    return ScaleByObjectiveLearningRateState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    del params, extra_args
    active = objectives.active_objective(state.count, objective, objective_steps)
    if constant_rates is not None:
      rate = jnp.asarray(constant_rates, jnp.float32)[active]
    else:
      lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
      ratios = jnp.stack([jnp.asarray(r, jnp.float32) for r in lr_ratios])
      rate = jnp.asarray(lr, jnp.float32) * ratios[active]
    updates = jax.tree.map(lambda u: (-rate * u).astype(u.dtype), updates)
    return updates, ScaleByObjectiveLearningRateState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
