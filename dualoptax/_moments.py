"""Moment storage: float32 arrays or 8-bit :class:`~dualoptax.quantization.QuantizedArray`.

The optimizers compute in float32 and never care how a moment is stored. These helpers
read a moment (dequantizing if needed) and write a new value back in the same storage
(re-quantizing with fresh absmax). Per-objective moments are stacked on a leading axis of
size K; ``load_row``/``store_row`` touch only one row, so the other objectives' moments
are neither read nor re-quantized.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
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
    update_in_chunks: how a leaf whose moments are all 8-bit is rewritten (on the same
      devices the two forms give bit-identical results; tests/dualoptax/test_8bit.py). True: a
      sequential loop over cache-sized chunks that rewrites the codes in place
      (:func:`update_quantized`), the fastest form on one CPU device. False:
      whole-array operations, which XLA partitions shard by shard when the states are
      sharded over several devices (it partitions the loop by gathering the whole
      sharded state in every iteration: measured 14x slower on two CPU devices) and
      which suit GPUs and TPUs. None: chunks when the program runs on a CPU backend
      with a single device, whole arrays otherwise.
  """

  state_bits: int = 32
  min_8bit_size: int = 4096
  block_size: int = quantization.DEFAULT_BLOCK_SIZE
  keep_fp32: Any | Callable[[Any], Any] | None = None
  dtype: Any = None  # None: float32
  update_in_chunks: bool | None = None

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
    if not all(isinstance(m, quantization.QuantizedArray) for m in moments):
      return False
    if any(m.size >= _MAX_LOOP_CODES for m in moments):
      return False
    if self.update_in_chunks is not None:
      return self.update_in_chunks
    return jax.default_backend() == "cpu" and jax.device_count() == 1

  def tables(self) -> StateTables | None:
    if not self.quantized:
      return None
    # Fresh device arrays for every state: a state is donated to jitted steps, which
    # deletes its buffers, so states must never share the (cached) tables.
    fresh = lambda signed: quantization.QuantizationTables(
      *(jnp.array(t) for t in quantization.numpy_tables(signed))
    )
    return StateTables(fresh(True), fresh(False))

  def which_leaves(self, params: Any) -> Any:
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
    if not quantize:
      return jnp.zeros(shape, self.dtype or jnp.float32)
    blocks = quantization.num_blocks(int(jnp.size(param)), self.block_size)
    return quantization.QuantizedArray(
      codes=jnp.zeros(shape, jnp.uint8),
      absmax=jnp.zeros(lead + (blocks,), jnp.float32),
      block_size=self.block_size,
      signed=signed,
    )


def contraction_guard(count: jax.Array) -> jax.Array:
  """An int32 zero the compiler cannot see through, for :func:`rounded`.

  Args:
    count: a traced non-negative int32 scalar (a step counter of the state).

  Returns:
    ``min(count, 0)``: always 0, but known only at run time.
  """
  return jnp.minimum(count.astype(jnp.int32), 0)


def rounded(product: jax.Array, guard: jax.Array) -> jax.Array:
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

  Returns:
    ``product``, bit for bit.
  """
  bits = jax.lax.bitcast_convert_type(product, jnp.int32)
  return jax.lax.bitcast_convert_type(bits ^ guard, jnp.float32)


def is_moment_leaf(x: Any) -> bool:
  return isinstance(x, quantization.QuantizedArray)


def _table(tables: StateTables | None, q: quantization.QuantizedArray):
  return tables.signed if q.signed else tables.unsigned


def load(stored: Moment, tables: StateTables | None) -> jax.Array:
  """The moment as float32."""
  if isinstance(stored, quantization.QuantizedArray):
    return stored.dequantize(_table(tables, stored))
  return stored.astype(jnp.float32)


def store(value: jax.Array, like: Moment, tables: StateTables | None) -> Moment:
  """``value`` in the storage of ``like`` (re-quantized with fresh absmax if 8-bit)."""
  if isinstance(like, quantization.QuantizedArray):
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
  if isinstance(stacked, quantization.QuantizedArray):
    row = dataclasses.replace(
      stacked, codes=_index(stacked.codes, index), absmax=_index(stacked.absmax, index)
    )
    return load(row, tables)
  return _index(stacked, index).astype(jnp.float32)


def store_row(
  stacked: Moment, value: jax.Array, index: jax.Array, tables: StateTables | None
) -> Moment:
  """``stacked`` with row ``index`` replaced by ``value``; other rows untouched."""
  if isinstance(stacked, quantization.QuantizedArray):
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
  if isinstance(stacked, quantization.QuantizedArray) or stacked.dtype != jnp.float32:
    value = update(load_row(stacked, index, tables))
    return store_row(stacked, value, index, tables), value
  new = jnp.where(_row_mask(stacked, index), update(stacked), stacked)
  return new, _index(new, index)


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
