"""DualOptim+ / DualOptim with 8-bit states: memory, options, training, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax

PARAMS = {"embed": jnp.ones((64, 128)), "w": jnp.ones((128, 256)), "b": jnp.ones(256)}


def _leaf_kinds(tree):
  return {k: type(v).__name__ for k, v in tree.items()}


def test_8bit_state_is_at_most_6_1_bytes_per_parameter():
  big = {"w1": jnp.zeros((512, 512)), "w2": jnp.zeros((1000, 300))}  # 300000: partial block
  fp32 = dualoptax.dualoptim_plus(1e-3).init(big)
  q8 = dualoptax.dualoptim_plus(1e-3, state_bits=8).init(big)
  assert dualoptax.bytes_per_parameter(fp32, big) == pytest.approx(24.0, abs=0.01)
  # The code tables (two 256-entry maps and two 65536-entry lookup tables) are a fixed
  # 130 KiB per state, whatever the model size; per parameter we count the moments.
  moments = lambda st: dualoptax.find_state(st, type(st[0]))._replace(tables=None)
  inner = dualoptax.find_state(q8, dualoptax.ScaleByDualOptimPlusState)
  tables = dualoptax.state_nbytes(inner) - dualoptax.state_nbytes(moments(q8))
  assert tables == 2 * (256 * 4 + 65536)
  per_param = dualoptax.bytes_per_parameter(moments(q8), big)
  assert 6.0 < per_param <= 6.1, per_param
  dualoptim_q8 = dualoptax.dualoptim(1e-3, state_bits=8).init(big)
  assert 4.0 < dualoptax.bytes_per_parameter(moments(dualoptim_q8), big) <= 4.1


def test_small_leaves_and_chosen_leaves_keep_float32():
  tx = dualoptax.dualoptim_plus(
    1e-3,
    storage=dualoptax.MomentStorage(
      state_bits=8, min_8bit_size=4096, keep_fp32=lambda p: {k: k == "embed" for k in p}
    ),
  )
  s = dualoptax.find_state(tx.init(PARAMS), dualoptax.ScaleByDualOptimPlusState)
  assert _leaf_kinds(s.base_mu) == {"embed": "ArrayImpl", "w": "QuantizedArray", "b": "ArrayImpl"}
  assert s.base_nu["w"].signed is False and s.base_mu["w"].signed is True
  assert s.delta_nu["w"].signed is True  # deltas of the second moment can be negative
  assert s.delta_mu["w"].codes.shape == (2, 128, 256)
  assert s.delta_mu["w"].absmax.shape == (2, 128)


@pytest.mark.parametrize("quantize_base,quantize_deltas", [(True, False), (False, True)])
def test_state_groups_can_be_quantized_separately(quantize_base, quantize_deltas):
  tx = dualoptax.dualoptim_plus(
    1e-3,
    storage=dualoptax.MomentStorage(
      state_bits=8, quantize_base=quantize_base, quantize_deltas=quantize_deltas
    ),
  )
  s = dualoptax.find_state(tx.init(PARAMS), dualoptax.ScaleByDualOptimPlusState)
  assert isinstance(s.base_mu["w"], dualoptax.QuantizedArray) == quantize_base
  assert isinstance(s.delta_nu["w"], dualoptax.QuantizedArray) == quantize_deltas


def test_inactive_objective_codes_are_untouched():
  tx = dualoptax.dualoptim_plus(1e-2, state_bits=8)
  state = tx.init(PARAMS)
  step = jax.jit(lambda g, s, o: tx.update(g, s, PARAMS, objective=o))
  rng = np.random.default_rng(0)
  grads = lambda: jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), PARAMS)
  _, state = step(grads(), state, jnp.int32(dualoptax.RETAIN))
  before = dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState)
  _, state = step(grads(), state, jnp.int32(dualoptax.FORGET))
  after = dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState)
  r = dualoptax.RETAIN
  np.testing.assert_array_equal(after.delta_mu["w"].codes[r], before.delta_mu["w"].codes[r])
  np.testing.assert_array_equal(after.delta_nu["w"].absmax[r], before.delta_nu["w"].absmax[r])
  assert not np.array_equal(after.delta_mu["w"].codes[0], before.delta_mu["w"].codes[0])


def _train_mlp(tx, steps=300, seed=0):
  """A 2-layer MLP regression with two conflicting-ish objectives, alternating 1:1."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(256, 32)), jnp.float32)
  teacher = rng.normal(size=(32, 8)) / np.sqrt(32)
  y_a = jnp.asarray(np.tanh(np.asarray(x) @ teacher), jnp.float32)
  y_b = jnp.asarray(np.asarray(y_a) + 0.3 * rng.normal(size=y_a.shape), jnp.float32)
  params = {
    "w1": jnp.asarray(rng.normal(size=(32, 256)) / np.sqrt(32), jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(256, 8)) / 16, jnp.float32),
  }

  def loss(p, y):
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

  state = tx.init(params)

  @jax.jit
  def step(p, s, objective):
    y = jnp.where(objective == 0, y_a, y_b)
    updates, s = tx.update(jax.grad(loss)(p, y), s, p, objective=objective)
    return optax.apply_updates(p, updates), s

  for t in range(steps):
    params, state = step(params, state, jnp.int32(t % 2))
  return float(loss(params, y_a) + loss(params, y_b))


