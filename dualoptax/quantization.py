"""Block-wise 8-bit dynamic quantization, code-for-code equal to bitsandbytes' CPU quantizer.

DualOptim+ 8-bit stores each moment tensor as one uint8 code per value plus one float32
scale per block of ``block_size`` (256) values, as in Dettmers et al., "8-bit Optimizers
via Block-wise Quantization". A code indexes a 256-entry "dynamic tree" map on [-1, 1]
(signed) or [0, 1] (unsigned) whose entries crowd towards zero, so small moments keep
relative precision.

Quantizing a block (the rule of the bitsandbytes 0.50.2 CPU backend, which produced the
golden files; see ``shared/golden/README.md``):

* ``absmax`` = max |x| over the block (blocks run over the row-major flattening; the last
  one may be partial and its padding never counts);
* if ``absmax == 0`` every code of the block is 0, which dequantizes to 0 with either map
  (``map[0] * 0``);
* otherwise ``y = clip(x * (1 / absmax), -1, 1)``, the reciprocal rounded to float32 first;
  ``j = trunc((y + 1) * 0.5 * 65535 + 0.5)`` evaluated in float32; the code is ``lut[j]``,
  where ``lut`` (:func:`make_code_lut`) counts the map midpoints below grid point ``j``.

This is NOT the nearest map entry: where neighbouring entries are closer than the 3.05e-5
grid step (near zero) a value can land one or more codes away from the nearest one, and
an exact 0 inside a non-zero block becomes signed code 131 (2.125e-5 * absmax) or unsigned
code 7 (1.5625e-5 * absmax), never 0. Dequantization is ``map[code] * absmax`` in float32.

Example::

  >>> import jax.numpy as jnp
  >>> from dualoptax import quantization
  >>> tables = quantization.signed_tables()
  >>> q = quantization.quantize(jnp.array([0.5, -2.0, 0.0]), tables)
  >>> q.codes, q.absmax
  (Array([201,   0, 131], dtype=uint8), Array([2.], dtype=float32))
  >>> q.dequantize(tables)  # The exact 0 comes back as 2.125e-5 * absmax.
  Array([ 4.9531248e-01, -1.9859375e+00,  4.2499996e-05], dtype=float32)

Tables are data, not constants: :class:`QuantizationTables` is a pytree, and every function
here takes it as an argument, so callers can pass the 64 KiB lookup table into their jitted
function (e.g. inside an optimizer state) instead of having XLA embed it in the program.
The project found embedded tables slower inside a whole optimizer step; for quantize or
dequantize alone (``benchmarks/quantization.py``, XLA:CPU) the two compile equally fast.

Non-finite inputs (measured on XLA:CPU, jax 0.10.2). They never vanish silently: a block
holding a NaN or an infinity reads back as non-finite values throughout; other blocks are
unaffected.

* NaN anywhere in a block makes its ``absmax`` NaN, so all of the block's values
  dequantize to NaN whatever their codes. (The codes are then meaningless: on XLA:CPU
  NaN converts to grid index 0, giving code 0.)
* +-Inf (and no NaN) in a block makes its ``absmax`` +Inf and the reciprocal 0. Finite
  values get the code of y = 0 (signed 131, unsigned 7) and dequantize to +Inf. The
  infinities themselves become ``inf * 0 = NaN`` and code 0, which dequantizes to -Inf
  with the signed map (``map[0] < 0``: +Inf comes back as -Inf) and to NaN with the
  unsigned map (``map[0] = 0``).

An all-zero block dequantizes to -0.0 with the signed map (``map[0] * 0`` with
``map[0] < 0``), as in the reference. A block whose absmax is a float32 subnormal
(< 2**-126) can differ from the reference: XLA:CPU flushes subnormals to zero, so the
block quantizes as all-zero, while the reference computes with the subnormal. At the
other end, a block with absmax >= 2**126 (~8.5e37) has a subnormal reciprocal; this module
rescales such a block by 2**-64 first to keep it normal, so its values are quantized
correctly but a code can differ by one from the reference's where a value sits on a bin
edge (the reference's reciprocal carries fewer significant bits there).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK_SIZE = 256
NUM_CODES = 256
# Resolution of the reference's intermediate grid on [-1, 1]: 65536 points 2/65535 apart.
NUM_GRID_POINTS = 65536

# 1 / absmax is a float32 subnormal from here on (see quantize_blockwise).
_LARGEST_NORMAL_RECIPROCAL_ABSMAX = 2.0**126

# Parameters of the dynamic tree map: 7 decades below 1 (1e-6 .. 1) for 8-bit codes.
_NUM_DECADES = 7
_FRACTION_LOW = 0.1
_FRACTION_HIGH = 1.0


class QuantizationTables(NamedTuple):
  """The two tables that define one quantization map; a pytree of two arrays.

  Attributes:
    code_map: float32 (256,), sorted map entries; code ``c`` stands for ``code_map[c]``.
    lut: uint8 (65536,), the code the reference quantizer assigns to grid point ``j``.
  """

  code_map: Any
  lut: Any


# ---------------------------------------------------------------------------------------
# Building the tables (numpy, once per process).
# ---------------------------------------------------------------------------------------


def _fused_multiply_add_f32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
  """``a * b + c`` rounded once to float32, as a hardware FMA computes it.

  The reference map generator (PyTorch's float32 ``linspace``, built for AVX2) evaluates
  ``start + step * i`` with one fused rounding; rounding the product separately changes
  the last bit of 42 signed and 31 unsigned map entries.
  """
  exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
  # The product of two float32 numbers is exact in float64, and for the operands used
  # here the sum spans well under 53 bits, so it is exact too. Checked, not assumed:
  # np.float32(...) below must be the only rounding.
  wide = float(a) * float(b) + float(c)
  if Fraction(wide) != exact:
    raise ArithmeticError(f"fma({a}, {b}, {c}) is not exact in float64")
  return np.float32(wide)


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
  """``num`` evenly spaced float32 points, rounded the way the reference generator did.

  The step is rounded to float32 once. The first half counts up from ``start`` and the
  second half down from ``stop`` (so both ends are exact), each point with one fused
  multiply-add.
  """
  start32, stop32 = np.float32(start), np.float32(stop)
  step = np.float32((stop32 - start32) / np.float32(num - 1))
  points = np.empty(num, np.float32)
  for i in range(num):
    if i < num // 2:
      points[i] = _fused_multiply_add_f32(step, np.float32(i), start32)
    else:
      points[i] = _fused_multiply_add_f32(-step, np.float32(num - 1 - i), stop32)
  return points


def create_dynamic_map(signed: bool) -> np.ndarray:
  """The 256-entry dynamic tree quantization map (Dettmers et al.), sorted, float32.

  Each decade ``10**-6, ..., 10**0`` holds a linear "fraction" grid: decade ``d`` (0 for
  1e-6 up to 6 for 1) splits [0.1, 1] into ``2**d`` equal intervals (signed map, once per
  sign) or ``2**(d + 1)`` (unsigned map, which spends the sign bit on precision) and takes
  their midpoints times ``10**(d - 6)``. With 0 and 1 added this gives 2 * 127 + 2 (signed)
  or 254 + 2 (unsigned) = 256 entries. Signed: -0.99296874 ... 0 (index 127) ... 1.
  Unsigned: 0 (index 0) ... 1. The float32 rounding follows the reference bit for bit.

  Args:
    signed: whether the map covers [-1, 1] (True) or [0, 1] (False).

  Returns:
    float32 array of shape (256,), ascending.
  """
  entries = [np.float32(0.0), np.float32(1.0)]
  for decade in range(_NUM_DECADES):
    intervals = 2**decade if signed else 2 ** (decade + 1)
    edges = _linspace_f32(_FRACTION_LOW, _FRACTION_HIGH, intervals + 1)
    midpoints = (edges[:-1] + edges[1:]) / np.float32(2.0)
    scale = np.float32(10.0 ** (decade - (_NUM_DECADES - 1)))
    magnitudes = scale * midpoints  # float32 * float32, one rounding.
    entries.extend(magnitudes)
    if signed:
      entries.extend(-magnitudes)
  code_map = np.sort(np.asarray(entries, np.float32))
  assert code_map.shape == (NUM_CODES,), code_map.shape
  return code_map


def lut_grid() -> np.ndarray:
  """The float32 grid ``-1 + 2 i / 65535`` (i = 0 .. 65535) the lookup table is indexed by."""
  i = np.arange(NUM_GRID_POINTS, dtype=np.float32)
  return (np.float32(-1.0) + np.float32(2.0) * i / np.float32(NUM_GRID_POINTS - 1)).astype(
    np.float32
  )


def make_code_lut(code_map: np.ndarray) -> np.ndarray:
  """Lookup table from grid index to code, as the reference CPU quantizer builds it.

  ``lut[i]`` is the number of float32 midpoints ``(map[k] + map[k + 1]) * 0.5`` strictly
  below grid point ``i`` (see :func:`lut_grid`), i.e. the code whose interval between
  midpoints contains the grid point, ties going to the lower code.

  Args:
    code_map: float32 (256,) ascending map.

  Returns:
    uint8 array of shape (65536,).
  """
  code_map = np.asarray(code_map, np.float32)
  midpoints = ((code_map[:-1] + code_map[1:]) * np.float32(0.5)).astype(np.float32)
  # side="left" counts midpoints < grid point (strictly).
  return np.searchsorted(midpoints, lut_grid(), side="left").astype(np.uint8)


@functools.cache
def numpy_tables(signed: bool) -> QuantizationTables:
  """Read-only numpy tables for the signed or unsigned dynamic map (cached)."""
  code_map = create_dynamic_map(signed)
  lut = make_code_lut(code_map)
  code_map.flags.writeable = False
  lut.flags.writeable = False
  return QuantizationTables(code_map=code_map, lut=lut)


@functools.cache
def tables_for(signed: bool) -> QuantizationTables:
  """Device (jax) tables for the signed or unsigned dynamic map (cached).

  Pass the result into jitted code as an argument, not as a closed-over constant.
  """
  # Concrete even when first called while tracing, so no tracer lands in the cache.
  with jax.ensure_compile_time_eval():
    return QuantizationTables(*(jnp.asarray(table) for table in numpy_tables(signed)))


def signed_tables() -> QuantizationTables:
  """Tables of the signed map, for moments that can be negative."""
  return tables_for(True)


def unsigned_tables() -> QuantizationTables:
  """Tables of the unsigned map, for non-negative moments (second moments)."""
  return tables_for(False)


# ---------------------------------------------------------------------------------------
# Quantize / dequantize (jax.numpy, jittable, vmappable).
# ---------------------------------------------------------------------------------------


def num_blocks(size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
  """``ceil(size / block_size)``: how many absmax values an array of ``size`` needs."""
  _check_block_size(block_size)
  return -(-size // block_size)


def _check_block_size(block_size: Any) -> None:
  if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
    raise ValueError(f"block_size must be a positive Python int, got {block_size!r}")


def type_sharding(x: Any) -> Any:
  """The sharding recorded in ``x``'s type (None for values without one)."""
  try:
    return jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None


def _spec_axes(spec: Any) -> list[str]:
  axes = []
  for entry in spec:
    for axis in entry if isinstance(entry, tuple) else (entry,):
      if isinstance(axis, str) and axis not in axes:
        axes.append(axis)
  return axes


def explicit_mesh_axes(tree: Any) -> tuple[str, ...]:
  """The mesh axes of type ``Explicit`` that shard arrays of ``tree``.

  Read from the arrays' types, so also under ``jit``. Arrays on a mesh with explicit axes
  (``jax.make_mesh``'s default) carry their sharding in their type, and JAX rejects a
  reshape that would move data between shards, such as splitting a sharded array into
  blocks; see :func:`call_with_auto_axes`.
  """
  axes: list[str] = []
  for leaf in jax.tree.leaves(tree):
    sharding = type_sharding(leaf)
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or spec is None:
      continue
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    for axis in _spec_axes(spec):
      if types.get(axis) == jax.sharding.AxisType.Explicit and axis not in axes:
        axes.append(axis)
  return tuple(axes)


def call_with_auto_axes(fn: Any, args: tuple, out_sharding: Any) -> Any:
  """``fn(*args)``, with the explicit mesh axes that shard ``args`` made automatic inside.

  Block-wise quantization reshapes arrays into blocks (and the 8-bit update loop walks
  them flat). On explicit axes JAX rejects such reshapes of sharded arrays; with the axes
  automatic, XLA partitions them as it does on a mesh with ``AxisType.Auto``, with the
  same results. Without explicit axes (e.g. on one device) this is just ``fn(*args)``.

  Args:
    fn: the function.
    args: its arguments (pytrees of arrays).
    out_sharding: a function of nothing returning the shardings of ``fn``'s outputs (a
      tree like them), called only when some axis is explicit.
  """
  axes = explicit_mesh_axes(args)
  if not axes:
    return fn(*args)
  return jax.sharding.auto_axes(fn, axes=axes, out_sharding=out_sharding())(*args)


def _blocks_sharding(sharding: Any, blocks: int) -> Any:
  """The sharding of the per-block absmax of an array sharded by ``sharding``: split
  along the blocks over the array's mesh axes when they divide them, else replicated (the
  rule of :func:`dualoptax.state_shardings`)."""
  axes = _spec_axes(sharding.spec)
  ways = math.prod(sharding.mesh.shape[a] for a in axes)
  if not axes or blocks % ways:
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  entry = axes[0] if len(axes) == 1 else tuple(axes)
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(entry))


