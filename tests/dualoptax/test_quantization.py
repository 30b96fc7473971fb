"""Block-wise 8-bit quantization: code-for-code against bitsandbytes' CPU quantizer.

The golden file ``bnb_quant_blockwise.npz`` holds bnb 0.50.2's maps, its CPU lookup tables
and its quantize/dequantize outputs; everything here must match it bit for bit. The rest
checks properties the golden file cannot: shapes, jit/vmap, pytree and checkpoint
behaviour, and the approximation error on random inputs.
"""

import functools
import pathlib

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualoptax import quantization

GOLDEN_FILE = (
  pathlib.Path(__file__).resolve().parents[3] / "shared" / "golden" / "bnb_quant_blockwise.npz"
)
SKIP_REASON = f"golden quantizer data not found at {GOLDEN_FILE}"
MAP_NAMES = {"signed": True, "unsigned": False}


@functools.cache
def _golden_arrays():
  with np.load(GOLDEN_FILE, allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


def _golden():
  if not GOLDEN_FILE.is_file():
    pytest.skip(SKIP_REASON)
  return _golden_arrays()


def _entry_names(prefix: str):
  """``<input>__<map>`` names of the golden entries under ``prefix`` ("q" or "dq").

  Read at collection time so every entry is its own test; without the file a single
  skipped placeholder stands in.
  """
  if not GOLDEN_FILE.is_file():
    return [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON))]
  with np.load(GOLDEN_FILE, allow_pickle=False) as data:
    keys = data.files
  return sorted({key.split("/")[1] for key in keys if key.startswith(prefix + "/")})


def _is_signed(entry: str) -> bool:
  return MAP_NAMES[entry.rsplit("__", 1)[1]]


def _bits(array) -> np.ndarray:
  """float32 as uint32: compares bit patterns (so -0.0 != 0.0 and NaN == same NaN)."""
  return np.asarray(array, np.float32).view(np.uint32)


def _assert_bit_equal(actual, expected, what: str):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  differing = np.flatnonzero(_bits(actual).ravel() != _bits(expected).ravel())
  assert differing.size == 0, (
    f"{what}: {differing.size} of {actual.size} differ, first at {differing[:5]}: "
    f"{actual.ravel()[differing[:5]]} vs {expected.ravel()[differing[:5]]}"
  )


