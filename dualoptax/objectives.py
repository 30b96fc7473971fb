"""Objectives and the alternating schedule that says which one a step serves.

Unlearning has two objectives, FORGET and RETAIN; multi-task learning may have any number
K. Objectives are identified by integers ``0 .. K-1``. A schedule of ``steps[k]`` steps
per objective, taken in order and repeated, assigns each step of a run to one objective:
with ``steps = (F_f, F_r)`` and ``s`` the 0-based step index,

    objective(s) = FORGET  if  s mod (F_f + F_r) < F_f  else RETAIN.

A caller may instead name the objective of a step through optax's extra-args mechanism:
``tx.update(grads, state, params, objective=RETAIN)``. The id may be a traced value under
``jax.jit``; one compiled step then serves every objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def _raise_unknown_objective(objective: Any, num_objectives: int) -> None:
  raise ValueError(
    f"objective={int(objective)} is not a valid objective id; expected an integer in "
    f"[0, {num_objectives}) (FORGET={FORGET}, RETAIN={RETAIN})"
  )


def checked_objective(objective: Any, num_objectives: int) -> jax.Array:
  """Returns ``objective`` as an int32 scalar after checking it names an objective.

  A concrete id out of range raises ``ValueError`` immediately. A traced id is checked
  when the step runs: an out-of-range value makes the computation fail with the same
  message (through a host callback that only fires on the bad value), rather than
  silently training some other objective.
  """
  if isinstance(objective, (str, bytes, bool)):
    raise ValueError(f"objective={objective!r} is not a valid objective id; expected an int")
  if _numerics.is_concrete_number(objective):
    as_float = float(objective)
    if as_float != int(as_float) or not 0 <= as_float < num_objectives:
      raise ValueError(
        f"objective={objective!r} is not a valid objective id; expected an integer in "
        f"[0, {num_objectives}) (FORGET={FORGET}, RETAIN={RETAIN})"
      )
    return jnp.int32(int(as_float))
  objective = jnp.asarray(objective)
  if objective.shape != () or not jnp.issubdtype(objective.dtype, jnp.integer):
    raise ValueError(
      f"objective must be an integer scalar, got shape {objective.shape} and dtype "
      f"{objective.dtype}"
    )
  objective = objective.astype(jnp.int32)
  invalid = (objective < 0) | (objective >= num_objectives)
  jax.lax.cond(
    invalid,
    lambda: jax.debug.callback(_raise_unknown_objective, objective, num_objectives),
    lambda: None,
  )
  return objective


def active_objective(step: jax.Array, objective: Any, objective_steps: Sequence[Any]) -> jax.Array:
  """The objective a step serves: ``objective`` if given, else the schedule's choice."""
  if objective is None:
    return scheduled_objective(step, objective_steps)
  return checked_objective(objective, len(objective_steps))
