"""Hyperparameters recorded in an optimizer's state, at zero bytes.

Readers of a state, such as the conflict diagnostics, need the decays and eps the
optimizer was built with; taking them again from the caller lets a mismatch give silently
wrong results. So the aliases record them in the state, as a pytree node with no leaves:
its values are static (part of the tree structure), so the record takes no bytes, jit
retraces for other values, and checkpoints hold the same arrays as before.

The record sits where the alias's weight-decay step kept its empty state, so the chain's
state keeps its layout (and orbax checkpoints their tree metadata). A value given as an
array (``optax.inject_hyperparams`` passes every numeric hyperparameter as one) is
recorded as None and read from the ``InjectHyperparamsState`` that holds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import optax

from dualoptax import _moments, _numerics

_INJECTED_STATES = tuple(
  getattr(optax, name)
  for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
  if hasattr(optax, name)
)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class HyperparameterRecord:
  """The hyperparameters of the transform whose state is ``state_type``.

  Attributes:
    state_type: the state class of the transform, e.g. ``ScaleByDualOptimPlusState``.
    values: ``(name, value)`` pairs; a value is a float, or None if it was an array.
  """

  state_type: type
  values: tuple[tuple[str, float | None], ...]


def make(state_type: type, **values: Any) -> HyperparameterRecord:
  """A record of ``values`` for the transform with state ``state_type``."""

  def static(value):
    if isinstance(value, jax.Array) or not _numerics.is_concrete_number(value):
      return None  # A traced or device value cannot be part of a tree structure.
    return float(value)

  return HyperparameterRecord(state_type, tuple((k, static(v)) for k, v in values.items()))


def attach(
  tx: optax.GradientTransformation, hyperparams: HyperparameterRecord
) -> optax.GradientTransformation:
  """``tx``, a transformation without state (``optax.EmptyState``), with ``hyperparams``
  as its state instead."""

  def init_fn(params):
    del params
    return hyperparams

  def update_fn(updates, state, params=None):
    updates, _ = tx.update(updates, optax.EmptyState(), params)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _records(tree: Any, injected: tuple[Mapping, ...] = ()) -> Iterator[tuple[Any, tuple]]:
  """Every record in ``tree``, with the hyperparameters of the injections above it
  (innermost first)."""
  stop = lambda x: isinstance(x, (HyperparameterRecord, *_INJECTED_STATES))
  for node in jax.tree.leaves(tree, is_leaf=stop):
    if isinstance(node, HyperparameterRecord):
      yield node, injected
    elif isinstance(node, _INJECTED_STATES):
      yield from _records(node.inner_state, (node.hyperparams, *injected))


def holds_record(opt_state: Any, state_type: type) -> bool:
  """Whether ``opt_state`` records hyperparameters for the transform with ``state_type``."""
  return any(r.state_type is state_type for r, _ in _records(opt_state))


def hyperparameters(opt_state: Any, state_type: type) -> dict[str, Any]:
  """The hyperparameters recorded for the transform with state ``state_type``.

  Args:
    opt_state: the state of a dualoptax alias, alone or inside any optax state (a chain,
      ``optax.inject_hyperparams``, ...), also as held by ``flax.nnx.Optimizer``.
    state_type: e.g. ``dualoptax.ScaleByDualOptimPlusState``, or
      ``optax.ScaleByAdamState`` for :func:`dualoptax.adamw`.

  Returns:
    ``{name: value}``: floats, or arrays for hyperparameters injected by
    ``optax.inject_hyperparams`` (traced under ``jax.jit``).

  Raises:
    ValueError: if ``opt_state`` holds no record for ``state_type`` (e.g. a chain built
      from ``scale_by_*`` transforms rather than an alias), or more than one, or a value
      was given as an array that no ``InjectHyperparamsState`` holds.

  Example:
    >>> import jax.numpy as jnp, dualoptax
    >>> state = dualoptax.dualoptim(1e-3, b2=0.99).init({'w': jnp.ones(2)})
    >>> dualoptax.hyperparameters(state, dualoptax.ScaleByDualOptimState)['b2']
    0.99
  """
  # An nnx.Optimizer's state holds injected hyperparameters in variables: read their values.
  opt_state = _moments.unwrap_variables(opt_state)
  found = [(r, inj) for r, inj in _records(opt_state) if r.state_type is state_type]
  if len(found) != 1:
    raise ValueError(
      f"expected exactly one record of the hyperparameters of a {state_type.__name__} in "
      f"the optimizer state, found {len(found)}; dualoptax's aliases record them"
    )
  hyperparams, injected = found[0]
  values = {}
  for name, value in hyperparams.values:
    if value is None:
      holders = [hps for hps in injected if name in hps]
      if not holders:
        raise ValueError(
          f"{name} of the {state_type.__name__} was given as an array, and no "
          "InjectHyperparamsState in the optimizer state holds it: pass a Python number"
        )
      value = holders[0][name]
    values[name] = value
  return values
