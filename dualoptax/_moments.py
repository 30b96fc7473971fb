"""Moment storage: float32 arrays or 8-bit :class:`~dualoptax.quantization.QuantizedArray`.

The optimizers compute in float32 and never care how a moment is stored. These helpers
read a moment (dequantizing if needed) and write a new value back in the same storage
(re-quantizing with fresh absmax). Per-objective moments are stacked on a leading axis of
size K; ``load_row``/``store_row`` touch only one row, so the other objectives' moments
are neither read nor re-quantized.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from dualoptax import _numerics, quantization

Moment = Union[jax.Array, quantization.QuantizedArray]


class StateTables(NamedTuple):
  """Code tables of the 8-bit states, carried in the optimizer state so that jitted
  steps receive them as arguments rather than embedded constants."""

  signed: quantization.QuantizationTables  # first moments and delta second moments
  unsigned: quantization.QuantizationTables  # second moments that cannot go negative


@dataclasses.dataclass(frozen=True)
class Precision:
  """How a transform stores its moments.

  Attributes:
    state_bits: 32 (float32 states) or 8 (block-wise quantized states).
    min_8bit_size: leaves with fewer elements keep float32 states.
    block_size: values per quantization block (one float32 absmax each).
    keep_fp32: optional tree of bools like the params (or a function of the params
      returning one); True leaves keep float32 states, e.g. embeddings.
    dtype: dtype of the unquantized states.
  """

  state_bits: int = 32
  min_8bit_size: int = 4096
  block_size: int = quantization.DEFAULT_BLOCK_SIZE
  keep_fp32: Optional[Union[Any, Callable[[Any], Any]]] = None
  dtype: Any = None  # None: float32

  def __post_init__(self):
    # Under `optax.inject_hyperparams` these ints arrive as arrays: concrete ones at init
    # (the only place they are used) become ints again; traced ones at update go unused.
    for name, minimum in (("state_bits", 8), ("min_8bit_size", 0), ("block_size", 1)):
      value = getattr(self, name)
      if not _numerics.is_concrete_number(value):
        continue
      if float(value) != int(float(value)) or int(float(value)) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
      object.__setattr__(self, name, int(float(value)))
    if _numerics.is_concrete_number(self.state_bits) and self.state_bits not in (8, 32):
      raise ValueError(f"state_bits must be 8 or 32, got state_bits={self.state_bits!r}")

  @property
  def quantized(self) -> bool:
    return self.state_bits == 8

  def tables(self) -> Optional[StateTables]:
    if not self.quantized:
      return None
    # Fresh device arrays for every state: a state is donated to jitted steps, which
    # deletes its buffers, so states must never share the (cached) tables.
    fresh = lambda signed: quantization.QuantizationTables(
        *(jnp.array(t) for t in quantization.numpy_tables(signed)))
    return StateTables(fresh(True), fresh(False))

  def which_leaves(self, params: Any) -> Any:
    """Tree of bools like ``params``: True where the states are quantized."""
    if not self.quantized:
      return jax.tree.map(lambda _: False, params)
    keep = self.keep_fp32(params) if callable(self.keep_fp32) else self.keep_fp32
    if keep is None:
      keep = jax.tree.map(lambda _: False, params)
    return jax.tree.map(
        lambda p, k: bool(jnp.size(p) >= self.min_8bit_size and not k), params, keep)

  def zeros(self, param: jax.Array, quantize: bool, signed: bool,
            num_objectives: Optional[int] = None) -> Moment:
    """A zero moment for ``param``, stacked K times when ``num_objectives`` is given."""
    lead = () if num_objectives is None else (num_objectives,)
    shape = lead + tuple(jnp.shape(param))
    if not quantize:
      return jnp.zeros(shape, self.dtype or jnp.float32)
    blocks = quantization.num_blocks(int(jnp.size(param)), self.block_size)
    return quantization.QuantizedArray(
        codes=jnp.zeros(shape, jnp.uint8), absmax=jnp.zeros(lead + (blocks,), jnp.float32),
        block_size=self.block_size, signed=signed)


def is_moment_leaf(x: Any) -> bool:
  return isinstance(x, quantization.QuantizedArray)


def _table(tables: Optional[StateTables], q: quantization.QuantizedArray):
  return tables.signed if q.signed else tables.unsigned


def load(stored: Moment, tables: Optional[StateTables]) -> jax.Array:
  """The moment as float32."""
  if isinstance(stored, quantization.QuantizedArray):
    return stored.dequantize(_table(tables, stored))
  return stored.astype(jnp.float32)


def store(value: jax.Array, like: Moment, tables: Optional[StateTables]) -> Moment:
  """``value`` in the storage of ``like`` (re-quantized with fresh absmax if 8-bit)."""
  if isinstance(like, quantization.QuantizedArray):
    return quantization.QuantizedArray.quantize(
        value, _table(tables, like), block_size=like.block_size, signed=like.signed)
  return value.astype(like.dtype)


def _index(stacked: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(stacked, index, axis=0, keepdims=False)


def _update(stacked: jax.Array, row: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(stacked, row.astype(stacked.dtype), index, 0)


def load_row(stacked: Moment, index: jax.Array, tables: Optional[StateTables]) -> jax.Array:
  """Row ``index`` of a stacked (K, ...) moment, as float32."""
  if isinstance(stacked, quantization.QuantizedArray):
    row = dataclasses.replace(
        stacked, codes=_index(stacked.codes, index), absmax=_index(stacked.absmax, index))
    return load(row, tables)
  return _index(stacked, index).astype(jnp.float32)


def store_row(stacked: Moment, value: jax.Array, index: jax.Array,
              tables: Optional[StateTables]) -> Moment:
  """``stacked`` with row ``index`` replaced by ``value``; other rows untouched."""
  if isinstance(stacked, quantization.QuantizedArray):
    row = quantization.QuantizedArray.quantize(
        value, _table(tables, stacked), block_size=stacked.block_size, signed=stacked.signed)
    return dataclasses.replace(
        stacked, codes=_update(stacked.codes, row.codes, index),
        absmax=_update(stacked.absmax, row.absmax, index))
  return _update(stacked, value, index)


def _row_mask(stacked: jax.Array, index: jax.Array) -> jax.Array:
  """Boolean (K, 1, ..., 1), True at row ``index``."""
  num = stacked.shape[0]
  return (jnp.arange(num, dtype=jnp.int32) == index).reshape((num,) + (1,) * (stacked.ndim - 1))


def update_row(stacked: Moment, update: Callable[[jax.Array], jax.Array], index: jax.Array,
               tables: Optional[StateTables]) -> tuple[Moment, jax.Array]:
  """Replaces row ``index`` of ``stacked`` by ``update(row)``; returns (stack, new row).

  ``update`` must be elementwise (it may broadcast against operands shaped like one row).
  For float32 storage the update is written as ONE select over the whole stack, and the
  new row is read back from the result: the old stack then has no reader but its own
  update, so XLA rewrites the donated buffer in place. (Reading the old row with a dynamic
  slice and writing it with a dynamic update slice makes XLA:CPU copy every stacked
  moment twice per step, and run the update single-threaded.) Every row is computed but
  only row ``index`` changes; the cost is one pass over all K rows.
  """
  if isinstance(stacked, quantization.QuantizedArray) or stacked.dtype != jnp.float32:
    value = update(load_row(stacked, index, tables))
    return store_row(stacked, value, index, tables), value
  new = jnp.where(_row_mask(stacked, index), update(stacked), stacked)
  return new, _index(new, index)
