"""Objectives and the alternating schedule that says which one a step serves.

Unlearning has two objectives, FORGET and RETAIN; multi-task learning may have any number
K. Objectives are identified by integers ``0 .. K-1``. A schedule of ``steps[k]`` steps
per objective, taken in order and repeated, assigns each step of a run to one objective:
with ``steps = (F_f, F_r)`` and ``s`` the 0-based step index,

    objective(s) = FORGET  if  s mod (F_f + F_r) < F_f  else RETAIN.

A caller may instead name the objective of a step through optax's extra-args mechanism:
``tx.update(grads, state, params, objective=RETAIN)``. The id may be a traced value under
``jax.jit``; one compiled step then serves every objective. Under ``jax.vmap`` it may
differ per batch element (e.g. several models, one objective each, ``in_axes=0``). Ids
are checked on the values used (see :func:`checked_objective`).

``optax.MultiSteps`` would average gradients of different objectives into one update
when the objective changes inside an accumulation window; :func:`multi_steps` refuses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dualoptax import _numerics

FORGET, RETAIN = 0, 1
"""The unlearning objectives: ``FORGET`` pushes knowledge out, ``RETAIN`` keeps utility."""


def check_step_count(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is a non-negative integer (or traced)."""
  if isinstance(value, (str, bytes, bool)):
    raise ValueError(f"{name} must be a non-negative integer number of steps, got {name}={value!r}")
  if not _numerics.is_concrete_number(value):
    return
  as_float = float(value)
  if as_float != int(as_float) or as_float < 0:
    raise ValueError(f"{name} must be a non-negative integer number of steps, got {name}={value!r}")


def validate_objective_steps(steps: Sequence[Any], name: str = "objective_steps") -> None:
  """Raises ``ValueError`` unless ``steps`` is a usable schedule.

  Each entry must be a non-negative integer and at least one must be positive. Traced
  entries (under ``optax.inject_hyperparams``) cannot be checked and are accepted.
  """
  if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or not steps:
    raise ValueError(f"{name} must be a non-empty sequence of step counts, got {name}={steps!r}")
  for i, value in enumerate(steps):
    check_step_count(f"{name}[{i}]", value)
  if all(_numerics.is_concrete_number(v) for v in steps) and sum(int(v) for v in steps) == 0:
    raise ValueError(f"{name} must contain at least one positive count, got {tuple(steps)!r}")


def scheduled_objective(step: jax.Array, objective_steps: Sequence[Any]) -> jax.Array:
  """The objective that the alternating schedule assigns to 0-based ``step``.

  Args:
    step: integer scalar, the number of steps already taken in the run.
    objective_steps: steps per objective per cycle, e.g. ``(1, 5)`` for the paper's
      one forget step then five retain steps.

  Returns:
    An int32 scalar in ``[0, len(objective_steps))``.

  Example:
    >>> import jax.numpy as jnp
    >>> [int(scheduled_objective(jnp.int32(s), (1, 2))) for s in range(6)]
    [0, 1, 1, 0, 1, 1]
  """
  steps = jnp.asarray(
    np.asarray(objective_steps, np.int32)
    if all(_numerics.is_concrete_number(s) for s in objective_steps)
    else jnp.stack([jnp.asarray(s, jnp.int32) for s in objective_steps])
  )
  ends = jnp.cumsum(steps)
  position = jnp.asarray(step, jnp.int32) % ends[-1]
  # Objectives with zero steps have an empty interval and are never chosen.
  return jnp.sum(position >= ends).astype(jnp.int32)


def _unknown_objective(value: Any, num_objectives: int) -> str:
  return (
    f"objective={value!r} is not a valid objective id; expected an integer in "
    f"[0, {num_objectives}) (FORGET={FORGET}, RETAIN={RETAIN})"
  )


def _check_ids_on_host(objective: Any, *, num_objectives: int) -> None:
  """Raises ``ValueError`` naming the first invalid id among ``objective``'s values.

  The callback checks the values it receives rather than trusting the device-side
  predicate: under ``jax.vmap`` the ``lax.cond`` guarding it becomes a select that runs
  both branches, so it is then called for every model's id, valid or not.
  """
  for value in np.asarray(objective).ravel().tolist():
    if not 0 <= value < num_objectives:
      raise ValueError(_unknown_objective(value, num_objectives))


def check_on_host(invalid: jax.Array, callback: Callable[..., None], *args: Any) -> None:
  """Runs ``callback(*args)`` (which raises on bad ``args``) when ``invalid`` may be true.

  Concrete values are checked at once. Traced ones are checked when the computation
  runs, by a host callback that fires only on a true ``invalid`` (``lax.cond``), or, under
  ``jax.vmap``, for every batch element; ``callback`` must therefore check its arguments
  itself. JAX reports an exception raised on the host while a compiled computation runs
  as a ``jax.errors.JaxRuntimeError`` ("INTERNAL: CpuCallback error ...") whose text ends
  with the original exception and its message; it cannot re-raise the original type.
  """
  if not isinstance(invalid, jax.core.Tracer):
    if bool(invalid):
      callback(*args)
    return
  jax.lax.cond(invalid, lambda: jax.debug.callback(callback, *args), lambda: None)


