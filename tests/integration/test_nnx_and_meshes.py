"""dualoptax as a user meets it in the JAX ecosystem: ``flax.nnx.Optimizer`` with float32
and 8-bit states (eager and under ``nnx.jit``), meshes with explicit and auto axes (plain
jax and NNX), and the conflict diagnostics on an NNX optimizer state.

Each NNX run is compared with the same steps written as a plain optax loop over the
model's parameters: the results must be equal bit for bit. Mesh runs happen in fresh
processes with 2 simulated CPU devices (XLA fixes the device count when jax starts).
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_runs import run_cli
from flax import nnx

import dualoptax

STEPS = 4


class Model(nnx.Module):
  """A kernel large enough for 8-bit states (8192 values) and a small float32 bias."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(64, 128, rngs=rngs)

  def __call__(self, x):
    return self.linear(x)


def _batches():
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.normal(size=(8, 64)), jnp.float32) for _ in range(STEPS)]


def _loss(model, x):
  return jnp.mean(jnp.tanh(model(x)) ** 2)


def _optimizer(state_bits):
  return dualoptax.dualoptim_plus(1e-2, state_bits=state_bits)


def _nnx_run(state_bits, jit):
  """STEPS updates by nnx.Optimizer, objectives 0, 1, 0, 1 passed to update."""
  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _optimizer(state_bits), wrt=nnx.Param)

  def train_step(model, optimizer, x, objective):
    grads = nnx.grad(_loss)(model, x)
    optimizer.update(model, grads, objective=objective)

  step = nnx.jit(train_step) if jit else train_step
  for t, x in enumerate(_batches()):
    step(model, optimizer, x, jnp.int32(t % 2))
  return model, optimizer


def _optax_run(state_bits, jit):
  """The same steps as a plain optax loop over the model's parameters."""
  graphdef, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
  params = nnx.as_pure(params)
  tx = _optimizer(state_bits)
  state = tx.init(params)

  def train_step(params, state, x, objective):
    grads = jax.grad(lambda p: _loss(nnx.merge(graphdef, p), x))(params)
    updates, state = tx.update(grads, state, params, objective=objective)
    return optax.apply_updates(params, updates), state

  step = jax.jit(train_step) if jit else train_step
  for t, x in enumerate(_batches()):
    params, state = step(params, state, x, jnp.int32(t % 2))
  return params, state


def _assert_equal(tree_a, tree_b):
  leaves_a, leaves_b = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
@pytest.mark.parametrize("state_bits", [32, 8])
def test_nnx_optimizer_matches_the_optax_loop(state_bits, jit):
  model, optimizer = _nnx_run(state_bits, jit)
  params, state = _optax_run(state_bits, jit)
  _assert_equal(nnx.as_pure(nnx.state(model, nnx.Param)), params)
  _assert_equal(nnx.as_pure(optimizer.opt_state), state)
  assert int(optimizer.step[...]) == STEPS
  plus = dualoptax.find_state(nnx.as_pure(optimizer.opt_state), dualoptax.ScaleByDualOptimPlusState)
  kernel = plus.delta_mu["linear"]["kernel"]
  assert isinstance(kernel, dualoptax.QuantizedArray) == (state_bits == 8)
  assert [int(c) for c in plus.objective_counts] == [STEPS // 2, STEPS // 2]


@pytest.mark.parametrize("state_bits", [32, 8])
def test_diagnostics_and_hyperparameters_read_an_nnx_optimizer_state(state_bits):
  _, optimizer = _nnx_run(state_bits, jit=False)
  _, state = _optax_run(state_bits, jit=False)
  per_leaf, total = dualoptax.dualoptim_plus_diagnostics(optimizer.opt_state)
  expected_per_leaf, expected_total = dualoptax.dualoptim_plus_diagnostics(state)
  _assert_equal(total, expected_total)
  _assert_equal(per_leaf, expected_per_leaf)
  hyperparameters = dualoptax.hyperparameters(
    optimizer.opt_state, dualoptax.ScaleByDualOptimPlusState
  )
  assert hyperparameters == dict(b1=0.9, b2=0.95, base_b1=0.9, base_b2=0.95, eps=1e-8)


def test_dualoptim_diagnostics_read_an_nnx_optimizer_state():
  model = Model(nnx.Rngs(0))
  tx = optax.inject_hyperparams(dualoptax.dualoptim)(learning_rate=1e-2, b2=0.99)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for t, x in enumerate(_batches()):
    optimizer.update(model, nnx.grad(_loss)(model, x), objective=t % 2)
  _, total = dualoptax.dualoptim_diagnostics(optimizer.opt_state)
  assert np.isfinite(float(total.update_cosine))
  hyperparameters = dualoptax.hyperparameters(optimizer.opt_state, dualoptax.ScaleByDualOptimState)
  assert float(hyperparameters["b2"]) == pytest.approx(0.99)


MESH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import dualoptax

    assert jax.device_count() == 2, jax.devices()
    axis_type = getattr(AxisType, sys.argv[1])
    rng = np.random.default_rng(0)
    # "u" spans several chunks of the 8-bit update loop; its 195 blocks do not split in two,
    # so its absmax stays replicated. "b" is too small for 8-bit states.
    params = {"w": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32),
              "u": jnp.asarray(rng.normal(size=(96, 520)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(128,)), jnp.float32)}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
             for _ in range(5)]
    specs = {"w": P(None, "model"), "u": P("model", None), "b": P()}

    def run(mesh, update_in_chunks):
        tx = dualoptax.dualoptim_plus(1e-2, storage=dualoptax.MomentStorage(
            state_bits=8, min_8bit_size=1024, update_in_chunks=update_in_chunks))
        place = lambda tree: tree
        if mesh is not None:
            place = lambda tree: jax.tree.map(
                lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)
        p = place(params)
        state = tx.init(p)
        if mesh is not None:
            assert_codes_sharded(state, "init")

        def step(p, s, g, objective):
            u, s = tx.update(g, s, p, objective=objective)
            return optax.apply_updates(p, u), s

        if mesh is None or axis_type == AxisType.Explicit:
            step = jax.jit(step)  # Explicit axes: the shardings are part of the types.
        else:  # Automatic axes: the state's shardings, by dualoptax's rule, for XLA.
            param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
            state_shardings = dualoptax.state_shardings(state, params, param_shardings)
            step = jax.jit(step, out_shardings=(param_shardings, state_shardings))

        for t, g in enumerate(grads):
            p, state = step(p, state, place(g), jnp.int32(t % 2))
        return p, state

    def assert_codes_sharded(state, label):
        plus = dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState)
        for moments in (plus.base_mu, plus.base_nu, plus.delta_mu, plus.delta_nu):
            for name in ("w", "u"):
                q = moments[name]
                assert isinstance(q, dualoptax.QuantizedArray), (label, name)
                assert "model" in str(q.codes.sharding.spec), (label, name, q.codes.sharding)
            absmax = moments["w"].absmax.sharding.spec
            assert "model" in str(absmax), (label, absmax)

    single = jax.device_get(run(None, None))
    mesh = jax.make_mesh((2,), ("model",), axis_types=(axis_type,))
    # The default (whole arrays on several devices), and the chunk loop forced.
    for chunks in (None, True):
        p, state = run(mesh, chunks)
        assert_codes_sharded(state, f"after the steps, update_in_chunks={chunks}")
        multi = jax.device_get((p, state))
        flat = jax.tree_util.tree_flatten_with_path(single)[0]
        for (path, a), b in zip(flat, jax.tree.leaves(multi)):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

    # The diagnostics read the sharded state (sums over shards: float32 rounding apart).
    expected = dualoptax.dualoptim_plus_diagnostics(single[1])[1]
    got = jax.jit(dualoptax.dualoptim_plus_diagnostics)(state)[1]
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # quantize and dequantize on a sharded array, eagerly and under jit.
    w = jax.device_put(params["w"], NamedSharding(mesh, specs["w"]))
    q1 = dualoptax.quantization.quantize(params["w"])
    for quantize in (dualoptax.quantization.quantize, jax.jit(dualoptax.quantization.quantize)):
        q = quantize(w)
        np.testing.assert_array_equal(q.codes, q1.codes)
        np.testing.assert_array_equal(q.absmax, q1.absmax)
        np.testing.assert_array_equal(jax.jit(lambda q: q.dequantize())(q), q1.dequantize())
    print("OK")