def test_8bit_converges_like_fp32():
  fp32 = _train_mlp(dualoptax.dualoptim_plus(3e-3))
  q8 = _train_mlp(
    dualoptax.dualoptim_plus(
      3e-3, storage=dualoptax.MomentStorage(state_bits=8, min_8bit_size=2048)
    )
  )
  initial = _train_mlp(dualoptax.dualoptim_plus(0.0), steps=1)
  assert fp32 < 0.5 * initial, (fp32, initial)  # it really trained
  assert abs(q8 - fp32) <= 0.05 * fp32, (q8, fp32)


def test_8bit_state_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = dualoptax.dualoptim_plus(1e-3, state_bits=8)
  state = tx.init(PARAMS)
  grads = jax.tree.map(lambda p: p * 0.5, PARAMS)
  _, state = jax.jit(lambda g, s: tx.update(g, s, PARAMS))(grads, state)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "state", jax.tree.map(np.zeros_like, state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  "make",
  [
    lambda: dualoptax.dualoptim(
      3e-3, storage=dualoptax.MomentStorage(state_bits=8, min_8bit_size=2048)
    ),
    lambda: dualoptax.dualoptim_plus(
      3e-3, storage=dualoptax.MomentStorage(state_bits=8, min_8bit_size=2048)
    ),
  ],
  ids=["dualoptim", "dualoptim_plus"],
)
def test_8bit_optimizers_train(make):
  initial = _train_mlp(dualoptax.dualoptim_plus(0.0), steps=1)
  assert _train_mlp(make()) < 0.5 * initial


def test_states_do_not_share_table_buffers_across_donation():
  """Donating one state must not delete the tables of another (or of a later init)."""
  tx = dualoptax.dualoptim_plus(1e-3, state_bits=8)
  first, second = tx.init(PARAMS), tx.init(PARAMS)

  def step(s):
    return tx.update(jax.tree.map(jnp.ones_like, PARAMS), s, PARAMS)[1]

  jax.jit(step, donate_argnums=0)(first)
  jax.block_until_ready(jax.jit(step, donate_argnums=0)(second))
  jax.block_until_ready(jax.jit(step, donate_argnums=0)(tx.init(PARAMS)))


def _run_steps(tx, params, grads):
  """(params, state) after one jitted step per gradient, objectives alternating from
  FORGET. The step is traced anew on every call, so settings read while tracing (e.g. a
  patched chunk size) take effect."""

  @jax.jit
  def step(p, s, g, objective):
    updates, s = tx.update(g, s, p, objective=objective)
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)
  for i, g in enumerate(grads):
    p, s = step(p, s, g, jnp.int32(i % 2))
  return p, s


