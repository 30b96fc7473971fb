"""Where an optimizer state goes when its parameters are sharded over a device mesh.

:func:`state_shardings` maps the parameters' shardings to the state's:

* a moment follows its parameter: the same ``PartitionSpec``, with the per-objective axis
  of a stacked moment ``(K, *shape)`` replicated in front; 8-bit codes likewise;
* an 8-bit moment's per-block absmax ``(blocks,)`` or ``(K, blocks)`` is split along its
  blocks over the mesh axes that shard its parameter, so FSDP divides the whole moment
  and not just its codes;
* the code tables of 8-bit states belong to no parameter: they are split over the mesh
  axes that shard any parameter;
* everything else (step counters, injected hyperparameters) is replicated.

A split that the mesh axes do not divide is replicated instead. Moments are found by
structure, not by name: any part of the state with the parameters' tree structure (an
8-bit moment counting as one leaf) holds one entry per parameter, as every dualoptax and
optax state does (e.g. ``optax.ScaleByAdamState.mu``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dualoptax import _moments


def _is_spec(x: Any) -> bool:
  return isinstance(x, (NamedSharding, P))


def _mesh_axes(spec: P) -> tuple[str, ...]:
  """The mesh axes that ``spec`` shards over, in order."""
  axes: list[str] = []
  for entry in spec:
    if entry is None or entry is P.UNCONSTRAINED:
      continue
    for axis in entry if isinstance(entry, tuple) else (entry,):
      if axis not in axes:
        axes.append(axis)
  return tuple(axes)


def _split_last(shape: tuple[int, ...], axes: tuple[str, ...], sizes: Mapping[str, int]) -> P:
  """Splits the last dimension of ``shape`` over ``axes`` if they divide it."""
  if not shape or not axes or shape[-1] % math.prod(sizes[a] for a in axes):
    return P()
  return P(*[None] * (len(shape) - 1), axes[0] if len(axes) == 1 else axes)


def _moment_spec(moment: Any, shape: tuple[int, ...], spec: P, sizes: Mapping[str, int]) -> Any:
  """The placement of one parameter's moment (a spec, or an 8-bit moment of specs)."""
  if _moments.is_8bit(moment):
    codes = spec if tuple(moment.codes.shape) == shape else P(None, *spec)
    absmax = _split_last(tuple(moment.absmax.shape), _mesh_axes(spec), sizes)
    return dataclasses.replace(moment, codes=codes, absmax=absmax)
  if not hasattr(moment, "shape"):
    return moment  # No arrays (e.g. optax.MaskedNode).
  if tuple(moment.shape) == shape:
    return spec
  if tuple(moment.shape[1:]) == shape:  # stacked per objective
    return P(None, *spec)
  return P()


def _specs_and_mesh(param_shardings: Any, mesh: Any) -> tuple[list[P], Any, bool]:
  """The parameters' PartitionSpecs, the mesh, and whether NamedShardings were given."""
  leaves = jax.tree.leaves(param_shardings, is_leaf=_is_spec)
  if not all(_is_spec(s) for s in leaves):
    raise ValueError("param_shardings must hold a NamedSharding or PartitionSpec per parameter")
  named = [s for s in leaves if isinstance(s, NamedSharding)]
  if named and len(named) != len(leaves):
    raise ValueError("param_shardings mixes NamedShardings and PartitionSpecs")
  if mesh is None:
    if not named:
      raise ValueError("pass mesh= to place a state from PartitionSpecs")
    mesh = named[0].mesh
  return [s.spec if isinstance(s, NamedSharding) else s for s in leaves], mesh, bool(named)


def _wrap_like(placed: Any, like: Any) -> Any:
  """``placed`` (a tree like ``like`` with its variables unwrapped) with each variable of
  ``like`` around its entry again."""
  leaves, treedef = jax.tree.flatten(like, is_leaf=_moments._is_variable)
  entries = treedef.flatten_up_to(placed)
  wrap = lambda leaf, entry: _moments._variable_value(leaf)[1].unflatten([entry])
  return treedef.unflatten(
    [wrap(leaf, e) if _moments._is_variable(leaf) else e for leaf, e in zip(leaves, entries)]
  )


def state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Any = None) -> Any:
  """Shardings for an optimizer state whose parameters are sharded as given.

  See the module docstring for the rules.

  Args:
    opt_state: the state, or its abstract form (e.g. from ``jax.eval_shape(tx.init,
      params)``), of any optax optimizer; dualoptax's 8-bit moments are placed too.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``), as given to ``init``;
      variables around them (``nnx.State`` of ``nnx.Param``) are read as their values.
    param_shardings: one ``NamedSharding`` or ``PartitionSpec`` per parameter, in the
      parameters' leaf order (typically a tree like ``params``).
    mesh: the mesh, for the axis sizes; only needed with PartitionSpecs.

  Returns:
    A tree like ``opt_state`` of ``NamedSharding`` (or ``PartitionSpec`` when given
    those), ready for ``jax.device_put`` or ``jax.jit(out_shardings=...)``.

  Example:
    >>> import jax, jax.numpy as jnp, dualoptax
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ('fsdp',))
    >>> params = {'w': jnp.ones((64, 64))}
    >>> state = dualoptax.dualoptim_plus(1e-3, state_bits=8).init(params)
    >>> specs = dualoptax.state_shardings(state, params, {'w': P('fsdp', None)}, mesh)
    >>> delta_mu = dualoptax.find_state(specs, dualoptax.ScaleByDualOptimPlusState).delta_mu
    >>> delta_mu['w'].codes, delta_mu['w'].absmax  # (K, 64, 64) codes, (K, 16) absmax
    (P(None, 'fsdp', None), P(None, 'fsdp'))
  """
  specs, mesh, named = _specs_and_mesh(param_shardings, mesh)
  like = opt_state
  # Variables (e.g. nnx.Param around parameters and moments) are read as their values;
  # the result wraps each spec in its variable again, so that it matches ``opt_state``.
  opt_state, params = _moments.unwrap_variables((opt_state, params))
  treedef = jax.tree.structure(params)
  if len(specs) != treedef.num_leaves:
    raise ValueError(
      f"param_shardings holds {len(specs)} shardings for {treedef.num_leaves} parameters"
    )
  shapes = [tuple(p.shape) for p in jax.tree.leaves(params)]
  sizes = dict(mesh.shape)
  table_axes = tuple(dict.fromkeys(a for spec in specs for a in _mesh_axes(spec)))

  def per_parameter(node: Any) -> list[Any] | None:
    """``node``'s entries, one per parameter, if it has the parameters' structure."""
    try:
      entries = treedef.flatten_up_to(node)
    except (ValueError, TypeError):
      return None
    ok = all(_moments.is_8bit(e) or hasattr(e, "shape") or not jax.tree.leaves(e) for e in entries)
    return entries if ok else None

  def is_unit(node: Any) -> bool:
    return isinstance(node, _moments.StateTables) or per_parameter(node) is not None

  def place(node: Any) -> Any:
    if isinstance(node, _moments.StateTables):
      return jax.tree.map(lambda t: _split_last(tuple(t.shape), table_axes, sizes), node)
    entries = per_parameter(node)
    if entries is None:
      return P()
    placed = [_moment_spec(m, s, spec, sizes) for m, s, spec in zip(entries, shapes, specs)]
    return treedef.unflatten(placed)

  placed = _wrap_like(jax.tree.map(place, opt_state, is_leaf=is_unit), like)
  if not named:
    return placed
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), placed, is_leaf=_is_spec)
