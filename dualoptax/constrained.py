"""Constrained unlearning by primal-dual steps: a Lagrange multiplier as an optax transform.

Constrained entropic unlearning (Entesari et al. 2025, "Constrained Entropic Unlearning: A
Primal-Dual Framework for Large Language Models") poses unlearning as

    min_theta  L_f(theta)   subject to   L_r(theta) <= eps

and solves it on the Lagrangian ``L_f + lambda (L_r - eps)``: descent on ``theta`` and
projected ascent on the multiplier,

    lambda <- clip(lambda + eta_lambda (L_r - eps), 0, lambda_max),

which rises while the retain constraint is violated and falls (to 0 at most) while it holds.

Where ``lambda`` acts matters. In the alternating mode each step serves one objective and
its update is normalised by that objective's second moments: DualOptim's per-objective Adam
is invariant to the scale of the retain loss, and DualOptim+ is only through its shared
base. Multiplying the retain LOSS by ``lambda`` would therefore barely change the step. Here
``lambda`` multiplies the retain step's UPDATE instead, i.e. it is the retain objective's
learning-rate ratio, which every optimizer of this package honours. In the joint mode (one
weighted loss per step) the caller multiplies the retain loss by ``lambda`` itself
(:func:`lagrange_multiplier`) and the transform only keeps the multiplier up to date
(``scale_updates=False``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dualoptax import _checks
from dualoptax.diagnostics import find_state
from dualoptax.objectives import RETAIN


class LagrangeMultiplierState(NamedTuple):
  """State of :func:`scale_by_lagrange_multiplier` (float32 scalars, and one value per
  objective)."""

  multiplier: jax.Array  # lambda >= 0, applied to the constrained objective's steps
  bound: jax.Array  # eps; NaN until the first observed constrained loss sets it (bound_ratio)
  last_losses: jax.Array  # [K] the last loss observed for each objective (NaN before any)


def _check_settings(
  bound: float | None,
  bound_ratio: float | None,
  dual_learning_rate: float,
  initial_multiplier: float,
  max_multiplier: float | None,
) -> None:
  if (bound is None) == (bound_ratio is None):
    raise ValueError(
      f"give exactly one of bound and bound_ratio, got bound={bound!r}, bound_ratio={bound_ratio!r}"
    )
  if bound is not None and not math.isfinite(bound):
    raise ValueError(f"bound must be a finite number, got {bound!r}")
  if bound_ratio is not None and not (math.isfinite(bound_ratio) and bound_ratio > 0):
    raise ValueError(f"bound_ratio must be a finite number > 0, got {bound_ratio!r}")
  _checks.check_non_negative("dual_learning_rate", dual_learning_rate)
  _checks.check_non_negative("initial_multiplier", initial_multiplier)
  if max_multiplier is not None and not max_multiplier >= initial_multiplier:
    raise ValueError(
      f"max_multiplier must be >= initial_multiplier ({initial_multiplier!r}), got "
      f"{max_multiplier!r}"
    )


def scale_by_lagrange_multiplier(
  *,
  bound: float | None = None,
  bound_ratio: float | None = None,
  dual_learning_rate: float = 1.0,
  initial_multiplier: float = 1.0,
  max_multiplier: float | None = None,
  num_objectives: int = 2,
  constrained_objective: int = RETAIN,
  scale_updates: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Keeps the multiplier of the constraint ``L_c <= eps`` and applies it to its steps.

  ``update`` takes two extra arguments: ``objective`` (the step's objective, an int or int32
  array) and ``objective_losses`` (``[K]`` float32: each objective's loss at this step's
  parameters, NaN for the objectives the step did not evaluate). On a step that observed the
  constrained objective's loss ``L_c``::

      eps    = bound_ratio * L_c           (once, at the first such step, if bound_ratio)
      u      = lambda * u                  (scale_updates and objective == constrained)
      lambda = clip(lambda + eta (L_c - eps), 0, lambda_max)

  so the step uses the multiplier from before its own loss was seen (a primal step at
  ``lambda_k``, then the dual step), and a step that did not observe ``L_c`` leaves
  ``lambda`` alone. Put it last in a chain, after the learning rate, so that ``lambda`` acts
  as the constrained objective's learning-rate ratio.

  Args:
    bound: ``eps`` itself.
    bound_ratio: ``eps`` as a multiple of the first observed constrained loss (the paper's
      ``eps = (1 + alpha) L_r(pi_ref)`` with ``bound_ratio = 1 + alpha``).
    dual_learning_rate: ``eta``, the dual ascent step (0 keeps ``lambda`` fixed).
    initial_multiplier: ``lambda_0`` (1: the unconstrained alternating schedule).
    max_multiplier: ``lambda_max``; None: no upper limit.
    num_objectives: K, the length of ``objective_losses``.
    constrained_objective: Which objective's loss is constrained (RETAIN).
    scale_updates: Multiply the constrained objective's updates by ``lambda``; False when
      the caller weights its loss instead (joint steps).

  Example:

  >>> import jax.numpy as jnp, optax, dualoptax
  >>> tx = optax.chain(dualoptax.dualoptim_plus(1e-3),
  ...                  dualoptax.scale_by_lagrange_multiplier(bound=0.5))
  >>> params = {"w": jnp.ones(3)}
  >>> state = tx.init(params)
  >>> losses = jnp.array([jnp.nan, 0.9])           # a retain step: L_r = 0.9 > eps = 0.5
  >>> _, state = tx.update(params, state, params, objective=1, objective_losses=losses)
  >>> round(float(dualoptax.lagrange_multiplier(state)), 4)  # 1 + (0.9 - 0.5)
  1.4
  """
  _check_settings(bound, bound_ratio, dual_learning_rate, initial_multiplier, max_multiplier)
  upper = jnp.inf if max_multiplier is None else max_multiplier

  def init_fn(params):
    del params
    return LagrangeMultiplierState(
      multiplier=jnp.asarray(initial_multiplier, jnp.float32),
      bound=jnp.asarray(math.nan if bound is None else bound, jnp.float32),
      last_losses=jnp.full([num_objectives], jnp.nan, jnp.float32),
    )

  def update_fn(updates, state, params=None, *, objective=None, objective_losses=None, **extra):
    del params, extra
    if objective is None or objective_losses is None:
      raise ValueError(
        "scale_by_lagrange_multiplier needs objective= and objective_losses= in update, got "
        f"objective={objective!r}, objective_losses={objective_losses!r}"
      )
    losses = jnp.asarray(objective_losses, jnp.float32)
    constrained = losses[constrained_objective]
    observed = jnp.isfinite(constrained)
    eps = state.bound
    if bound_ratio is not None:
      eps = jnp.where(jnp.isnan(eps) & observed, bound_ratio * constrained, eps)
    if scale_updates:
      factor = jnp.where(jnp.asarray(objective) == constrained_objective, state.multiplier, 1.0)
      updates = jax.tree.map(lambda u: (factor * u).astype(u.dtype), updates)
    ascended = jnp.clip(state.multiplier + dual_learning_rate * (constrained - eps), 0.0, upper)
    return updates, LagrangeMultiplierState(
      multiplier=jnp.where(observed, ascended, state.multiplier),
      bound=eps,
      last_losses=jnp.where(jnp.isfinite(losses), losses, state.last_losses),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lagrange_multiplier(opt_state: Any) -> jax.Array:
  """The current ``lambda`` of the :func:`scale_by_lagrange_multiplier` in ``opt_state``."""
  return find_state(opt_state, LagrangeMultiplierState).multiplier


def constraint_metrics(opt_state: Any, constrained_objective: int = RETAIN) -> dict[str, jax.Array]:
  """The constraint's state for a log: ``multiplier``, ``bound``, ``slack`` (``eps - L_c``
  at the last observation: >= 0 while the constraint holds) and ``last_losses``."""
  state = find_state(opt_state, LagrangeMultiplierState)
  return {
    "multiplier": state.multiplier,
    "bound": state.bound,
    "slack": state.bound - state.last_losses[constrained_objective],
    "last_losses": state.last_losses,
  }