@pytest.mark.parametrize(
  "make",
  [
    lambda: dualoptax.dualoptim(1e-3, weight_decay=0.01, state_bits=8),
    lambda: dualoptax.dualoptim_plus(1e-3, weight_decay=0.01, state_bits=8),
  ],
  ids=["dualoptim", "dualoptim_plus"],
)
def test_chunked_8bit_update_equals_one_chunk(make, monkeypatch):
  """The chunk loop (full chunks plus a partial tail) gives the one-chunk result exactly."""
  from dualoptax import _moments

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(65, 64)), jnp.float32)}  # 4160 = 16.25 blocks
  grads = [
    {"w": jnp.asarray(rng.normal(size=(65, 64)), jnp.float32) * 10.0**k} for k in (-3, 0, -6, 2)
  ]

  def run(chunk_size):
    monkeypatch.setattr(_moments, "UPDATE_CHUNK_SIZE", chunk_size)
    return _run_steps(make(), params, grads)

  one_chunk = run(1 << 16)
  for chunk_size in (512, 1024):  # 8 or 4 loop iterations plus a 64-value tail
    chunked = run(chunk_size)
    assert jax.tree.structure(chunked) == jax.tree.structure(one_chunk)
    # The states exactly; the parameters up to rounding (XLA fuses the direction into the
    # parameter update differently when it comes out of the loop).
    for a, b in zip(jax.tree.leaves(chunked[1]), jax.tree.leaves(one_chunk[1])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(chunked[0]["w"], one_chunk[0]["w"], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
  "make",
  [
    lambda chunks: dualoptax.dualoptim(
      1e-2,
      weight_decay=0.01,
      storage=dualoptax.MomentStorage(state_bits=8, min_8bit_size=1024, update_in_chunks=chunks),
    ),
    lambda chunks: dualoptax.dualoptim_plus(
      1e-2,
      weight_decay=0.01,
      storage=dualoptax.MomentStorage(state_bits=8, min_8bit_size=1024, update_in_chunks=chunks),
    ),
  ],
  ids=["dualoptim", "dualoptim_plus"],
)
def test_chunk_loop_and_whole_array_updates_are_bit_identical(make):
  """The two ways of rewriting 8-bit moments (``update_in_chunks``) agree bit for bit:
  states and parameters, over steps of both objectives and gradients of any scale."""
  rng = np.random.default_rng(1)
  # (96, 521): three full 16K-value chunks plus a tail ending in a partial block.
  params = {
    "w": jnp.asarray(rng.normal(size=(96, 521)), jnp.float32),
    "v": jnp.asarray(rng.normal(size=(40, 128)), jnp.float32),
  }
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 10.0**k, jnp.float32), params)
    for k in (-3, 0, -6, 2, -1, -2)
  ]

  looped, whole = (
    jax.device_get(_run_steps(make(chunks), params, grads)) for chunks in (True, False)
  )
  assert jax.tree.structure(looped) == jax.tree.structure(whole)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(looped)[0], jax.tree.leaves(whole)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("update_in_chunks,loops", [(True, True), (False, False), (None, True)])
def test_update_in_chunks_chooses_the_loop(update_in_chunks, loops):
  """None picks the chunk loop on one CPU device (the default test set-up)."""
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    pytest.skip("the default choice is only the loop on a single CPU device")
  tx = dualoptax.dualoptim_plus(
    1e-3, storage=dualoptax.MomentStorage(state_bits=8, update_in_chunks=update_in_chunks)
  )
  state = tx.init(PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, PARAMS))(grads, state)
  text = str(jaxpr)  # fori_loop with static bounds traces to a scan
  assert ("scan[" in text or "while[" in text) == loops


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_update_in_chunks_must_be_a_bool_or_none(value):
  with pytest.raises(ValueError, match=f"update_in_chunks={value!r}"):
    dualoptax.MomentStorage(state_bits=8, update_in_chunks=value)


