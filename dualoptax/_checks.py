"""Argument checks with messages that name the offending parameter, value or path."""

from __future__ import annotations

from typing import Any

import jax

from dualoptax import _numerics


def _reject_non_numbers(name: str, value: Any) -> None:
  """Strings, bools and None are not numbers (optax would fail on them only at update)."""
  if value is None or isinstance(value, (str, bytes, bool)):
    raise ValueError(f"{name} must be a number, got {name}={value!r}")


def check_decay(name: str, value: Any) -> None:
  """A decay rate (beta) must lie in [0, 1)."""
  _reject_non_numbers(name, value)
  if _numerics.is_concrete_number(value) and not 0.0 <= float(value) < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {name}={value!r}")


def check_non_negative(name: str, value: Any) -> None:
  """Learning rates, ratios, eps and weight decay must be finite and >= 0."""
  _reject_non_numbers(name, value)
  if callable(value) or not _numerics.is_concrete_number(value):
    return  # schedules and traced values are checked by whoever produces them
  as_float = float(value)
  if not as_float >= 0.0 or as_float == float("inf"):
    raise ValueError(f"{name} must be finite and >= 0, got {name}={value!r}")


def check_same_length(name: str, values: Any, expected: int, what: str) -> None:
  if len(values) != expected:
    raise ValueError(
      f"{name} must have one entry per objective ({expected}, {what}), got "
      f"{len(values)}: {tuple(values)!r}"
    )


def _describe(path: tuple[Any, ...]) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def check_tree_matches(updates: Any, reference: Any, what: str) -> None:
  """Raises ``ValueError`` naming the first path where ``updates`` and ``reference`` differ.

  ``reference`` is a state tree built from the parameters at ``init``; ``updates`` must
  have the same structure and leaf shapes.
  """
  upd = jax.tree_util.tree_flatten_with_path(updates)[0]
  ref = jax.tree_util.tree_flatten_with_path(reference)[0]
  upd_paths = {jax.tree_util.keystr(p): leaf for p, leaf in upd}
  ref_paths = {jax.tree_util.keystr(p): leaf for p, leaf in ref}
  missing = [p for p in ref_paths if p not in upd_paths]
  extra = [p for p in upd_paths if p not in ref_paths]
  if missing or extra:
    raise ValueError(
      f"the gradient tree does not match the {what} built at init: "
      f"missing paths {missing[:5] or 'none'}, unexpected paths {extra[:5] or 'none'}"
    )
  for path, leaf in upd:
    key = jax.tree_util.keystr(path)
    expected = ref_paths[key]
    if getattr(leaf, "shape", ()) != getattr(expected, "shape", ()):
      raise ValueError(
        f"the gradient at path {_describe(path)} has shape {leaf.shape}, but the "
        f"{what} was built at init for shape {expected.shape}"
      )
  if jax.tree.structure(updates) != jax.tree.structure(reference):
    raise ValueError(
      f"the gradient tree has the same paths as the {what} but a different container "
      f"structure: {jax.tree.structure(updates)} vs {jax.tree.structure(reference)}"
    )