def checked_objective(objective: Any, num_objectives: int) -> jax.Array:
  """Returns ``objective`` as an int32 scalar after checking it names an objective.

  Only integers are objective ids: Python ints, NumPy integers and integer scalar
  arrays; floats (even ``1.0``), bools and strings raise ``ValueError``, eagerly and
  under ``jit`` alike. A concrete id out of range raises ``ValueError`` immediately. A
  traced id (under ``jit`` or ``vmap``, e.g. one id per model with ``in_axes=0``) is
  checked when the step runs: an out-of-range value makes the computation fail with the
  same message, naming the value (see :func:`check_on_host`), rather than silently
  training some other objective. Outside ``vmap``, valid ids cost no host round trip.
  """
  if isinstance(objective, (str, bytes, bool, np.bool_)):
    raise ValueError(f"objective={objective!r} is not a valid objective id; expected an int")
  if isinstance(objective, (int, np.integer)):
    if not 0 <= int(objective) < num_objectives:
      raise ValueError(_unknown_objective(int(objective), num_objectives))
    return jnp.int32(int(objective))
  if isinstance(objective, float):
    raise ValueError(_unknown_objective(objective, num_objectives))
  objective = jnp.asarray(objective)
  if objective.shape != () or not jnp.issubdtype(objective.dtype, jnp.integer):
    shown = "" if isinstance(objective, jax.core.Tracer) else f"objective={objective!r}: "
    raise ValueError(
      f"{shown}objective must be an integer scalar, got shape {objective.shape} and dtype "
      f"{objective.dtype}"
    )
  # Checked in its own dtype, before the cast, so that the id used is the id checked.
  invalid = (objective < 0) | (objective >= num_objectives)
  check_on_host(
    invalid, functools.partial(_check_ids_on_host, num_objectives=num_objectives), objective
  )
  return objective.astype(jnp.int32)


def active_objective(step: jax.Array, objective: Any, objective_steps: Sequence[Any]) -> jax.Array:
  """The objective a step serves: ``objective`` if given, else the schedule's choice."""
  if objective is None:
    return scheduled_objective(step, objective_steps)
  return checked_objective(objective, len(objective_steps))


# ---------------------------------------------------------------------------------------
# Gradient accumulation within one objective.

_SCHEDULED = np.iinfo(np.int32).min  # a window whose mini-steps gave no objective=


class MultiStepsObjectiveState(NamedTuple):
  """State of :func:`multi_steps`."""

  window_objective: jax.Array  # int32 (): the objective of the window's first mini-step.
  multi_steps: optax.MultiStepsState  # the state of the wrapped ``optax.MultiSteps``.


def _describe_window(value: int) -> str:
  return "None (the schedule's)" if value == _SCHEDULED else str(value)


def _check_window_on_host(window: Any, given: Any) -> None:
  """Raises ``ValueError`` if a mini-step's objective differs from its window's."""
  for w, g in zip(np.asarray(window).ravel().tolist(), np.asarray(given).ravel().tolist()):
    if w != g:
      raise ValueError(
        f"objective={_describe_window(g)} differs from objective={_describe_window(w)}, the "
        "objective of the mini-steps already accumulated in this window of "
        "dualoptax.multi_steps; gradients of different objectives must not be averaged "
        "into one update: give every mini-step of a window the same objective"
      )


def _window_id(objective: Any) -> jax.Array:
  """The objective of one mini-step as an int32 scalar (range checked by the optimizer)."""
  if objective is None:
    return jnp.int32(_SCHEDULED)
  return jnp.asarray(objective).astype(jnp.int32)


def multi_steps(
  tx: optax.GradientTransformation,
  every_k_schedule: int | Callable[[jax.Array], jax.Array],
  **multi_steps_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """``optax.MultiSteps`` that accumulates gradients within one objective only.

  ``optax.MultiSteps`` averages ``every_k_schedule`` mini-steps' gradients and applies
  them in one update of ``tx`` under the ``objective=`` of the window's last mini-step:
  gradients of different objectives would be mixed silently. This wrapper remembers the
  objective of each window's first mini-step and raises ``ValueError`` (under ``jit``
  when the step runs, as for an unknown objective id) when a later mini-step of the same
  window gives another one. Passing no ``objective=`` lets the optimizer's schedule
  choose; the schedule only advances when a window's update is applied, so every
  mini-step of a window serves the same objective, namely
  ``dualoptax.scheduled_objective(state.multi_steps.gradient_step, objective_steps)``:
  compute that objective's loss.

  Args:
    tx: the optimizer, e.g. :func:`dualoptax.dualoptim_plus`.
    every_k_schedule: mini-steps per window: an int, or a function of the number of
      updates applied so far (as for ``optax.MultiSteps``).
    **multi_steps_kwargs: further arguments of ``optax.MultiSteps`` (``use_grad_mean``,
      ``should_skip_update_fn``, ``accumulator_dtype``).

  Returns:
    An optax transformation with :class:`MultiStepsObjectiveState`; ``update`` accepts
    ``objective=`` and passes it and any other extra arguments on to ``tx``.

  Example:
    >>> import jax.numpy as jnp, dualoptax
    >>> tx = dualoptax.multi_steps(dualoptax.dualoptim_plus(1e-3), every_k_schedule=2)
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> for _ in range(2):  # one window: two forget mini-steps, then the update
    ...   updates, state = tx.update({'w': jnp.ones(3)}, state, params, objective=0)
  """
  inner = optax.MultiSteps(tx, every_k_schedule, **multi_steps_kwargs)

  def init_fn(params):
    return MultiStepsObjectiveState(jnp.int32(_SCHEDULED), inner.init(params))

  def update_fn(updates, state, params=None, *, objective=None, **extra_args):
    if objective is not None:
      extra_args["objective"] = objective  # checked by `tx` before the window compares it
    updates, new_inner = inner.update(updates, state.multi_steps, params, **extra_args)
    given = _window_id(objective)
    first = state.multi_steps.mini_step == 0
    window = jnp.where(first, given, state.window_objective)
    check_on_host(window != given, _check_window_on_host, window, given)
    return updates, MultiStepsObjectiveState(window, new_inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
