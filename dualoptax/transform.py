"""Gradient transformations of DualOptim and DualOptim+.

Each transformation here does one thing and composes with any optax transformation:

* :func:`scale_by_dualoptim_plus` turns a gradient into the DualOptim+ direction
  ``(Dh + Bh) / (sqrt(|Eh + Vh|) + eps)`` (shared base moments plus per-objective deltas);
* :func:`scale_by_dualoptim` turns it into the Adam direction of the active objective's own
  moments (DualOptim);
* :func:`scale_by_objective_learning_rate` multiplies by ``-learning_rate * ratio[o]``.

Which objective ``o`` a step serves comes from the alternating schedule
(:mod:`dualoptax.objectives`) or from the ``objective=`` extra argument.

A step computes its scalar coefficients once (bias corrections, ``1 - beta``), then runs
the same per-parameter updater (``_moments.update_leaf``) for both optimizers with their
elementwise maths: the module-level functions below, one per new moment and one for the
direction. Per-objective moments are stored stacked: a parameter of shape ``S`` has delta
(or Adam) moments of shape ``(K, *S)``. A step changes only row ``o``: the other
objectives' moments stay bit-identical (8-bit ones are not even re-quantized), and one
compiled step serves every objective. For float32 moments the row is written with one
select over the stack, which XLA updates in place in a donated buffer; a
dynamic-update-slice would be copied by XLA:CPU every step (see ``_moments.update_row``
and ``tests/dualoptax/test_in_place.py``).

With 8-bit moments every product is rounded on its own (``_moments.rounded``) except
``(1 - beta) g`` in the base and Adam first-moment updates, which stays free to become a
fused multiply-add, so that XLA rounds alike wherever it recomputes a new moment. This
pattern reproduces the reference's codes best (``tests/integration/test_golden_8bit.py``).
The operand order of every expression is part of that contract: keep it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dualoptax import _checks, _moments, _numerics, _tree, objectives
from dualoptax._moments import MomentStorage, rounded

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


# ---------------------------------------------------------------------------------------
# DualOptim+: the step's scalars, then the elementwise maths of one parameter.


class _PlusCoefficients(NamedTuple):
  """The scalars of one DualOptim+ step on objective ``o``."""

  b1: Any
  b2: Any
  base_b1: Any
  base_b2: Any
  eps: Any
  one_minus_b1: Any
  one_minus_b2: Any
  one_minus_base_b1: Any
  one_minus_base_b2: Any
  inv_base_c1: jax.Array  # 1 / (1 - base_b1^(t-1)), 1 at t = 1
  inv_base_c2: jax.Array  # 1 / (1 - base_b2^(t-1)), 1 at t = 1
  delta_c1: jax.Array  # 1 - b1^t_o
  delta_c2: jax.Array  # 1 - b2^t_o
  denominator_floor: Any = None  # None: the paper's denominator (see _plus_direction)


def _plus_coefficients(
  b1: Any,
  b2: Any,
  base_b1: Any,
  base_b2: Any,
  eps: Any,
  count: jax.Array,
  active_count,
  denominator_floor: Any = None,
) -> _PlusCoefficients:
  """Coefficients of step ``count`` (this one included), the ``active_count``-th of ``o``."""
  # The base has absorbed count - 1 gradients; it is still all-zero at count 1.
  previous = count - 1
  base_c1 = jnp.where(previous > 0, _numerics.one_minus_power(base_b1, previous), 1.0)
  base_c2 = jnp.where(previous > 0, _numerics.one_minus_power(base_b2, previous), 1.0)
  return _PlusCoefficients(
    b1=b1,
    b2=b2,
    base_b1=base_b1,
    base_b2=base_b2,
    eps=eps,
    one_minus_b1=_numerics.one_minus(b1),
    one_minus_b2=_numerics.one_minus(b2),
    one_minus_base_b1=_numerics.one_minus(base_b1),
    one_minus_base_b2=_numerics.one_minus(base_b2),
    inv_base_c1=1.0 / base_c1,
    inv_base_c2=1.0 / base_c2,
    delta_c1=_numerics.one_minus_power(b1, active_count),
    delta_c2=_numerics.one_minus_power(b2, active_count),
    denominator_floor=denominator_floor,
  )


class _PlusContext(NamedTuple):
  """What the new DualOptim+ moments of one parameter share."""

  g: jax.Array
  g_sq: jax.Array
  mu_hat_base: jax.Array  # Bh, as of the previous step
  nu_hat_base: jax.Array  # Vh, as of the previous step


def _plus_context(c: _PlusCoefficients, guard, g, base_mu, base_nu) -> _PlusContext:
  # Bh and Vh as products with a scalar reciprocal: XLA recomputes a multiply inside each
  # fusion that needs them, but would materialize a divide as a temporary array.
  return _PlusContext(
    g=g,
    g_sq=rounded(g * g, guard),
    mu_hat_base=rounded(base_mu * c.inv_base_c1, guard),
    nu_hat_base=rounded(base_nu * c.inv_base_c2, guard),
  )


def _new_base_mu(c: _PlusCoefficients, guard, x: _PlusContext, base_mu):
  """B = base_b1 B + (1 - base_b1) g."""
  return rounded(c.base_b1 * base_mu, guard) + c.one_minus_base_b1 * x.g


def _new_base_nu(c: _PlusCoefficients, guard, x: _PlusContext, base_nu):
  """V = base_b2 V + (1 - base_b2) g^2."""
  return rounded(c.base_b2 * base_nu, guard) + c.one_minus_base_b2 * x.g_sq


def _new_delta_mu(c: _PlusCoefficients, guard, x: _PlusContext, delta_mu):
  """D_o = b1 D_o + (1 - b1) (g - Bh)."""
  return rounded(c.b1 * delta_mu, guard) + rounded(c.one_minus_b1 * (x.g - x.mu_hat_base), guard)


def _new_delta_nu(c: _PlusCoefficients, guard, x: _PlusContext, delta_nu):
  """E_o = b2 E_o + (1 - b2) (g^2 - Vh)."""
  return rounded(c.b2 * delta_nu, guard) + rounded(c.one_minus_b2 * (x.g_sq - x.nu_hat_base), guard)


def _plus_direction(c: _PlusCoefficients, x: _PlusContext, base_mu, base_nu, delta_mu, delta_nu):
  """u = (Dh_o + Bh) / (sqrt(|Eh_o + Vh|) + eps), with the base before this step.

  With a ``denominator_floor`` f the square root is of ``max(|Eh_o + Vh|, f Vh)``.
  """
  del base_mu, base_nu  # the new base serves the next step
  if c.denominator_floor is None:  # The paper's formula, expression for expression.
    return (delta_mu / c.delta_c1 + x.mu_hat_base) / (
      jnp.sqrt(jnp.abs(delta_nu / c.delta_c2 + x.nu_hat_base)) + c.eps
    )
  second = jnp.abs(delta_nu / c.delta_c2 + x.nu_hat_base)
  floored = jnp.maximum(second, c.denominator_floor * x.nu_hat_base)
  return (delta_mu / c.delta_c1 + x.mu_hat_base) / (jnp.sqrt(floored) + c.eps)


_PLUS_RULE = _moments.LeafRule(
  stacked=(False, False, True, True),
  context=_plus_context,
  moments=(_new_base_mu, _new_base_nu, _new_delta_mu, _new_delta_nu),
  direction=_plus_direction,
)


# ---------------------------------------------------------------------------------------
# DualOptim: Adam on the active objective's moments.


class _AdamCoefficients(NamedTuple):
  """The scalars of one DualOptim step on objective ``o``."""

  b1: Any
  b2: Any
  eps: Any
  one_minus_b1: Any
  one_minus_b2: Any
  c1: jax.Array  # 1 - b1^t_o
  c2: jax.Array  # 1 - b2^t_o


def _adam_coefficients(b1: Any, b2: Any, eps: Any, active_count: jax.Array) -> _AdamCoefficients:
  return _AdamCoefficients(
    b1=b1,
    b2=b2,
    eps=eps,
    one_minus_b1=_numerics.one_minus(b1),
    one_minus_b2=_numerics.one_minus(b2),
    c1=_numerics.one_minus_power(b1, active_count),
    c2=_numerics.one_minus_power(b2, active_count),
  )


def _adam_context(c: _AdamCoefficients, guard, g):
  del c, guard
  return g


# Float32: the operand order of optax.scale_by_adam ((1 - b) g + b m), so that XLA
# contracts it the same way and K = 1 reproduces optax bit for bit.
def _new_mu(c: _AdamCoefficients, guard, g, mu):
  """m_o = b1 m_o + (1 - b1) g."""
  return c.one_minus_b1 * g + rounded(c.b1 * mu, guard)


def _new_nu(c: _AdamCoefficients, guard, g, nu):
  """v_o = b2 v_o + (1 - b2) g^2."""
  return c.one_minus_b2 * rounded(g * g, guard) + rounded(c.b2 * nu, guard)


def _adam_direction(c: _AdamCoefficients, g, mu, nu):
  """u = (m_o / (1 - b1^t_o)) / (sqrt(v_o / (1 - b2^t_o)) + eps)."""
  del g
  return (mu / c.c1) / (jnp.sqrt(nu / c.c2) + c.eps)


_ADAM_RULE = _moments.LeafRule(
  stacked=(True, True), context=_adam_context, moments=(_new_mu, _new_nu), direction=_adam_direction
)


# ---------------------------------------------------------------------------------------
# The transformations.


def _update_leaves(
  rule: _moments.LeafRule,
  coefficients: Any,
  updates: optax.Updates,
  moments: Sequence[Any],
  active: jax.Array,
  storage: MomentStorage,
  tables: _moments.StateTables | None,
  guard: jax.Array,
) -> tuple[optax.Updates, list[Any]]:
  """Runs ``rule`` on every parameter: ``(direction tree, [new moment trees])``."""
  leaf = functools.partial(
    _moments.update_leaf, rule, coefficients, active=active, storage=storage, tables=tables
  )
  out = jax.tree.map(lambda g, *m: leaf(g, m, guard=guard), updates, *moments)
  direction, *new_moments = _tree.unzip(out, updates, 1 + len(moments))
  return direction, new_moments


def _check_common(b1: Any, b2: Any, eps: Any, objective_steps: Sequence[Any]) -> None:
  _checks.check_decay("b1", b1)
  _checks.check_decay("b2", b2)
  _checks.check_non_negative("eps", eps)
  objectives.validate_objective_steps(objective_steps)


def _check_denominator_floor(value: Any) -> None:
  """``denominator_floor`` must be None or a number in (0, 1].

  A traced scalar (``optax.inject_hyperparams``) passes: its value is unknown here.
  """
  if value is None:
    return
  if isinstance(value, jax.Array) and not _numerics.is_concrete_number(value):
    valid = value.ndim == 0
  else:
    number = _numerics.is_concrete_number(value) and not isinstance(value, (str, bytes, bool))
    valid = number and 0.0 < float(value) <= 1.0
  if not valid:
    raise ValueError(
      f"denominator_floor must be None or in (0, 1], got denominator_floor={value!r}"
    )


def scale_by_dualoptim_plus(
  b1: float = 0.9,
  b2: float = 0.95,
  base_b1: float = 0.9,
  base_b2: float = 0.95,
  eps: float = 1e-8,
  *,
  objective_steps: Sequence[int] = (1, 1),
  storage: MomentStorage | None = None,
  denominator_floor: float | None = None,
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

  With ``storage.state_bits == 8``, leaves of at least ``storage.min_8bit_size``
  elements store the six moments as block-wise 8-bit codes: ``B``, ``D``, ``E`` with the
  signed dynamic map (``E`` can be negative), ``V`` with the unsigned one. A step
  dequantizes the four moments it touches, updates them in float32 and re-quantizes them
  with fresh absmax; the inactive objectives' codes are left as they are.

  NaN or Inf in ``g`` enters the base and the active delta and stays there; wrap the
  optimizer in ``optax.apply_if_finite`` to skip such steps instead.

  ``E_o`` is an EMA of ``g^2 - Vh`` and can be negative, so ``Eh_o + Vh`` can come close
  to zero (the delta cancels the base) while ``Dh_o + Bh`` does not: the update entry is
  then up to ``|Dh_o + Bh| / eps``. With ``denominator_floor=f`` the denominator is
  ``sqrt(max(|Eh_o + Vh|, f Vh)) + eps``, so no entry exceeds
  ``|Dh_o + Bh| / (sqrt(f Vh) + eps)``. The floor is relative to the base second moment
  ``Vh`` (the scale of all recent gradients of that element) so that it is scale-free:
  multiplying every gradient by ``c`` multiplies both sides of the ``max`` by ``c^2`` and
  leaves which entries are floored, and the direction, unchanged, as without the floor;
  an absolute floor would act on small-gradient parameters and not on large ones. Where
  ``Vh`` is zero (the first step) the floor is zero. ``None`` (the default) is the paper's
  formula, bit for bit; :func:`dualoptax.dualoptim_plus_conditioning` measures how often
  the floor would act.

  Args:
    b1: decay of the delta first moments ``D``.
    b2: decay of the delta second moments ``E``.
    base_b1: decay of the base first moment ``B``.
    base_b2: decay of the base second moment ``V``.
    eps: added to the square root, after bias correction.
    objective_steps: steps per objective in one cycle of the alternating schedule; its
      length is the number of objectives K.
    storage: how the moments are stored (None: float32; see :class:`MomentStorage`).
    denominator_floor: None (the paper's denominator) or ``f`` in (0, 1]: the second
      moment under the square root is at least ``f * Vh`` (e.g. 0.01 bounds an entry by
      ``10 |Dh_o + Bh| / sqrt(Vh)``).

  Returns:
    A transformation accepting the ``objective=`` extra argument (an int or int32 array).

  Raises:
    ValueError: for a decay outside [0, 1), a negative eps, a bad schedule, or a
      ``denominator_floor`` outside (0, 1].

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
  _check_denominator_floor(denominator_floor)
  storage = MomentStorage() if storage is None else storage
  num_objectives = len(objective_steps)

  def init_fn(params):
    deltas = functools.partial(storage.zeros_like, params, storage.quantize_deltas, True)
    return ScaleByDualOptimPlusState(
      count=jnp.zeros([], jnp.int32),
      objective_counts=jnp.zeros([num_objectives], jnp.int32),
      base_mu=storage.zeros_like(params, storage.quantize_base, signed=True),
      base_nu=storage.zeros_like(params, storage.quantize_base, signed=False),
      delta_mu=deltas(num_objectives),
      delta_nu=deltas(num_objectives),
      tables=storage.tables(),
    )

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    del params, extra_args
    olds = (state.base_mu, state.base_nu, state.delta_mu, state.delta_nu)
    moments = [_moments.align_with_updates(m, updates) for m in olds]
    _checks.check_tree_matches(updates, _moments.param_shapes(moments[0]), "DualOptim+ state")
    active = objectives.active_objective(state.count, objective, objective_steps)
    count = optax.safe_increment(state.count)
    objective_counts = state.objective_counts.at[active].add(1)
    coefficients = _plus_coefficients(
      b1, b2, base_b1, base_b2, eps, count, objective_counts[active], denominator_floor
    )
    guard = _moments.contraction_guard(state.count)
    direction, new = _update_leaves(
      _PLUS_RULE, coefficients, updates, moments, active, storage, state.tables, guard
    )
    new = [_moments.unalign(n, o, updates) for n, o in zip(new, olds)]
    return direction, ScaleByDualOptimPlusState(count, objective_counts, *new, state.tables)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_dualoptim(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  *,
  objective_steps: Sequence[int] = (1, 1),
  storage: MomentStorage | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Adam on the active objective's own moments (DualOptim).

  Each objective ``o`` keeps ``m_o, v_o, t_o``; a step on ``o`` updates only those::

      m_o = b1 m_o + (1 - b1) g;  v_o = b2 v_o + (1 - b2) g^2
      u = (m_o / (1 - b1^t_o)) / (sqrt(v_o / (1 - b2^t_o)) + eps)

  With one objective this is exactly ``optax.scale_by_adam``. With 8-bit ``storage``,
  ``m`` uses the signed map and ``v`` the unsigned one.

  Args:
    b1: decay of the first moments.
    b2: decay of the second moments.
    eps: added to the square root, after bias correction.
    objective_steps: steps per objective in one cycle of the alternating schedule; its
      length is the number of objectives K.
    storage: how the moments are stored (None: float32; see :class:`MomentStorage`).
      ``quantize_base`` and ``quantize_deltas`` must stay True: DualOptim has neither.

  Returns:
    A transformation accepting the ``objective=`` extra argument.
  """
  _check_common(b1, b2, eps, objective_steps)
  storage = MomentStorage() if storage is None else storage
  if not (storage.quantize_base and storage.quantize_deltas):
    raise ValueError(
      "quantize_base and quantize_deltas choose DualOptim+'s state groups; DualOptim has "
      f"neither, got quantize_base={storage.quantize_base!r}, "
      f"quantize_deltas={storage.quantize_deltas!r}"
    )
  num_objectives = len(objective_steps)

  def init_fn(params):
    return ScaleByDualOptimState(
      count=jnp.zeros([], jnp.int32),
      objective_counts=jnp.zeros([num_objectives], jnp.int32),
      mu=storage.zeros_like(params, True, True, num_objectives),
      nu=storage.zeros_like(params, True, False, num_objectives),
      tables=storage.tables(),
    )

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    del params, extra_args
    moments = [_moments.align_with_updates(m, updates) for m in (state.mu, state.nu)]
    shapes = _moments.param_shapes(moments[0], stacked=True)
    _checks.check_tree_matches(updates, shapes, "DualOptim state")
    active = objectives.active_objective(state.count, objective, objective_steps)
    objective_counts = state.objective_counts.at[active].add(1)
    coefficients = _adam_coefficients(b1, b2, eps, objective_counts[active])
    guard = _moments.contraction_guard(state.count)
    direction, (mu, nu) = _update_leaves(
      _ADAM_RULE, coefficients, updates, moments, active, storage, state.tables, guard
    )
    mu, nu = (_moments.unalign(n, o, updates) for n, o in zip((mu, nu), (state.mu, state.nu)))
    count = optax.safe_increment(state.count)
    return direction, ScaleByDualOptimState(count, objective_counts, mu, nu, state.tables)

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