def _numpy_quantize(x, signed: bool, block_size: int = 256):
  """Independent, loop-per-block numpy float32 evaluation of the reference CPU rule."""
  tables = quantization.numpy_tables(signed)
  flat = np.asarray(x, np.float32).reshape(-1)
  blocks = -(-flat.size // block_size)
  codes = np.zeros(flat.size, np.uint8)
  absmax = np.zeros(blocks, np.float32)
  one, half = np.float32(1.0), np.float32(0.5)
  for b in range(blocks):
    block = flat[b * block_size : (b + 1) * block_size]
    absmax[b] = np.max(np.abs(block))
    if absmax[b] == 0:
      continue
    y = np.clip(block * (one / absmax[b]), -one, one)
    j = (((y + one) * half) * np.float32(65535.0) + half).astype(np.int64)
    codes[b * block_size : (b + 1) * block_size] = tables.lut[j]
  return codes.reshape(np.shape(x)), absmax


_jit_quantize = jax.jit(quantization.quantize_blockwise, static_argnames="block_size")
_jit_dequantize = jax.jit(quantization.dequantize_blockwise, static_argnames="block_size")


# ---------------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("map_name", sorted(MAP_NAMES))
def test_dynamic_map_equals_golden(map_name):
  golden = _golden()
  code_map = quantization.create_dynamic_map(MAP_NAMES[map_name])
  assert code_map.dtype == np.float32 and code_map.shape == (256,)
  _assert_bit_equal(code_map, golden[f"dynamic_map_{map_name}"], f"{map_name} map")
  assert np.all(np.diff(code_map) > 0)


def test_map_landmarks():
  signed = quantization.create_dynamic_map(True)
  unsigned = quantization.create_dynamic_map(False)
  assert signed[127] == 0.0 and signed[-1] == 1.0 and signed[0] == np.float32(-0.99296874)
  assert unsigned[0] == 0.0 and unsigned[-1] == 1.0 and np.all(unsigned >= 0)


@pytest.mark.parametrize("map_name", sorted(MAP_NAMES))
def test_code_lut_equals_golden(map_name):
  golden = _golden()
  lut = quantization.make_code_lut(golden[f"dynamic_map_{map_name}"])
  assert lut.dtype == np.uint8 and lut.shape == (65536,)
  np.testing.assert_array_equal(lut, golden[f"cpu_lut_{map_name}"])
  np.testing.assert_array_equal(quantization.numpy_tables(MAP_NAMES[map_name]).lut, lut)


def test_lut_grid_equals_golden():
  _assert_bit_equal(quantization.lut_grid(), _golden()["cpu_lut_grid"], "grid")


@pytest.mark.parametrize("map_name", sorted(MAP_NAMES))
def test_every_grid_point_quantizes_to_its_lut_code(map_name):
  # As the golden LUTs were recorded: blocks led by 1.0 (absmax 1), then 255 grid points.
  # Checks that y -> grid index lands on index i for y = grid_i, over the whole grid.
  golden = _golden()
  grid = golden["cpu_lut_grid"]
  chunks = np.array_split(grid, -(-grid.size // 255))
  x = np.concatenate([np.concatenate([[np.float32(1.0)], c]) for c in chunks])
  is_grid = np.concatenate([np.arange(c.size + 1) > 0 for c in chunks])
  codes, absmax = _jit_quantize(x, quantization.tables_for(MAP_NAMES[map_name]))
  assert np.all(np.asarray(absmax) == 1.0)
  np.testing.assert_array_equal(np.asarray(codes)[is_grid], golden[f"cpu_lut_{map_name}"])


def test_tables_are_cached_pytrees_of_arrays():
  signed = quantization.signed_tables()
  assert signed is quantization.signed_tables() is quantization.tables_for(True)
  assert quantization.unsigned_tables() is quantization.tables_for(False)
  leaves = jax.tree.leaves(signed)
  assert len(leaves) == 2 and all(isinstance(leaf, jax.Array) for leaf in leaves)
  assert signed.code_map.dtype == jnp.float32 and signed.lut.dtype == jnp.uint8
  np_tables = quantization.numpy_tables(True)
  assert not np_tables.code_map.flags.writeable and not np_tables.lut.flags.writeable
  np.testing.assert_array_equal(np.asarray(signed.lut), np_tables.lut)


# ---------------------------------------------------------------------------------------
# Golden quantize / dequantize entries.
# ---------------------------------------------------------------------------------------


def test_golden_entries_are_found():
  golden = _golden()
  assert len(_entry_names("q")) >= 12 and len(_entry_names("dq")) >= 2, sorted(golden)


def _quantize_cases():
  """Every q/ entry under jit; the code_points entries also eagerly.

  Op-by-op dispatch compiles each op per shape (slow). The bin-edge probes are where fused
  (jit) and unfused (eager) float32 arithmetic could part, so they run both ways.
  """
  if not GOLDEN_FILE.is_file():
    return [pytest.param(None, None, marks=pytest.mark.skip(reason=SKIP_REASON))]
  cases = []
  for entry in _entry_names("q"):
    cases.append(pytest.param(entry, True, id=f"{entry}-jit"))
    if entry.startswith("code_points"):
      cases.append(pytest.param(entry, False, id=f"{entry}-eager"))
  return cases


@pytest.mark.parametrize("entry,jit", _quantize_cases())
def test_quantize_matches_golden(entry, jit):
  golden = _golden()
  tables = quantization.tables_for(_is_signed(entry))
  x = golden[f"q/{entry}/input"]
  quantize = _jit_quantize if jit else quantization.quantize_blockwise
  dequantize = _jit_dequantize if jit else quantization.dequantize_blockwise

  codes, absmax = quantize(x, tables)
  assert codes.dtype == jnp.uint8 and absmax.dtype == jnp.float32
  np.testing.assert_array_equal(
    np.asarray(codes), golden[f"q/{entry}/codes"], err_msg=f"{entry} codes"
  )
  _assert_bit_equal(absmax, golden[f"q/{entry}/absmax"], f"{entry} absmax")
  _assert_bit_equal(
    dequantize(codes, absmax, tables), golden[f"q/{entry}/dequant"], f"{entry} dequant"
  )


@pytest.mark.parametrize("entry", _entry_names("dq"))
def test_dequantize_matches_golden(entry):
  golden = _golden()
  tables = quantization.tables_for(_is_signed(entry))
  codes, absmax = golden[f"dq/{entry}/codes"], golden[f"dq/{entry}/absmax"]
  for dequantize in (quantization.dequantize_blockwise, _jit_dequantize):
    _assert_bit_equal(dequantize(codes, absmax, tables), golden[f"dq/{entry}/dequant"], entry)


# ---------------------------------------------------------------------------------------
# Shapes, zeros, jit, vmap.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1000,), (5,), (257,), (7, 13), (3, 5, 37), (512,), (0,)])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_any_shape_matches_numpy_rule(shape, signed):
  x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 3
  tables = quantization.tables_for(signed)
  codes, absmax = _jit_quantize(x, tables)
  expected_codes, expected_absmax = _numpy_quantize(x, signed)
  assert codes.shape == shape and absmax.shape == (-(-x.size // 256),)
  np.testing.assert_array_equal(np.asarray(codes), expected_codes)
  _assert_bit_equal(absmax, expected_absmax, "absmax")
  restored = _jit_dequantize(codes, absmax, tables)
  assert restored.shape == shape and restored.dtype == jnp.float32


def test_other_block_sizes_match_numpy_rule():
  x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
  for block_size in (64, 100, 2048):
    codes, absmax = _jit_quantize(x, quantization.signed_tables(), block_size=block_size)
    expected_codes, expected_absmax = _numpy_quantize(x, True, block_size)
    np.testing.assert_array_equal(np.asarray(codes), expected_codes)
    _assert_bit_equal(absmax, expected_absmax, f"absmax, block {block_size}")


def test_stacked_rows_equal_rows_quantized_one_by_one():
  rng = np.random.default_rng(2)
  # Rows with mixed scales, NaN / inf / all-zero blocks, a partial last block and both maps.
  xs = rng.standard_normal((4, 700)).astype(np.float32) * np.float32([[1e-3], [1.0], [1e6], [2.0]])
  xs[1, 300:400] = np.abs(xs[1, 300:400])
  xs[2, 0:256] = 0.0
  xs[3, 5] = np.nan
  xs[3, 600] = np.inf
  tables = [
    quantization.signed_tables(),
    quantization.unsigned_tables(),
    quantization.signed_tables(),
    quantization.unsigned_tables(),
  ]
  for block_size in (256, 100):
    codes, absmax = jax.jit(quantization.quantize_blockwise_stacked, static_argnums=2)(
      xs, tables, block_size
    )
    for row, table in enumerate(tables):
      expected_codes, expected_absmax = _jit_quantize(xs[row], table, block_size=block_size)
      np.testing.assert_array_equal(np.asarray(codes[row]), np.asarray(expected_codes))
      _assert_bit_equal(absmax[row], expected_absmax, f"absmax row {row}, block {block_size}")


def test_padding_never_enters_absmax():
  # The partial last block holds only negative values: zero padding must not matter and
  # the block's absmax is its own largest |x|.
  x = np.concatenate([np.ones(256, np.float32), -np.linspace(1, 3, 44, dtype=np.float32)])
  _, absmax = quantization.quantize_blockwise(x, quantization.signed_tables())
  np.testing.assert_array_equal(np.asarray(absmax), [1.0, 3.0])


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_all_zero_blocks_give_code_zero_and_exact_zeros(signed):
  x = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
  x[256:512] = 0.0  # a full zero block
  x[768:] = 0.0  # the partial last block (232 values)
  x[3] = 0.0  # an exact zero inside a non-zero block
  tables = quantization.tables_for(signed)
  codes, absmax = _jit_quantize(x, tables)
  codes, absmax = np.asarray(codes), np.asarray(absmax)
  assert absmax[1] == 0 and absmax[3] == 0
  assert np.all(codes[256:512] == 0) and np.all(codes[768:] == 0)
  restored = np.asarray(_jit_dequantize(codes, absmax, tables))
  assert np.all(np.isfinite(restored))
  assert np.all(restored[256:512] == 0) and np.all(restored[768:] == 0)
  # The reference rule does not keep an isolated zero at zero (see the golden README).
  assert codes[3] == (131 if signed else 7)


def test_jit_equals_eager():
  x = np.random.default_rng(3).standard_normal((33, 31)).astype(np.float32)
  tables = quantization.signed_tables()
  eager = quantization.quantize_blockwise(x, tables)
  jitted = _jit_quantize(x, tables)
  np.testing.assert_array_equal(np.asarray(eager[0]), np.asarray(jitted[0]))
  _assert_bit_equal(eager[1], jitted[1], "absmax")
  _assert_bit_equal(
    quantization.dequantize_blockwise(*eager, tables), _jit_dequantize(*jitted, tables), "dequant"
  )


def test_vmap_over_leading_axis_equals_per_row_calls():
  x = np.random.default_rng(4).standard_normal((3, 4, 150)).astype(np.float32)
  x[1] *= 1e-3
  tables = quantization.signed_tables()
  batched_q = jax.jit(jax.vmap(quantization.quantize_blockwise, in_axes=(0, None)))
  codes, absmax = batched_q(x, tables)
  assert codes.shape == x.shape and absmax.shape == (3, 3)  # 600 values -> 3 blocks/row
  restored = jax.vmap(quantization.dequantize_blockwise, in_axes=(0, 0, None))(
    codes, absmax, tables
  )
  for row in range(x.shape[0]):
    row_codes, row_absmax = quantization.quantize_blockwise(x[row], tables)
    np.testing.assert_array_equal(np.asarray(codes[row]), np.asarray(row_codes))
    _assert_bit_equal(absmax[row], row_absmax, f"absmax row {row}")
    _assert_bit_equal(
      restored[row],
      quantization.dequantize_blockwise(row_codes, row_absmax, tables),
      f"dequant row {row}",
    )


def test_non_float32_input_is_cast():
  x = jnp.linspace(-2, 2, 300, dtype=jnp.bfloat16)
  codes, absmax = quantization.quantize_blockwise(x, quantization.signed_tables())
  expected_codes, expected_absmax = _numpy_quantize(np.asarray(x, np.float32), True)
  np.testing.assert_array_equal(np.asarray(codes), expected_codes)
  _assert_bit_equal(absmax, expected_absmax, "absmax")


def test_huge_block_is_quantized_sensibly():
  # absmax >= 2**126: 1/absmax is subnormal, which XLA:CPU would flush to zero.
  x = np.array([3.4e38, -1e38, 5e37, 1.7e38, -2.5e38], np.float32)
  tables = quantization.signed_tables()
  codes, absmax = _jit_quantize(x, tables)
  restored = np.asarray(_jit_dequantize(codes, absmax, tables), np.float64)
  max_gap = np.max(np.diff(quantization.numpy_tables(True).code_map.astype(np.float64)))
  assert np.all(np.abs(restored - x) <= 3.4e38 * (max_gap / 2 + 2 / 65535))


def test_non_finite_values_poison_only_their_block():
  x = np.random.default_rng(5).standard_normal(768).astype(np.float32)
  x[5] = np.nan
  x[300], x[301] = np.inf, -np.inf
  for signed in (True, False):
    tables = quantization.tables_for(signed)
    codes, absmax = _jit_quantize(x, tables)
    restored = np.asarray(_jit_dequantize(codes, absmax, tables))
    assert np.isnan(absmax[0]) and np.isinf(absmax[1])
    assert np.all(np.isnan(restored[:256]))
    assert not np.any(np.isfinite(restored[256:512]))
    assert np.all(np.isfinite(restored[512:]))


def test_bad_arguments_are_rejected():
  tables = quantization.signed_tables()
  with pytest.raises(ValueError, match="block_size"):
    quantization.quantize_blockwise(jnp.ones(4), tables, block_size=0)
  with pytest.raises(ValueError, match="absmax has shape"):
    quantization.dequantize_blockwise(jnp.zeros(300, jnp.uint8), jnp.ones(1), tables)


# ---------------------------------------------------------------------------------------
# QuantizedArray.
# ---------------------------------------------------------------------------------------


def _example_quantized(signed=True, shape=(5, 100)):
  x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
  if not signed:
    x = x * x
  return x, quantization.quantize(x, quantization.tables_for(signed), signed=signed)


def test_quantized_array_basics():
  x, q = _example_quantized()
  assert q.shape == (5, 100) and q.size == 500 and q.block_size == 256 and q.signed
  assert q.nbytes == 500 + 2 * 4
  expected_codes, expected_absmax = _numpy_quantize(x, True)
  np.testing.assert_array_equal(np.asarray(q.codes), expected_codes)
  _assert_bit_equal(q.absmax, expected_absmax, "absmax")
  _assert_bit_equal(
    q.dequantize(quantization.signed_tables()),
    quantization.dequantize(q),
    "dequant with default tables",
  )


def test_quantized_array_is_a_pytree_of_two_leaves():
  _, q = _example_quantized()
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 2 and leaves[0] is q.codes and leaves[1] is q.absmax
  doubled = jax.tree.map(lambda leaf: leaf, q)
  assert isinstance(doubled, quantization.QuantizedArray)
  assert doubled.block_size == q.block_size and doubled.signed == q.signed
  # Map and block size are static structure.
  _, unsigned = _example_quantized(signed=False)
  assert jax.tree.structure(unsigned) != treedef
  assert jax.tree.structure(quantization.QuantizedArray(q.codes, q.absmax, 256, True)) == treedef


def test_quantized_array_under_jit():
  x, _ = _example_quantized()

  @jax.jit
  def round_trip(x, signed_tables, unsigned_tables):
    q = quantization.QuantizedArray.quantize(x, signed_tables)
    assert q.nbytes == 508  # Static, also on tracers.
    v = quantization.quantize(x * x, unsigned_tables, signed=False)
    return q, v, q.dequantize(signed_tables)

  q, v, restored = round_trip(x, quantization.signed_tables(), quantization.unsigned_tables())
  assert isinstance(q, quantization.QuantizedArray) and q.signed and not v.signed
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == x.shape

  @jax.jit
  def dequantize_both(q, v, signed_tables, unsigned_tables):
    return q.dequantize(signed_tables), v.dequantize(unsigned_tables)

  again, squares = dequantize_both(
    q, v, quantization.signed_tables(), quantization.unsigned_tables()
  )
  _assert_bit_equal(restored, again, "dequant")
  expected_codes, _ = _numpy_quantize(x * x, False)
  np.testing.assert_array_equal(np.asarray(v.codes), expected_codes)
  assert np.all(np.asarray(squares) >= 0)


def test_quantized_array_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  _, signed_q = _example_quantized()
  _, unsigned_q = _example_quantized(signed=False, shape=(1000,))
  tree = {"mu": signed_q, "nu": unsigned_q, "count": jnp.int32(7)}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(tmp_path / "state", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  assert isinstance(restored["nu"], quantization.QuantizedArray) and not restored["nu"].signed
  for original, loaded in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)):
    assert loaded.dtype == original.dtype and loaded.shape == original.shape
    assert np.asarray(loaded).tobytes() == np.asarray(original).tobytes()


# ---------------------------------------------------------------------------------------
# Property: error bounded by the map's resolution, codes near the nearest entry.
# ---------------------------------------------------------------------------------------

# Below this |x / absmax| the map's entries are closer together than the reference's
# 65536-point grid, so the chosen code can be several codes from the nearest (e.g. 0 ->
# signed code 131); the error bound still holds there.
_NEAR_ZERO = 1e-4
_HALF_GRID_STEP = 1.0 / 65535

# 1e17 times the largest scale below is 1e37, under 2**126 (see the huge-block test).
_LIMIT = float(np.float32(1e17))
_finite_floats = st.floats(
  min_value=-_LIMIT,
  max_value=_LIMIT,
  allow_nan=False,
  allow_infinity=False,
  allow_subnormal=False,
  width=32,
)


@hypothesis.settings(
  max_examples=25, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
  # A few sizes (each compiles once): one value, partial, full, full + 1, several blocks.
  x=hnp.arrays(
    np.float32, st.sampled_from([1, 2, 100, 255, 256, 257, 600]), elements=_finite_floats
  ),
  scale=st.sampled_from([1.0, 1e-20, 1e20]),
  signed=st.booleans(),
)
def test_round_trip_error_is_within_map_resolution(x, scale, signed):
  x = (x * np.float32(scale)).astype(np.float32)
  # XLA:CPU reads float32 subnormals as zero (documented); make the input say so.
  x[np.abs(x) < np.finfo(np.float32).tiny] = 0.0
  if not signed:
    x = np.abs(x)  # The unsigned map cannot represent negatives (they clamp to 0).
  code_map = quantization.numpy_tables(signed).code_map.astype(np.float64)
  tables = quantization.tables_for(signed)

  codes, absmax = _jit_quantize(x, tables)
  restored = np.asarray(_jit_dequantize(codes, absmax, tables), np.float64)
  codes, absmax = np.asarray(codes).astype(np.int64), np.asarray(absmax, np.float64)

  per_element_absmax = np.repeat(absmax, 256)[: x.size]
  max_gap = np.max(np.diff(code_map))
  # Plus the smallest normal float32: XLA:CPU flushes subnormal results (e.g. a
  # dequantized map[c] * absmax below 2**-126) to zero.
  bound = (
    per_element_absmax * (max_gap / 2 + _HALF_GRID_STEP) * (1 + 1e-6) + np.finfo(np.float32).tiny
  )
  error = np.abs(restored - x.astype(np.float64))
  assert np.all(error <= bound), (error - bound).max()

  nonzero = per_element_absmax > 0
  y = x[nonzero].astype(np.float64) / per_element_absmax[nonzero]
  nearest = np.abs(y[:, None] - code_map[None, :]).argmin(axis=1)
  away_from_zero = np.abs(y) >= _NEAR_ZERO
  code_distance = np.abs(codes[nonzero] - nearest)[away_from_zero]
  assert np.all(code_distance <= 1), code_distance.max()
