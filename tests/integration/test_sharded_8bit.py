"""8-bit states under sharding: DualOptim+ steps on parameters sharded over 8 simulated
devices, by the whole-array update (the default there) and by the chunk loop, give the
single-device codes (chunk loop) exactly, and absmax and parameters up to float32
rounding (XLA compiles the sharded program differently, so the direction can differ by a
few ulps; the 8-bit codes absorb that).

XLA fixes the device count when jax initializes, so the sharded run happens in a fresh
Python process with ``--xla_force_host_platform_device_count=8``.
"""

import textwrap

from cli_runs import run_cli

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import dualoptax

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    # "u" spans several chunks of the 8-bit update loop (16K values each).
    params = {"w": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
              "v": jnp.asarray(rng.normal(size=(40, 128)), jnp.float32),
              "u": jnp.asarray(rng.normal(size=(96, 520)), jnp.float32)}
    # Conflicting objectives, as in unlearning: forget steps -0.7c, retain steps +c.
    c = jax.tree.map(lambda p: rng.choice([-1.0, 1.0], p.shape) * rng.uniform(0.5, 1.5, p.shape),
                     params)
    grads = [jax.tree.map(
        lambda c: jnp.asarray((-0.7 if t % 2 == 0 else 1.0) * c
                              + 0.2 * rng.normal(size=c.shape), jnp.float32), c)
        for t in range(6)]
    def run(place, update_in_chunks):
        tx = dualoptax.dualoptim_plus(1e-2, storage=dualoptax.MomentStorage(
            state_bits=8, min_8bit_size=1024, update_in_chunks=update_in_chunks))

        @jax.jit
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p, s = place(params), tx.init(params)
        for g in grads:
            p, s = step(p, s, place(g))
        return jax.device_get((p, s))

    def compare(single, multi):
        flat_single = jax.tree_util.tree_flatten_with_path(single[1])[0]
        for (path, a), b in zip(flat_single, jax.tree.leaves(multi[1])):
            if a.dtype == np.uint8:  # codes: identical
                np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7,
                                           err_msg=jax.tree_util.keystr(path))
        for name in params:
            np.testing.assert_allclose(single[0][name], multi[0][name], rtol=1e-5,
                                       atol=1e-6, err_msg=name)
        q = dualoptax.find_state(multi[1], dualoptax.ScaleByDualOptimPlusState).base_mu["w"]
        assert isinstance(q, dualoptax.QuantizedArray) and q.codes.dtype == np.uint8

    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = lambda tree: jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp", None))), tree)
    # The single-device reference takes the chunk loop; the sharded runs the default
    # (on several devices the whole-array update) and the loop forced.
    single = run(lambda t: t, True)
    for multi in (run(sharded, None), run(sharded, True)):
        compare(single, multi)
    print("OK")
""")


def test_8bit_step_is_identical_when_sharded_over_8_devices():
  result = run_cli(["-c", SCRIPT], devices=8)  # fails on a non-zero exit
  assert "OK" in result.stdout, (result.stdout + result.stderr)[-3000:]
