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
moments of shape ``(K, *S)``. A step changes only row ``o``: the other objectives'
moments stay bit-identical (8-bit ones are not even re-quantized), and one compiled step
serves every objective. For float32 moments the row is written with one select over the
stack, which XLA updates in place in a donated buffer; a dynamic-update-slice would be
copied by XLA:CPU every step (see ``_moments.update_row`` and ``tests/dualoptax/test_in_place.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dualoptax import _checks, _moments, _numerics, _tree, objectives
from dualoptax._moments import Precision

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class ScaleByDualOptimPlusState(NamedTuple):
  """State of :func:`scale_by_dualoptim_plus`."""

  count: jax.Array  # int32 (), steps taken over all objectives (t).
  objective_counts: jax.Array  # int32 (K,), steps taken per objective (t_o).
  base_mu: optax.Updates  # B: EMA of every step's gradient, like the params.
  base_nu: optax.Updates  # V: EMA of every step's squared gradient.
  delta_mu: optax.Updates  # D: per objective, EMA of g - Bh; leaves (K, *param.shape).
  delta_nu: optax.Updates  # E: per objective, EMA of g^2 - Vh; may be negative.
  tables: _moments.StateTables | None = None  # code tables when states are 8-bit.


class ScaleByDualOptimState(NamedTuple):
  """State of :func:`scale_by_dualoptim`."""

  count: jax.Array  # int32 (), steps taken over all objectives (drives the schedule).
  objective_counts: jax.Array  # int32 (K,), steps taken per objective.
  mu: optax.Updates  # per objective Adam first moment; leaves (K, *param.shape).
  nu: optax.Updates  # per objective Adam second moment; leaves (K, *param.shape).
  tables: _moments.StateTables | None = None  # code tables when states are 8-bit.


class ScaleByObjectiveLearningRateState(NamedTuple):
  """State of :func:`scale_by_objective_learning_rate`."""

  count: jax.Array  # int32 (), steps taken: input to the schedule and the lr schedule.


def _zero_moments(
  params, precision: Precision, quantize: bool, signed: bool, num_objectives: int | None = None
) -> Any:
  """Zero moments like ``params`` (stacked K times if ``num_objectives``)."""
  which = precision.which_leaves(params)
  return jax.tree.map(
    lambda p, q: precision.zeros(p, quantize and q, signed, num_objectives), params, which
  )


def _moment_shapes(moments: Any, stacked: bool = False) -> Any:
  """Shapes of the parameters ``moments`` were built for (rows of stacked moments), with
  8-bit moments as single leaves, to check incoming updates against."""

  def shape_of(m):
    shape = m.codes.shape if isinstance(m, _moments.quantization.QuantizedArray) else m.shape
    return jax.ShapeDtypeStruct(shape[1:] if stacked else shape, jnp.float32)

  return jax.tree.map(shape_of, moments, is_leaf=_moments.is_moment_leaf)


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
  precision: Precision = Precision(),
  quantize_base: bool = True,
  quantize_deltas: bool = True,
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

  With ``precision.state_bits == 8``, leaves of at least ``precision.min_8bit_size``
  elements store the six moments as block-wise 8-bit codes: ``B``, ``D``, ``E`` with the
  signed dynamic map (``E`` can be negative), ``V`` with the unsigned one. A step
  dequantizes the four moments it touches, updates them in float32 and re-quantizes them
  with fresh absmax; the inactive objectives' codes are left as they are.

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
    precision: how moments are stored (float32 or 8-bit, see :class:`Precision`).
    quantize_base: with 8-bit states, whether the base ``B, V`` is quantized.
    quantize_deltas: with 8-bit states, whether the deltas ``D, E`` are quantized.

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
      base_mu=_zero_moments(params, precision, quantize_base, signed=True),
      base_nu=_zero_moments(params, precision, quantize_base, signed=False),
      delta_mu=_zero_moments(params, precision, quantize_deltas, True, num_objectives),
      delta_nu=_zero_moments(params, precision, quantize_deltas, True, num_objectives),
      tables=precision.tables(),
    )

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    del params, extra_args
    _checks.check_tree_matches(updates, _moment_shapes(state.base_mu), "DualOptim+ state")
    active = objectives.active_objective(state.count, objective, objective_steps)
    count = optax.safe_increment(state.count)
    objective_counts = state.objective_counts.at[active].add(1)
    active_count = objective_counts[active]
    tables = state.tables

    # The base has absorbed count - 1 gradients; it is still all-zero at count 1.
    base_previous = count - 1
    base_c1 = jnp.where(base_previous > 0, _numerics.one_minus_power(base_b1, base_previous), 1.0)
    base_c2 = jnp.where(base_previous > 0, _numerics.one_minus_power(base_b2, base_previous), 1.0)
    inv_base_c1, inv_base_c2 = 1.0 / base_c1, 1.0 / base_c2
    delta_c1 = _numerics.one_minus_power(b1, active_count)
    delta_c2 = _numerics.one_minus_power(b2, active_count)
    one_minus_b1, one_minus_b2 = _numerics.one_minus(b1), _numerics.one_minus(b2)
    one_minus_bb1 = _numerics.one_minus(base_b1)
    one_minus_bb2 = _numerics.one_minus(base_b2)

    guard = _moments.contraction_guard(state.count)

    def leaf_update(g, base_mu, base_nu, delta_mu, delta_nu):
      stored = (base_mu, base_nu, delta_mu, delta_nu)
      # 8-bit moments: every product is rounded on its own except (1 - base_b) g in the
      # base updates, which stays free to become a fused multiply-add, so that XLA rounds
      # alike wherever it recomputes a new moment (see `_moments.rounded`). This
      # pattern reproduces the reference's codes best (tests/integration/test_golden_8bit.py).
      quantized = [_moments.is_moment_leaf(m) for m in stored]
      r = (lambda x: _moments.rounded(x, guard)) if any(quantized) else (lambda x: x)

      def base_hats(bm, bn):
        # Times a scalar reciprocal: XLA recomputes a multiply inside each fusion that
        # needs Bh and Vh, but would materialize a divide as a temporary array.
        return r(bm * inv_base_c1), r(bn * inv_base_c2)

      def new_moments(g32, bm, bn, dm, dn):
        """(B, V, D_o, E_o) after this step, from their values before it."""
        g_sq = r(g32 * g32)
        mu_hat_base, nu_hat_base = base_hats(bm, bn)
        return (
          r(base_b1 * bm) + one_minus_bb1 * g32,
          r(base_b2 * bn) + one_minus_bb2 * g_sq,
          r(b1 * dm) + r(one_minus_b1 * (g32 - mu_hat_base)),
          r(b2 * dn) + r(one_minus_b2 * (g_sq - nu_hat_base)),
        )

      def direction_from(bm, bn, d, e):
        mu_hat_base, nu_hat_base = base_hats(bm, bn)
        return (d / delta_c1 + mu_hat_base) / (jnp.sqrt(jnp.abs(e / delta_c2 + nu_hat_base)) + eps)

      def step(g32, bm, bn, dm, dn):
        new = new_moments(g32, bm, bn, dm, dn)
        return new, (direction_from(bm, bn, new[2], new[3]),)

      g32 = g.astype(jnp.float32)
      if precision.chunked(stored):
        # One loop over chunks reads the old codes, writes the new ones in place and
        # produces the direction (see `_moments.update_quantized`).
        (new_base_mu, new_base_nu, delta_mu, delta_nu), (direction,) = _moments.update_quantized(
          step, g32, stored, (None, None, active, active), tables, guard, output_dtypes=(g.dtype,)
        )
      else:
        old_base_mu = _moments.load(base_mu, tables)
        old_base_nu = _moments.load(base_nu, tables)
        new_base_mu, new_base_nu = (
          _moments.store(value, like, tables)
          for value, like in zip(new_moments(g32, old_base_mu, old_base_nu, 0.0, 0.0)[:2], stored)
        )
        delta_mu, d = _moments.update_row(
          delta_mu,
          lambda dm: new_moments(g32, old_base_mu, old_base_nu, dm, 0.0)[2],
          active,
          tables,
        )
        delta_nu, e = _moments.update_row(
          delta_nu,
          lambda dn: new_moments(g32, old_base_mu, old_base_nu, 0.0, dn)[3],
          active,
          tables,
        )
        direction = direction_from(old_base_mu, old_base_nu, d, e)
      return (direction.astype(g.dtype), new_base_mu, new_base_nu, delta_mu, delta_nu)

    out = jax.tree.map(
      leaf_update, updates, state.base_mu, state.base_nu, state.delta_mu, state.delta_nu
    )
    direction, base_mu, base_nu, delta_mu, delta_nu = _tree.unzip(out, updates, 5)
    return direction, ScaleByDualOptimPlusState(
      count=count,
      objective_counts=objective_counts,
      base_mu=base_mu,
      base_nu=base_nu,
      delta_mu=delta_mu,
      delta_nu=delta_nu,
      tables=tables,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_dualoptim(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  objective_steps: Sequence[int] = (1, 1),
  precision: Precision = Precision(),
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Adam on the active objective's own moments (DualOptim).

  Each objective ``o`` keeps ``m_o, v_o, t_o``; a step on ``o`` updates only those::

      m_o = b1 m_o + (1 - b1) g;  v_o = b2 v_o + (1 - b2) g^2
      u = (m_o / (1 - b1^t_o)) / (sqrt(v_o / (1 - b2^t_o)) + eps)

  With one objective this is exactly ``optax.scale_by_adam``. With 8-bit ``precision``,
  ``m`` uses the signed map and ``v`` the unsigned one.

  Args:
    b1: decay of the first moments.
    b2: decay of the second moments.
    eps: added to the square root, after bias correction.
    objective_steps: steps per objective in one cycle of the alternating schedule; its
      length is the number of objectives K.
    precision: how moments are stored (float32 or 8-bit, see :class:`Precision`).

  Returns:
    A transformation accepting the ``objective=`` extra argument.
  """
  _check_common(b1, b2, eps, objective_steps)
  num_objectives = len(objective_steps)

  def init_fn(params):
    return ScaleByDualOptimState(
      count=jnp.zeros([], jnp.int32),
      objective_counts=jnp.zeros([num_objectives], jnp.int32),
      mu=_zero_moments(params, precision, True, True, num_objectives),
      nu=_zero_moments(params, precision, True, False, num_objectives),
      tables=precision.tables(),
    )

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    del params, extra_args
    _checks.check_tree_matches(updates, _moment_shapes(state.mu, stacked=True), "DualOptim state")
    active = objectives.active_objective(state.count, objective, objective_steps)
    objective_counts = state.objective_counts.at[active].add(1)
    active_count = objective_counts[active]
    c1 = _numerics.one_minus_power(b1, active_count)
    c2 = _numerics.one_minus_power(b2, active_count)
    one_minus_b1, one_minus_b2 = _numerics.one_minus(b1), _numerics.one_minus(b2)
    tables = state.tables

    guard = _moments.contraction_guard(state.count)

    def leaf_update(g, mu, nu):
      g32 = g.astype(jnp.float32)
      direction_from = lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps)
      # 8-bit: round b m on its own so that every fusion XLA recomputes the new moment
      # in rounds it alike (see `_moments.rounded`). Float32: same operand order as
      # optax.scale_by_adam ((1 - b) g + b m), so that XLA contracts it the same way and
      # K = 1 reproduces optax bit for bit.
      any_quantized = _moments.is_moment_leaf(mu) or _moments.is_moment_leaf(nu)
      r = (lambda x: _moments.rounded(x, guard)) if any_quantized else (lambda x: x)
      new_mu = lambda grad, mo: one_minus_b1 * grad + r(b1 * mo)
      new_nu = lambda grad, no: one_minus_b2 * r(grad * grad) + r(b2 * no)
      if precision.chunked((mu, nu)):
        # One loop over chunks rewrites the codes in place and produces the direction
        # (see `_moments.update_quantized`).
        def step(grad, mo, no):  # grad: a chunk of g32
          m, v = new_mu(grad, mo), new_nu(grad, no)
          return (m, v), (direction_from(m, v),)

        (mu, nu), (direction,) = _moments.update_quantized(
          step, g32, (mu, nu), (active, active), tables, guard, output_dtypes=(g.dtype,)
        )
        return direction, mu, nu
      mu, m = _moments.update_row(mu, lambda mo: new_mu(g32, mo), active, tables)
      nu, v = _moments.update_row(nu, lambda no: new_nu(g32, no), active, tables)
      return direction_from(m, v).astype(g.dtype), mu, nu

    out = jax.tree.map(leaf_update, updates, state.mu, state.nu)
    direction, mu, nu = _tree.unzip(out, updates, 3)
    return direction, ScaleByDualOptimState(
      count=optax.safe_increment(state.count),
      objective_counts=objective_counts,
      mu=mu,
      nu=nu,
      tables=tables,
    )

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
    "lr_ratios", lr_ratios, len(objective_steps), "the length of objective_steps"
  )
  for i, ratio in enumerate(lr_ratios):
    _checks.check_non_negative(f"lr_ratios[{i}]", ratio)
  constant_rates = None
  if not callable(learning_rate) and all(
    _numerics.is_concrete_number(v) for v in (learning_rate, *lr_ratios)
  ):
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