def _per_element(per_block: jax.Array, size: int, block_size: int) -> jax.Array:
  """Repeats each block's value over its ``block_size`` elements, cut to ``size``.

  ``per_block`` is (..., blocks); the result is (..., size). A broadcast + reshape +
  slice that XLA fuses into the consumer, so no array of scales is materialised and no
  gather is needed.
  """
  lead, blocks = per_block.shape[:-1], per_block.shape[-1]
  repeated = jnp.broadcast_to(per_block[..., None], lead + (blocks, block_size))
  return repeated.reshape(lead + (blocks * block_size,))[..., :size]


def _block_absmax(rows: jax.Array, block_size: int) -> jax.Array:
  """Per-block max |x| of each row of ``rows`` (rows, n) -> (rows, blocks)."""
  num, size = rows.shape
  blocks = num_blocks(size, block_size)
  # Zero padding cannot raise a maximum of absolute values (and a NaN still wins).
  padded = jnp.pad(rows, ((0, 0), (0, blocks * block_size - size)))
  magnitudes = jnp.abs(padded.reshape(num, blocks, block_size))
  # Halve each block with elementwise maxima down to 16 lanes before the reduction:
  # XLA:CPU emits a reduction along the minor axis as a scalar dependency chain per block
  # (~2 ns a value), while maxima of two halves vectorize. Maxima are exact, so the order
  # changes nothing (a NaN still propagates).
  while magnitudes.shape[-1] > 16 and magnitudes.shape[-1] % 2 == 0:
    width = magnitudes.shape[-1] // 2
    magnitudes = jnp.maximum(magnitudes[..., :width], magnitudes[..., width:])
  return jnp.max(magnitudes, axis=-1)


