"""Small pytree helpers."""

from __future__ import annotations

from typing import Any

import jax


def unzip(tree_of_tuples: Any, like: Any, n: int) -> tuple[Any, ...]:
  """Splits a tree whose leaves (at the positions of ``like``'s leaves) are n-tuples.

  Returns n trees with the structure of ``like``. Used after a ``jax.tree.map`` whose
  function returns several values per leaf.
  """
  treedef = jax.tree.structure(like)
  leaves = treedef.flatten_up_to(tree_of_tuples)
  return tuple(treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(n))
