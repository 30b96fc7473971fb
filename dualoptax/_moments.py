"""Moment storage: float32 arrays or 8-bit :class:`~dualoptax.quantization.QuantizedArray`.

The optimizers compute in float32 and never care how a moment is stored. These helpers
read a moment (dequantizing if needed) and write a new value back in the same storage
(re-quantizing with fresh absmax). Per-objective moments are stacked on a leading axis of
size K; ``load_row``/``store_row`` touch only one row, so the other objectives' moments
are neither read nor re-quantized. :func:`update_leaf` runs a transform's elementwise
maths (a :class:`LeafRule`) on one parameter's moments, by the chunk loop
(:func:`update_quantized`) or by whole-array operations.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dualoptax import _numerics, quantization

Moment = jax.Array | quantization.QuantizedArray

# The chunk loop addresses codes with int32 offsets (JAX's default integer width).
_MAX_LOOP_CODES = 2**31


class StateTables(NamedTuple):
  """Code tables of the 8-bit states, carried in the optimizer state so that jitted
  steps receive them as arguments rather than embedded constants."""

  signed: quantization.QuantizationTables  # first moments and delta second moments
  unsigned: quantization.QuantizationTables  # second moments that cannot go negative


@dataclasses.dataclass(frozen=True, kw_only=True)
class MomentStorage:
  """How an optimizer stores its moments: float32 (or ``dtype``) arrays, or 8-bit codes.

  Example:
    >>> import dualoptax
    >>> storage = dualoptax.MomentStorage(state_bits=8, min_8bit_size=1024)
    >>> tx = dualoptax.dualoptim_plus(1e-3, storage=storage)

  Attributes:
    state_bits: 32 (float32 states) or 8 (block-wise quantized states).
    block_size: values per quantization block (one float32 absmax each).
    min_8bit_size: leaves with fewer elements keep float32 states.
    keep_fp32: optional tree of bools like the params (or a function of the params
      returning one); True leaves keep float32 states, e.g. embeddings.
    dtype: dtype of the unquantized states (None: float32).
    quantize_base: with 8-bit states, whether DualOptim+'s base moments ``B, V`` are
      quantized (DualOptim has no base and accepts only True).
    quantize_deltas: with 8-bit states, whether DualOptim+'s delta moments ``D, E`` are
      quantized (DualOptim has no deltas and accepts only True).
    update_in_chunks: how a leaf whose moments are all 8-bit is rewritten (on the same
      devices the two forms give bit-identical results; tests/dualoptax/test_8bit.py).
      True: a sequential loop over cache-sized chunks that rewrites the codes in place
      (:func:`update_quantized`), the fastest form on one CPU device. False: whole-array
      operations, which XLA partitions shard by shard when the states are sharded over
      several devices (it partitions the loop by gathering the whole sharded state in
      every iteration: measured 14x slower on two CPU devices) and which suit GPUs and
      TPUs. None: chunks when the program runs on a CPU backend with a single device,
      whole arrays otherwise. On a mesh with explicit axes (``jax.make_mesh``'s default)
      the moments keep their shardings either way; on automatic axes the loop's results
      go where XLA puts them (replicated) unless the step's ``out_shardings`` say
      otherwise (e.g. :func:`dualoptax.state_shardings`).

  Moments are created where their parameters are: a parameter on a mesh gives its
  moments its sharding (8-bit codes too; absmax split along its blocks), as
  :func:`dualoptax.state_shardings` places them.
  """

  state_bits: int = 32
  block_size: int = quantization.DEFAULT_BLOCK_SIZE
  min_8bit_size: int = 4096
  keep_fp32: Any | Callable[[Any], Any] | None = None
  dtype: Any = None
  quantize_base: bool = True
  quantize_deltas: bool = True
  update_in_chunks: bool | None = None

  def __post_init__(self):
    # Under `optax.inject_hyperparams` the alias's `state_bits` arrives as an array:
    # concrete at init (the only place it is used) it becomes an int again; traced at
    # update it goes unused.
    if _numerics.is_concrete_number(self.state_bits) and self.state_bits not in (8, 32):
      raise ValueError(f"state_bits must be 8 or 32, got state_bits={self.state_bits!r}")
    for name, minimum in (("state_bits", 8), ("min_8bit_size", 0), ("block_size", 1)):
      value = getattr(self, name)
      if not _numerics.is_concrete_number(value):
        continue
      if float(value) != int(float(value)) or int(float(value)) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
      object.__setattr__(self, name, int(float(value)))
    for name in ("quantize_base", "quantize_deltas"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be True or False, got {name}={getattr(self, name)!r}")
    if self.update_in_chunks is not None and not isinstance(self.update_in_chunks, bool):
      raise ValueError(
        "update_in_chunks must be True, False or None, got "
        f"update_in_chunks={self.update_in_chunks!r}"
      )

  @property
  def quantized(self) -> bool:
    return self.state_bits == 8

  def chunked(self, moments: Sequence[Moment]) -> bool:
    """Whether the chunk loop rewrites a leaf with these moments (decided at trace time;
    see ``update_in_chunks``): all of them 8-bit and small enough for the loop's int32
    offsets (a stacked moment of 2**31 codes or more takes the whole-array update)."""
    if not all(is_8bit(m) for m in moments):
      return False
    if any(m.size >= _MAX_LOOP_CODES for m in moments):
      return False
    if self.update_in_chunks is not None:
      return self.update_in_chunks
    return jax.default_backend() == "cpu" and jax.device_count() == 1

  def tables(self) -> StateTables | None:
    """Code tables for a new state (None for float32 states)."""
    if not self.quantized:
      return None
    # Fresh device arrays for every state: a state is donated to jitted steps, which
    # deletes its buffers, so states must never share the (cached) tables.
    fresh = lambda signed: quantization.QuantizationTables(
      *(jnp.array(t) for t in quantization.numpy_tables(signed))
    )
    return StateTables(fresh(True), fresh(False))

  def _quantized_leaves(self, params: Any) -> Any:
    """Tree of bools like ``params``: True where the states are quantized."""
    if not self.quantized:
      return jax.tree.map(lambda _: False, params)
    keep = self.keep_fp32(params) if callable(self.keep_fp32) else self.keep_fp32
    if keep is None:
      keep = jax.tree.map(lambda _: False, params)
    return jax.tree.map(
      lambda p, k: bool(jnp.size(p) >= self.min_8bit_size and not k), params, keep
    )

  def zeros(
    self, param: jax.Array, quantize: bool, signed: bool, num_objectives: int | None = None
  ) -> Moment:
    """A zero moment for ``param``, stacked K times when ``num_objectives`` is given."""
    lead = () if num_objectives is None else (num_objectives,)
    shape = lead + tuple(jnp.shape(param))
    sharding = _split_sharding(param)
    if not quantize:
      return _zeros(shape, self.dtype or jnp.float32, sharding, lead)
    blocks = quantization.num_blocks(int(jnp.size(param)), self.block_size)
    absmax_sharding = None
    if sharding is not None:
      absmax_sharding = quantization._blocks_sharding(sharding, blocks)
    return quantization.QuantizedArray(
      codes=_zeros(shape, jnp.uint8, sharding, lead),
      absmax=_zeros(lead + (blocks,), jnp.float32, absmax_sharding, lead),
      block_size=self.block_size,
      signed=signed,
    )

  def zeros_like(
    self, params: Any, quantize: bool, signed: bool, num_objectives: int | None = None
  ) -> Any:
    """Zero moments like ``params`` (stacked K times if ``num_objectives``); 8-bit where
    ``quantize`` and the leaf qualifies, with the ``signed`` (or unsigned) map.

    Each moment takes its parameter's sharding (as ``jnp.zeros_like`` does). Of a
    parameter wrapped in a variable (``flax.nnx.Param``), only moments of its shape keep
    the variable (see :func:`strip_foreign_variables`).
    """
    which = self._quantized_leaves(params)
    moments = jax.tree.map(
      lambda p, q: self.zeros(p, quantize and q, signed, num_objectives), params, which
    )
    return strip_foreign_variables(moments, params)


def _split_sharding(param: Any) -> Any:
  """``param``'s ``NamedSharding``, for its moments to follow, or None (default placement).

  Concrete arrays on a mesh tell their sharding; under ``jit`` only arrays split over
  explicit mesh axes carry it in their type (elsewhere XLA chooses where moments go).
  """
  if isinstance(param, jax.core.Tracer):
    if not quantization.explicit_mesh_axes(param):
      return None
    sharding = quantization.type_sharding(param)
  else:
    sharding = getattr(param, "sharding", None)
  return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: Any, lead: tuple[int, ...]) -> jax.Array:
  """Zeros placed by ``sharding`` (a parameter's, or None: the default device), with the
  per-objective axis of a stacked moment (``lead``) replicated in front."""
  if sharding is None:
    return jnp.zeros(shape, dtype)
  spec = jax.sharding.PartitionSpec(*[None] * len(lead), *sharding.spec)
  placed = jax.sharding.NamedSharding(sharding.mesh, spec)
  if isinstance(sharding.mesh, jax.sharding.AbstractMesh):  # Traced (explicit axes).
    return jnp.zeros(shape, dtype, out_sharding=placed)
  return jnp.zeros(shape, dtype, device=placed)


def contraction_guard(count: jax.Array) -> jax.Array:
  """An int32 zero the compiler cannot see through, for :func:`rounded`.

  Args:
    count: a traced non-negative int32 scalar (a step counter of the state).

  Returns:
    ``min(count, 0)``: always 0, but known only at run time.
  """
  return jnp.minimum(count.astype(jnp.int32), 0)


def rounded(product: jax.Array, guard: jax.Array | None) -> jax.Array:
  """``product`` rounded to float32 on its own: never fused into a following add.

  XLA:CPU lets LLVM contract a multiply that feeds an add into one fused multiply-add
  (one rounding instead of two) when, inside the fusion at hand, the multiply has no other
  user. XLA freely recomputes an elementwise value in several fusions (e.g. a new 8-bit
  moment for its block absmax and again for its codes), with different users in each, so
  one expression could round differently from one fusion to the next. XORing the bits
  with ``guard`` (a zero unknown to the compiler, :func:`contraction_guard`) makes the
  multiply's only user an integer operation, so every fusion rounds it alike.

  Args:
    product: float32 array, typically a product.
    guard: int32 zero from :func:`contraction_guard`, or None to leave ``product`` free
      to contract (float32 moments, whose expressions XLA computes once).

  Returns:
    ``product``, bit for bit.
  """
  if guard is None:
    return product
  bits = jax.lax.bitcast_convert_type(product, jnp.int32)
  return jax.lax.bitcast_convert_type(bits ^ guard, jnp.float32)


def is_8bit(x: Any) -> bool:
  """Whether ``x`` is an 8-bit moment (a :class:`~dualoptax.quantization.QuantizedArray`).

  Pass as ``is_leaf`` to treat an 8-bit moment as one leaf in ``jax.tree`` functions.
  """
  return isinstance(x, quantization.QuantizedArray)


def _is_variable(x: Any) -> bool:
  """Whether ``x`` is a variable: a pytree node holding exactly one value, with a ``value``
  or ``get_value`` attribute, such as ``flax.nnx.Variable`` (recognised by its shape, so
  that dualoptax does not import flax)."""
  if x is None or is_8bit(x) or isinstance(x, (Mapping, tuple, list, jax.Array)):
    return False
  if not (hasattr(type(x), "get_value") or hasattr(type(x), "value")):
    return False
  if jax.tree_util.all_leaves([x]):
    return False  # Not a pytree node (e.g. an enum member, whose ``value`` is data).
  children, _ = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
  return len(children) == 1


def _variable_value(x: Any) -> tuple[Any, Any]:
  """``(value, treedef)`` of a variable; ``treedef.unflatten([v])`` wraps ``v`` alike."""
  children, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
  return children[0], treedef


def unwrap_variables(tree: Any) -> Any:
  """``tree`` with every variable (e.g. the ``nnx.OptArray`` and ``nnx.OptVariable`` of
  an ``nnx.Optimizer``'s state) replaced by the value it holds."""
  unwrap = lambda x: _variable_value(x)[0] if _is_variable(x) else x
  return jax.tree.map(unwrap, tree, is_leaf=lambda x: _is_variable(x) or is_8bit(x))


def _wrapped(variable: Any, value: Any) -> Any:
  """``value`` in a variable like ``variable`` (same type and metadata)."""
  return _variable_value(variable)[1].unflatten([value])


def _entries(tree: Any, like: Any) -> tuple[list[Any], list[Any], Any] | None:
  """``like``'s leaves (its variables as leaves), ``tree``'s entries at their positions
  and the structure; None if ``tree`` does not have ``like``'s structure."""
  leaves, treedef = jax.tree.flatten(like, is_leaf=_is_variable)
  try:
    return leaves, treedef.flatten_up_to(tree), treedef
  except (ValueError, TypeError):
    return None


def strip_foreign_variables(moments: Any, params: Any) -> Any:
  """``moments`` (from ``jax.tree.map`` over ``params``) with a parameter's variable kept
  only around arrays of the parameter's shape.

  ``jax.tree.map`` over parameters wrapped in variables (``nnx.state(model)``) puts each
  moment in its parameter's variable, metadata included. Such metadata (e.g. a sharding
  annotation) describes arrays of the parameter's shape, which stacked moments
  ``(K, *shape)`` and per-block absmax are not: Flax would place them by it. And
  ``nnx.Optimizer`` would hold an 8-bit moment as the value of one ``OptVariable``, which
  ``nnx.update`` replaces by an ``nnx.State`` of its leaves, losing the
  ``QuantizedArray``. So an 8-bit moment becomes ``QuantizedArray(variable(codes),
  absmax)`` (codes of the parameter's shape) or bare, and a stacked moment bare; updates
  wrap them again where the gradients have variables (:func:`align_with_updates`).
  """
  found = _entries(moments, params)
  if found is None:
    return moments
  leaves, entries, treedef = found

  def strip(param, moment):
    if not _is_variable(param) or not _is_variable(moment):
      return moment
    shape = tuple(jnp.shape(_variable_value(param)[0]))
    value = _variable_value(moment)[0]
    if is_8bit(value):
      if tuple(value.codes.shape) != shape:
        return value
      return dataclasses.replace(value, codes=_wrapped(moment, value.codes))
    return moment if tuple(jnp.shape(value)) == shape else value

  return treedef.unflatten([strip(p, m) for p, m in zip(leaves, entries)])


def align_with_updates(moments: Any, updates: Any) -> Any:
  """``moments`` with the structure of ``updates``: an entry is put in its update's
  variable where the update has one and the entry not (an 8-bit moment whose codes are
  in a variable goes in that variable whole). Unchanged if the structures differ."""
  found = _entries(moments, updates)
  if found is None:
    return moments
  leaves, entries, treedef = found

  def align(update, moment):
    if not _is_variable(update) or _is_variable(moment):
      return moment
    if is_8bit(moment) and _is_variable(moment.codes):
      codes = moment.codes
      return _wrapped(codes, dataclasses.replace(moment, codes=_variable_value(codes)[0]))
    return _wrapped(update, moment)

  return treedef.unflatten([align(u, m) for u, m in zip(leaves, entries)])


def unalign(new: Any, old: Any, updates: Any) -> Any:
  """New moments (aligned with ``updates``) back in the layout of the ``old`` ones, so
  that a state keeps its structure from step to step."""
  found = _entries(old, updates)
  if found is None:
    return new
  _, olds, treedef = found

  def back(old, new):
    if _is_variable(old) or not _is_variable(new):
      return new
    value = _variable_value(new)[0]
    if is_8bit(old) and _is_variable(old.codes):
      return dataclasses.replace(value, codes=_wrapped(old.codes, value.codes))
    return value

  return treedef.unflatten([back(o, n) for o, n in zip(olds, treedef.flatten_up_to(new))])


def param_shapes(moments: Any, stacked: bool = False) -> Any:
  """Shapes of the parameters ``moments`` were built for (rows of stacked moments), with
  8-bit moments as single leaves, to check incoming updates against."""

  def shape_of(m):
    shape = m.codes.shape if is_8bit(m) else m.shape
    return jax.ShapeDtypeStruct(shape[1:] if stacked else shape, jnp.float32)

  return jax.tree.map(shape_of, moments, is_leaf=is_8bit)


def _table(tables: StateTables | None, q: quantization.QuantizedArray):
  return tables.signed if q.signed else tables.unsigned


def load(stored: Moment, tables: StateTables | None, stacked: bool = False) -> jax.Array:
  """The moment as float32; a ``stacked`` 8-bit moment row by row (each row has blocks
  of its own)."""
  if not is_8bit(stored):
    return stored.astype(jnp.float32)
  table = _table(tables, stored)
  if stacked:
    dequantize = functools.partial(
      quantization.dequantize_blockwise, tables=table, block_size=stored.block_size
    )
    return jax.vmap(dequantize)(stored.codes, stored.absmax)
  return stored.dequantize(table)


def store(value: jax.Array, like: Moment, tables: StateTables | None) -> Moment:
  """``value`` in the storage of ``like`` (re-quantized with fresh absmax if 8-bit)."""
  if is_8bit(like):
    return quantization.QuantizedArray.quantize(
      value, _table(tables, like), block_size=like.block_size, signed=like.signed
    )
  return value.astype(like.dtype)


def _index(stacked: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(stacked, index, axis=0, keepdims=False)


def _update(stacked: jax.Array, row: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(stacked, row.astype(stacked.dtype), index, 0)


def load_row(stacked: Moment, index: jax.Array, tables: StateTables | None) -> jax.Array:
  """Row ``index`` of a stacked (K, ...) moment, as float32."""
  if is_8bit(stacked):
    row = dataclasses.replace(
      stacked, codes=_index(stacked.codes, index), absmax=_index(stacked.absmax, index)
    )
    return load(row, tables)
  return _index(stacked, index).astype(jnp.float32)


def store_row(
  stacked: Moment, value: jax.Array, index: jax.Array, tables: StateTables | None
) -> Moment:
  """``stacked`` with row ``index`` replaced by ``value``; other rows untouched."""
  if is_8bit(stacked):
    row = quantization.QuantizedArray.quantize(
      value, _table(tables, stacked), block_size=stacked.block_size, signed=stacked.signed
    )
    return dataclasses.replace(
      stacked,
      codes=_update(stacked.codes, row.codes, index),
      absmax=_update(stacked.absmax, row.absmax, index),
    )
  return _update(stacked, value, index)


def _row_mask(stacked: jax.Array, index: jax.Array) -> jax.Array:
  """Boolean (K, 1, ..., 1), True at row ``index``."""
  num = stacked.shape[0]
  return (jnp.arange(num, dtype=jnp.int32) == index).reshape((num,) + (1,) * (stacked.ndim - 1))


def update_row(
  stacked: Moment,
  update: Callable[[jax.Array], jax.Array],
  index: jax.Array,
  tables: StateTables | None,
) -> tuple[Moment, jax.Array]:
  """Replaces row ``index`` of ``stacked`` by ``update(row)``; returns (stack, new row).

  ``update`` must be elementwise (it may broadcast against operands shaped like one row).
  For float32 storage the update is written as ONE select over the whole stack, and the
  new row is read back from the result: the old stack then has no reader but its own
  update, so XLA rewrites the donated buffer in place. (Reading the old row with a dynamic
  slice and writing it with a dynamic update slice makes XLA:CPU copy every stacked
  moment twice per step, and run the update single-threaded.) Every row is computed but
  only row ``index`` changes; the cost is one pass over all K rows.
  """
  if is_8bit(stacked) or stacked.dtype != jnp.float32:
    value = update(load_row(stacked, index, tables))
    return store_row(stacked, value, index, tables), value
  new = jnp.where(_row_mask(stacked, index), update(stacked), stacked)
  return new, _index(new, index)


class LeafRule(NamedTuple):
  """The elementwise maths of one transform, for :func:`update_leaf`.

  A parameter has several moments; ``stacked`` ones hold one row per objective, of which
  only the active row changes. Every function is pure and elementwise, so that it serves
  whole arrays and the chunks of the 8-bit loop alike. Each receives the step's scalar
  ``coefficients`` and, where it rounds products, ``guard`` (see :func:`rounded`; None
  when no moment of the parameter is 8-bit).
  """

  stacked: tuple[bool, ...]  # per moment: whether it is stacked per objective
  # (coefficients, guard, g, *old unstacked moments) -> what the new moments share.
  context: Callable[..., Any]
  # Per moment: (coefficients, guard, context, old value) -> new value.
  moments: tuple[Callable[..., jax.Array], ...]
  # (coefficients, context, *new values) -> the update direction.
  direction: Callable[..., jax.Array]


def _rule_step(rule: LeafRule, coefficients: Any, guard: jax.Array | None, g, *olds):
  """``rule`` on the old values of all moments: ``(new values, (direction,))``."""
  unstacked = [old for old, stacked in zip(olds, rule.stacked) if not stacked]
  context = rule.context(coefficients, guard, g, *unstacked)
  news = [new(coefficients, guard, context, old) for new, old in zip(rule.moments, olds)]
  return news, (rule.direction(coefficients, context, *news),)


def _update_whole(
  rule: LeafRule,
  coefficients: Any,
  guard: jax.Array | None,
  g: jax.Array,
  moments: Sequence[Moment],
  active: jax.Array,
  tables: StateTables | None,
) -> tuple[jax.Array, list[Moment]]:
  """:func:`update_leaf` by whole-array operations; stacked moments by :func:`update_row`."""
  unstacked = [load(m, tables) for m, stacked in zip(moments, rule.stacked) if not stacked]
  context = rule.context(coefficients, guard, g, *unstacked)
  olds = iter(unstacked)
  new_moments, values = [], []
  for moment, stacked, update in zip(moments, rule.stacked, rule.moments):
    new = functools.partial(update, coefficients, guard, context)
    if stacked:
      moment, value = update_row(moment, new, active, tables)
    else:
      value = new(next(olds))
      moment = store(value, moment, tables)
    new_moments.append(moment)
    values.append(value)
  return rule.direction(coefficients, context, *values), new_moments


def update_leaf(
  rule: LeafRule,
  coefficients: Any,
  g: jax.Array,
  moments: Sequence[Moment],
  *,
  active: jax.Array,
  storage: MomentStorage,
  tables: StateTables | None,
  guard: jax.Array,
) -> tuple[jax.Array, ...]:
  """One parameter's step: its update direction and its new moments.

  The chunk loop (:func:`update_quantized`) when ``storage.chunked(moments)``, whole-array
  operations otherwise; both evaluate ``rule`` alike, so they give the same bits. When any
  moment is 8-bit, products are :func:`rounded` (``guard``) so that XLA rounds a new
  moment alike wherever it recomputes it; float32 moments leave XLA free to contract.

  Args:
    rule: the transform's maths.
    coefficients: the step's scalars, passed to every function of ``rule``.
    g: the parameter's gradient.
    moments: its moments, in the order of ``rule.moments``.
    active: int32 scalar, the row of the stacked moments to update.
    storage: how the moments are stored.
    tables: code tables of 8-bit moments.
    guard: int32 zero from :func:`contraction_guard`.

  Returns:
    ``(direction, *new moments)``, the direction in ``g``'s dtype. On a mesh with
    explicit axes the direction takes ``g``'s sharding and every moment keeps its own
    (the leaf is updated with those axes automatic: see
    :func:`~dualoptax.quantization.call_with_auto_axes`).
  """

  def update(coefficients, g, moments, active, tables, guard):
    return _update_leaf(rule, coefficients, g, moments, active, storage, tables, guard)

  def out_sharding():  # On explicit axes: the direction like g, moments as they were.
    return quantization.type_sharding(g), *(
      jax.tree.map(quantization.type_sharding, m) for m in moments
    )

  args = (coefficients, g, tuple(moments), active, tables, guard)
  return quantization.call_with_auto_axes(update, args, out_sharding)


def _update_leaf(
  rule: LeafRule,
  coefficients: Any,
  g: jax.Array,
  moments: Sequence[Moment],
  active: jax.Array,
  storage: MomentStorage,
  tables: StateTables | None,
  guard: jax.Array,
) -> tuple[jax.Array, ...]:
  """:func:`update_leaf` (on automatic or no mesh axes)."""
  g32 = g.astype(jnp.float32)
  rounding = guard if any(is_8bit(m) for m in moments) else None
  if storage.chunked(moments):
    step = functools.partial(_rule_step, rule, coefficients, rounding)
    rows = [active if stacked else None for stacked in rule.stacked]
    moments, (direction,) = update_quantized(
      step, g32, moments, rows, tables, guard, output_dtypes=(g.dtype,)
    )
  else:
    direction, moments = _update_whole(rule, coefficients, rounding, g32, moments, active, tables)
  return (direction.astype(g.dtype), *moments)


# Values per chunk of the 8-bit update loop (a multiple of every usual block size). Each
# iteration materializes a few arrays of this size per moment (dequantized and new values,
# lookup indices): ~0.5 MiB for four moments, which stays in the core's L2 cache. Measured
# on the project's 2-core machine, 2**13-2**14 ran best; 2**16 about 15 % slower, 2**18
# about 35 % (cache misses), while smaller chunks pay XLA's per-kernel overhead more often.
UPDATE_CHUNK_SIZE = 1 << 14


class _FlatMoment(NamedTuple):
  """One quantized moment (a single row of a stacked one) seen as flat arrays."""

  codes: jax.Array  # uint8 (K * n,) or (n,)
  absmax: jax.Array  # float32 (K * blocks,) or (blocks,)
  code_offset: jax.Array  # first code of the row
  block_offset: jax.Array  # first absmax of the row


def _flatten(
  q: quantization.QuantizedArray, row: jax.Array | None, size: int, blocks: int
) -> _FlatMoment:
  row = jnp.zeros([], jnp.int32) if row is None else jnp.asarray(row, jnp.int32)
  return _FlatMoment(q.codes.reshape(-1), q.absmax.reshape(-1), row * size, row * blocks)


class _Scratch(NamedTuple):
  """Loop-carried buffers that values of one chunk are written to and read back from."""

  values: jax.Array  # float32 (moments * chunk + 1,): the new moment values
  lookup: jax.Array  # int32 (moments * chunk + 1,): where their codes are in the table

  @classmethod
  def create(cls, moments: int, chunk_size: int) -> _Scratch:
    size = moments * chunk_size + 1
    return cls(jnp.zeros((size,), jnp.float32), jnp.zeros((size,), jnp.int32))


def _through_memory(
  rows: Sequence[jax.Array] | jax.Array, buffer: jax.Array, guard: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``jnp.stack(rows)``, computed into ``buffer`` and read back from it.

  ``rows`` is a list of equal-length vectors (written one by one) or one 2-D array
  (written at once).

  XLA:CPU fuses an elementwise value into each of its consumers and recomputes it there,
  and it cannot vectorize a loop that contains a gather. Written to memory at an offset
  XLA cannot see is 0 (``guard``; the buffer is one element longer than the rows, so the
  write is not a whole-buffer overwrite, which XLA would drop) and read back from offset
  0, the rows are computed once, by vectorized loops of their own, and their consumers
  (e.g. the code lookup) only load them.

  Returns:
    ``(stacked rows, updated buffer)``.
  """
  width = rows[0].shape[0]
  if isinstance(rows, jax.Array):
    buffer = jax.lax.dynamic_update_slice(buffer, rows.reshape(-1), (guard,))
  else:
    for i, row in enumerate(rows):
      buffer = jax.lax.dynamic_update_slice(buffer, row, (guard + i * width,))
  # Read back at the true offset 0, which XLA cannot know is where the rows went.
  return buffer[: len(rows) * width].reshape(len(rows), width), buffer


def _update_chunk(
  step: Callable,
  g: jax.Array,
  like: Sequence[quantization.QuantizedArray],
  tables: StateTables,
  guard: jax.Array,
  carry: tuple,
  start: Any,
  size: int,
) -> tuple:
  """Runs ``step`` on values [start, start + size) and writes back its results."""
  flats, outputs, scratch = carry
  block_size = like[0].block_size
  first_block = start // block_size
  chunk_blocks = quantization.num_blocks(size, block_size)
  olds = []
  for flat, q in zip(flats, like):
    codes = jax.lax.dynamic_slice(flat.codes, (flat.code_offset + start,), (size,))
    absmax = jax.lax.dynamic_slice(flat.absmax, (flat.block_offset + first_block,), (chunk_blocks,))
    olds.append(quantization.dequantize_blockwise(codes, absmax, _table(tables, q), block_size))
  news, results = step(jax.lax.dynamic_slice(g, (start,), (size,)), *olds)

  # All moments quantized together (stacked rows): a few loops per chunk, not per moment.
  # In the loop the new values and the lookup indices go through memory, so that each is
  # computed once, by a vectorized loop, and the gather of the code lookup runs alone.
  lut, lut_offsets, zero_index = quantization.stacked_luts([_table(tables, q) for q in like])
  if scratch is None:  # The tail chunk, outside the loop: let XLA fuse freely.
    stacked = jnp.stack(news)
  else:
    stacked, values = _through_memory(news, scratch.values, guard)
  grid, absmax = quantization.grid_indices(stacked, block_size)
  lookup = quantization.lookup_indices(grid, lut_offsets, zero_index)
  if scratch is not None:
    lookup, lookups = _through_memory(lookup, scratch.lookup, guard)
    scratch = _Scratch(values, lookups)
  codes = quantization.codes_from_lookup(lookup, lut)

  updated = [
    flat._replace(
      codes=jax.lax.dynamic_update_slice(flat.codes, codes[i], (flat.code_offset + start,)),
      absmax=jax.lax.dynamic_update_slice(
        flat.absmax, absmax[i], (flat.block_offset + first_block,)
      ),
    )
    for i, flat in enumerate(flats)
  ]
  outputs = [
    jax.lax.dynamic_update_slice(out, result.astype(out.dtype), (start,))
    for out, result in zip(outputs, results)
  ]
  return updated, outputs, scratch


def update_quantized(
  step: Callable[..., tuple[Sequence[jax.Array], Sequence[jax.Array]]],
  g: jax.Array,
  moments: Sequence[quantization.QuantizedArray],
  rows: Sequence[jax.Array | None],
  tables: StateTables,
  guard: jax.Array,
  output_dtypes: Sequence[Any] = (),
  chunk_size: int | None = None,
) -> tuple[list[quantization.QuantizedArray], list[jax.Array]]:
  """Rewrites 8-bit moments of one parameter with ``step``, chunk by chunk, in place.

  The straightforward form (dequantize each whole moment, update, re-quantize) makes
  XLA:CPU write every dequantized and every new moment out as a float32 temporary the
  size of the parameter: hundreds of MiB for a large model, freshly mapped and faulted in
  at every step. Here a loop walks the parameter in chunks of ``chunk_size`` values (whole
  blocks): each iteration dequantizes one chunk of every moment, runs ``step``, writes the
  new codes and absmax back into the (donated) state arrays and the step's other results
  into output arrays. Temporaries are chunk-sized. Nothing outside the loop reads the old
  codes, so XLA updates the state buffers in place instead of copying them.

  Args:
    step: ``step(g, *old_values) -> (new_values, results)``: one new value per moment
      and any number of further per-element results (e.g. the update direction). Must be
      elementwise (it sees chunks). Its products should be :func:`rounded`, since XLA may
      compute the new values more than once.
    g: float32 array of the parameter's shape (e.g. the gradient).
    moments: quantized moments, all with the same block size; stacked ones hold K rows.
    rows: per moment, the row to read and rewrite (a traced int32), or None if unstacked.
    tables: the code tables.
    guard: int32 zero from :func:`contraction_guard`.
    output_dtypes: dtype of each further result of ``step``.
    chunk_size: values per loop iteration, rounded down to a multiple of the block size
      (None: ``UPDATE_CHUNK_SIZE``).

  Returns:
    ``(moments, results)``: the moments with the chosen rows re-quantized from the new
    values (other rows untouched), and the further results in the parameter's shape.
  """
  block_size = moments[0].block_size
  if any(q.block_size != block_size for q in moments):
    raise ValueError("update_quantized needs one block size for all moments")
  chunk_size = UPDATE_CHUNK_SIZE if chunk_size is None else chunk_size
  chunk_size = max(1, chunk_size // block_size) * block_size
  shape, size = g.shape, int(g.size)
  blocks = quantization.num_blocks(size, block_size)
  g = g.reshape(-1)
  full_chunks, tail = divmod(size, chunk_size)
  flats = [_flatten(q, row, size, blocks) for q, row in zip(moments, rows)]
  outputs = [jnp.zeros((size,), dtype) for dtype in output_dtypes]
  update = functools.partial(_update_chunk, step, g, moments, tables, guard)

  if full_chunks:
    carry = (flats, outputs, _Scratch.create(len(moments), chunk_size))
    flats, outputs, _ = jax.lax.fori_loop(
      0, full_chunks, lambda i, carry: update(carry, start=i * chunk_size, size=chunk_size), carry
    )
  if tail:
    flats, outputs, _ = update((flats, outputs, None), start=full_chunks * chunk_size, size=tail)
  moments = [
    dataclasses.replace(
      q, codes=flat.codes.reshape(q.codes.shape), absmax=flat.absmax.reshape(q.absmax.shape)
    )
    for q, flat in zip(moments, flats)
  ]
  return moments, [out.reshape(shape) for out in outputs]