def test_moments_too_large_for_int32_offsets_take_the_whole_array_update():
  from dualoptax import _moments

  def moment(shape):
    blocks = dualoptax.quantization.num_blocks(int(np.prod(shape)))
    return dualoptax.QuantizedArray(
      codes=jax.ShapeDtypeStruct(shape, jnp.uint8),
      absmax=jax.ShapeDtypeStruct((blocks,), jnp.float32),
    )

  storage = _moments.MomentStorage(state_bits=8, update_in_chunks=True)
  assert storage.chunked([moment((4096, 4096)), moment((2, 4096, 4096))])
  # Two objectives' rows of a 2**30-value parameter: 2**31 codes in the stacked moment.
  assert not storage.chunked([moment((2**15, 2**15)), moment((2, 2**15, 2**15))])
  assert not storage.chunked([moment((64, 64)), jnp.zeros((64, 64))])  # not all 8-bit


def test_state_bits_is_a_shorthand_for_the_storage():
  short = dualoptax.dualoptim_plus(1e-3, state_bits=8).init(PARAMS)
  full = dualoptax.dualoptim_plus(1e-3, storage=dualoptax.MomentStorage(state_bits=8)).init(PARAMS)
  assert jax.tree.structure(short) == jax.tree.structure(full)
  # Given both, they must agree.
  storage = dualoptax.MomentStorage(state_bits=8, min_8bit_size=1024)
  tx = dualoptax.dualoptim(1e-3, storage=storage, state_bits=8)
  s = dualoptax.find_state(tx.init(PARAMS), dualoptax.ScaleByDualOptimState)
  assert isinstance(s.mu["w"], dualoptax.QuantizedArray)
  with pytest.raises(ValueError, match="state_bits=32 disagrees with storage.state_bits=8"):
    dualoptax.dualoptim_plus(1e-3, storage=storage, state_bits=32)


def test_storage_options_are_checked():
  with pytest.raises(ValueError, match="state_bits=16"):
    dualoptax.MomentStorage(state_bits=16)
  with pytest.raises(ValueError, match="block_size"):
    dualoptax.MomentStorage(block_size=0)
  with pytest.raises(TypeError):  # keyword-only: no positional rebuild
    dualoptax.MomentStorage(8)
  # DualOptim has no base or deltas to choose from.
  with pytest.raises(ValueError, match="quantize_base=False"):
    dualoptax.dualoptim(1e-3, storage=dualoptax.MomentStorage(state_bits=8, quantize_base=False))


def test_8bit_moments_of_variables_hold_their_arrays_in_variables():
  """Parameters in variables (nnx.State of nnx.Param, as the training program passes):
  an 8-bit moment is a QuantizedArray node (so that nnx.Optimizer keeps it), whose codes
  keep the parameter's variable when they have its shape; stacked moments are bare (the
  variable's metadata describes the parameter's shape). Updates with variables give the
  bits of plain arrays and keep the state's structure."""
  nnx = pytest.importorskip("flax.nnx")
  rng = np.random.default_rng(0)
  raw = {"w": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32), "b": jnp.ones(8)}
  wrapped = nnx.State({k: nnx.Param(v) for k, v in raw.items()})
  tx = dualoptax.dualoptim_plus(1e-2, state_bits=8)
  state, plain = tx.init(wrapped), tx.init(raw)
  inner = dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState)
  q = inner.base_mu["w"]
  assert isinstance(q, dualoptax.QuantizedArray) and isinstance(q.codes, nnx.Param)
  assert isinstance(q.absmax, jax.Array) and isinstance(inner.delta_mu["w"].codes, jax.Array)
  assert isinstance(inner.base_mu["b"], nnx.Param) and isinstance(inner.delta_mu["b"], jax.Array)
  structure = jax.tree.structure(state)
  for t in range(3):
    g = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in raw.items()}
    g_wrapped = nnx.State({k: nnx.Param(v) for k, v in g.items()})
    updates, state = tx.update(g_wrapped, state, wrapped, objective=t % 2)
    expected, plain = tx.update(g, plain, raw, objective=t % 2)
    for a, b in zip(jax.tree.leaves((updates, state)), jax.tree.leaves((expected, plain))):
      np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(state) == structure