def grid_indices(rows: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """First half of the reference rule: each value's grid index, and the block absmax.

  Args:
    rows: float32 (rows, n); blocks of ``block_size`` run along each row.
    block_size: values per block.

  Returns:
    ``(grid_index, absmax)``: int32 (rows, n) in [0, 65535], or -1 throughout a block
    whose absmax is 0 (all of its codes are 0); float32 (rows, blocks).
  """
  size = rows.shape[1]
  absmax = _block_absmax(rows, block_size)
  # The reference multiplies by a float32 reciprocal rather than dividing: that rounds
  # differently, and the codes must match. 1/0 = inf is harmless: those blocks are all
  # zero and get index -1 below.
  # Past absmax = 2**126 the reciprocal is a subnormal, which XLA:CPU flushes to zero
  # (every code would become that of 0). Such blocks are scaled by 2**-64 first, exactly,
  # keeping the reciprocal normal; for all other blocks the scale is 1 and changes nothing.
  prescale = jnp.where(
    absmax >= _LARGEST_NORMAL_RECIPROCAL_ABSMAX, jnp.float32(2.0**-64), jnp.float32(1.0)
  )
  inverse = jnp.float32(1.0) / (absmax * prescale)
  prescaled = rows * _per_element(prescale, size, block_size)
  y = jnp.clip(prescaled * _per_element(inverse, size, block_size), -1.0, 1.0)
  # j = trunc((y + 1) * 0.5 * 65535 + 0.5), each operation rounded to float32. The product
  # with 65535 is written as h * 65536 - h (h * 65536 is exact) so that a compiler fusing
  # a multiply and an add into an FMA cannot skip a rounding: with or without fusion the
  # result is round(h * 65535), then + 0.5 is rounded separately.
  half = (y + 1.0) * 0.5
  scaled = half * jnp.float32(NUM_GRID_POINTS) - half
  grid_index = (scaled + 0.5).astype(jnp.int32)  # Non-negative, so the cast truncates.
  # A NaN converts to an unspecified int32 (0 on XLA:CPU); clip keeps it on the grid.
  grid_index = jnp.clip(grid_index, 0, NUM_GRID_POINTS - 1)
  zero_block = _per_element(absmax == 0, size, block_size)
  return jnp.where(zero_block, -1, grid_index), absmax


def lookup_indices(grid_index: jax.Array, lut_offsets: jax.Array, zero_index: int) -> jax.Array:
  """Where each row's codes are in a :func:`stacked_luts` table: ``lut_offsets[row] +
  grid_index``, and ``zero_index`` (an entry holding code 0) for all-zero blocks.

  Args:
    grid_index: int32 (rows, n) from :func:`grid_indices`.
    lut_offsets: int32 (rows,), where each row's table starts.
    zero_index: position of the 0 entry.

  Returns:
    int32 (rows, n), for :func:`codes_from_lookup`.
  """
  return jnp.where(grid_index < 0, zero_index, grid_index + lut_offsets[:, None])


def codes_from_lookup(lookup_index: jax.Array, lut: jax.Array) -> jax.Array:
  """``lut[lookup_index]``: the codes, with everything else already done (a bare gather,
  which XLA:CPU runs as a scalar loop, so it is kept apart from vectorizable work)."""
  return jnp.take(lut, lookup_index, mode="clip")


def stacked_luts(tables: Sequence[QuantizationTables]) -> tuple[jax.Array, jax.Array, int]:
  """One copy of each distinct lookup table in ``tables`` (rows sharing a map share
  one), followed by a single 0 entry for all-zero blocks.

  Returns:
    ``(lut, lut_offsets, zero_index)`` for :func:`lookup_indices` and
    :func:`codes_from_lookup`.
  """
  distinct, offsets = [], []
  for table in tables:
    match = next((i for i, t in enumerate(distinct) if t is table.lut), None)
    if match is None:
      match = len(distinct)
      distinct.append(table.lut)
    offsets.append(match * NUM_GRID_POINTS)
  lut = jnp.concatenate(distinct + [jnp.zeros((1,), jnp.uint8)])
  return lut, jnp.asarray(offsets, jnp.int32), len(distinct) * NUM_GRID_POINTS


def _quantize_rows(
  rows: jax.Array, tables: Sequence[QuantizationTables], block_size: int
) -> tuple[jax.Array, jax.Array]:
  """The reference rule on each row of ``rows`` (rows, n) with that row's tables.
  Returns codes (rows, n), absmax (rows, blocks)."""
  grid_index, absmax = grid_indices(rows, block_size)
  lut, lut_offsets, zero_index = stacked_luts(tables)
  return codes_from_lookup(lookup_indices(grid_index, lut_offsets, zero_index), lut), absmax


def quantize_blockwise(
  x: jax.Array, tables: QuantizationTables, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[jax.Array, jax.Array]:
  """Quantizes ``x`` block-wise with the reference CPU rule (see the module docstring).

  XLA may compute ``x`` twice, once for the absmax and once for the codes (it fuses
  elementwise producers into each consumer). If ``x`` comes from multiply-adds, the two
  copies can round differently where the compiler contracts one into an FMA; the
  optimizers therefore round such products explicitly (``_moments.rounded``).

  Args:
    x: array of any shape; cast to float32. Blocks of ``block_size`` run over its
      row-major flattening; the last block may be partial.
    tables: :class:`QuantizationTables` of the map to use (signed or unsigned).
    block_size: values per block (a Python int; static under ``jax.jit``).

  Returns:
    ``(codes, absmax)``: uint8 codes of ``x.shape`` and float32 per-block absolute maxima
    of shape ``(ceil(x.size / block_size),)``.
  """
  _check_block_size(block_size)
  x = jnp.asarray(x, jnp.float32)

  def quantize_flat(x, tables):
    codes, absmax = _quantize_rows(x.reshape(1, -1), [tables], block_size)
    return codes.reshape(x.shape), absmax[0]

  def out_sharding():
    sharding = type_sharding(x)
    return sharding, _blocks_sharding(sharding, num_blocks(x.size, block_size))

  return call_with_auto_axes(quantize_flat, (x, tables), out_sharding)


def quantize_blockwise_stacked(
  xs: jax.Array, tables: Sequence[QuantizationTables], block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[jax.Array, jax.Array]:
  """:func:`quantize_blockwise` of each row of ``xs`` with its own tables, in one pass.

  Equal to quantizing the rows one by one, but XLA computes the absmax and the codes of
  all rows in one fused loop each instead of one per row, which matters when the rows
  are small. (The optimizers' chunk loop quantizes its moments together the same way,
  but from the steps :func:`grid_indices`, :func:`lookup_indices` and
  :func:`codes_from_lookup`, so that it can keep intermediate values in memory.)

  Args:
    xs: float32 (rows, n).
    tables: one :class:`QuantizationTables` per row (rows sharing a map may share one).
    block_size: values per block; blocks run along each row.

  Returns:
    ``(codes, absmax)``: uint8 (rows, n) and float32 (rows, ceil(n / block_size)).
  """
  _check_block_size(block_size)
  xs = jnp.asarray(xs, jnp.float32)
  if xs.ndim != 2 or len(tables) != xs.shape[0]:
    raise ValueError(
      f"expected one table per row of a 2-D array, got {xs.shape} and {len(tables)} tables"
    )
  return _quantize_rows(xs, tables, block_size)


def dequantize_blockwise(
  codes: jax.Array,
  absmax: jax.Array,
  tables: QuantizationTables,
  block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
  """``code_map[code] * absmax[block]`` in float32, in the shape of ``codes``.

  Args:
    codes: uint8 codes of any shape (row-major blocks, as from :func:`quantize_blockwise`).
    absmax: float32 (ceil(codes.size / block_size),) per-block scales.
    tables: :class:`QuantizationTables` of the map the codes index.
    block_size: values per block (a Python int; static under ``jax.jit``).

  Returns:
    float32 array of ``codes.shape``.
  """
  _check_block_size(block_size)
  codes = jnp.asarray(codes)
  absmax = jnp.asarray(absmax, jnp.float32)
  expected_blocks = num_blocks(codes.size, block_size)
  if absmax.shape != (expected_blocks,):
    raise ValueError(
      f"absmax has shape {absmax.shape}, expected ({expected_blocks},) for "
      f"{codes.size} codes in blocks of {block_size}"
    )

  def dequantize_flat(codes, absmax, code_map):
    flat = codes.reshape(-1).astype(jnp.int32)
    values = jnp.take(jnp.asarray(code_map, jnp.float32), flat, mode="clip")
    return (values * _per_element(absmax, flat.size, block_size)).reshape(codes.shape)

  return call_with_auto_axes(
    dequantize_flat, (codes, absmax, tables.code_map), lambda: type_sharding(codes)
  )


# ---------------------------------------------------------------------------------------
# A pytree holding one quantized array.
# ---------------------------------------------------------------------------------------


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=["codes", "absmax"],
  meta_fields=["block_size", "signed"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """An array stored as 8-bit codes plus per-block float32 scales.

  A pytree whose leaves are ``codes`` and ``absmax`` only. ``block_size`` and ``signed``
  are static metadata (part of the tree structure), so jit, ``jax.tree.map`` and
  checkpointing see two arrays and a change of map or block size is a change of
  structure.

  Attributes:
    codes: uint8, the original array's shape.
    absmax: float32 (ceil(codes.size / block_size),).
    block_size: values per block.
    signed: True if the codes index the signed map, False for the unsigned one.
  """

  codes: Any
  absmax: Any
  block_size: int = DEFAULT_BLOCK_SIZE
  signed: bool = True

  @classmethod
  def quantize(
    cls,
    x: jax.Array,
    tables: QuantizationTables | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    signed: bool = True,
  ) -> QuantizedArray:
    """Quantizes ``x`` with the ``signed`` (or unsigned) map.

    Args:
      x: array to quantize (any shape; cast to float32).
      tables: the tables of the map chosen by ``signed``; the caller must keep the two
        consistent. None uses :func:`tables_for`, which inside ``jit`` embeds them as
        constants (slower than passing them in).
      block_size: values per block.
      signed: which map the codes index.

    Returns:
      The quantized array.
    """
    if tables is None:
      tables = tables_for(signed)
    codes, absmax = quantize_blockwise(x, tables, block_size)
    return cls(codes=codes, absmax=absmax, block_size=block_size, signed=bool(signed))

  def dequantize(self, tables: QuantizationTables | None = None) -> jax.Array:
    """Float32 values of the original shape (``tables`` None: :func:`tables_for`)."""
    if tables is None:
      tables = tables_for(self.signed)
    return dequantize_blockwise(self.codes, self.absmax, tables, self.block_size)

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the original (and dequantized) array."""
    return tuple(self.codes.shape)

  @property
  def size(self) -> int:
    """Number of quantized values."""
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held by codes and absmax (works on tracers and abstract arrays too)."""
    return sum(
      math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in (self.codes, self.absmax)
    )


def quantize(
  x: jax.Array,
  tables: QuantizationTables | None = None,
  block_size: int = DEFAULT_BLOCK_SIZE,
  signed: bool = True,
) -> QuantizedArray:
  """Functional form of :meth:`QuantizedArray.quantize`."""
  return QuantizedArray.quantize(x, tables, block_size, signed)


def dequantize(quantized: QuantizedArray, tables: QuantizationTables | None = None) -> jax.Array:
  """Functional form of :meth:`QuantizedArray.dequantize`."""
  return quantized.dequantize(tables)