""")


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_8bit_states_on_a_two_device_mesh_stay_sharded_and_match_one_device(axis_type):
  result = run_cli(["-c", MESH_SCRIPT, axis_type], devices=2)  # fails on a non-zero exit
  assert "OK" in result.stdout, (result.stdout + result.stderr)[-3000:]


NNX_MESH_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType
    from flax import nnx
    import dualoptax

    assert jax.device_count() == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("model",), axis_types=(getattr(AxisType, sys.argv[1]),))

    class Model(nnx.Module):
        def __init__(self, rngs, partitioned):
            init = nnx.initializers.lecun_normal()
            if partitioned:
                init = nnx.with_partitioning(init, (None, "model"))
            self.linear = nnx.Linear(64, 128, kernel_init=init, rngs=rngs)

        def __call__(self, x):
            return self.linear(x)

    def run(partitioned):
        model = Model(nnx.Rngs(0), partitioned)
        optimizer = nnx.Optimizer(
            model, dualoptax.dualoptim_plus(1e-2, state_bits=8), wrt=nnx.Param)

        @nnx.jit
        def train_step(model, optimizer, x, objective):
            grads = nnx.grad(lambda m: jnp.mean(jnp.tanh(m(x)) ** 2))(model)
            optimizer.update(model, grads, objective=objective)

        rng = np.random.default_rng(0)
        for t in range(3):
            x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
            train_step(model, optimizer, x, jnp.int32(t % 2))
        return model, optimizer

    model, optimizer = run(False)
    single = jax.device_get(nnx.as_pure((nnx.state(model), optimizer.opt_state)))
    with jax.set_mesh(mesh):
        model, optimizer = run(True)
    state = nnx.as_pure(optimizer.opt_state)
    plus = dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState)
    # Stacked moments (K, 64, 128) are split along the kernel's axis, not by the kernel's
    # annotation applied to another shape.
    delta = plus.delta_mu["linear"]["kernel"]
    assert delta.codes.sharding.spec == jax.P(None, None, "model"), delta.codes.sharding
    assert delta.absmax.sharding.spec == jax.P(None, "model"), delta.absmax.sharding
    multi = jax.device_get(nnx.as_pure((nnx.state(model), optimizer.opt_state)))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
        np.testing.assert_array_equal(a, b)
    print("OK")
""")


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_nnx_optimizer_with_8bit_states_on_a_two_device_mesh(axis_type):
  result = run_cli(["-c", NNX_MESH_SCRIPT, axis_type], devices=2)
  assert "OK" in result.stdout, (result.stdout + result.stderr)[-3000:]
