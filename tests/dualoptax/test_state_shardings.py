"""dualoptax.state_shardings: the optimizer state placed beside its sharded parameters."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import dualoptax

# Abstract: the rule needs only the axis sizes, so 8 "devices" cost nothing here.
MESH = jax.sharding.AbstractMesh((4, 2), ("fsdp", "tensor"))
PARAMS = {
  "w": jax.ShapeDtypeStruct((128, 64), jnp.float32),  # 32 blocks of 256
  "v": jax.ShapeDtypeStruct((40, 64), jnp.float32),  # 10 blocks: fsdp (4) does not divide
  "b": jax.ShapeDtypeStruct((64,), jnp.float32),  # small: float32 moments
}
SPECS = {"w": P("fsdp", "tensor"), "v": P("fsdp", None), "b": P(None)}
STORAGE = dualoptax.MomentStorage(state_bits=8, min_8bit_size=1024)


def _inner(tree, state_type=dualoptax.ScaleByDualOptimPlusState):
  return dualoptax.find_state(tree, state_type)


def test_moments_follow_their_parameter_and_absmax_its_axes():
  tx = dualoptax.dualoptim_plus(1e-3, storage=STORAGE)
  specs = _inner(dualoptax.state_shardings(jax.eval_shape(tx.init, PARAMS), PARAMS, SPECS, MESH))
  assert specs.base_mu["w"].codes == P("fsdp", "tensor")
  assert specs.base_mu["w"].absmax == P(("fsdp", "tensor"))  # 32 blocks over 4 x 2
  assert specs.delta_nu["w"].codes == P(None, "fsdp", "tensor")  # K is never split
  assert specs.delta_nu["w"].absmax == P(None, ("fsdp", "tensor"))
  assert specs.delta_mu["v"].codes == P(None, "fsdp", None)
  assert specs.delta_mu["v"].absmax == P()  # 10 blocks do not split 4 ways
  assert specs.base_nu["b"] == P(None) and specs.delta_mu["b"] == P(None, None)
  assert specs.count == P() and specs.objective_counts == P()
  # The code tables: split over every axis that shards a parameter (256 and 65536 entries).
  assert (
    jax.tree.leaves(specs.tables, is_leaf=lambda x: isinstance(x, P)) == [P(("fsdp", "tensor"))] * 4
  )


@pytest.mark.parametrize(
  "tx, state_type",
  [
    (dualoptax.dualoptim(1e-3), dualoptax.ScaleByDualOptimState),
    (optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), optax.ScaleByAdamState),
  ],
  ids=["dualoptim", "optax.adamw"],
)
def test_any_optax_state_with_moments_like_the_params(tx, state_type):
  specs = dualoptax.state_shardings(jax.eval_shape(tx.init, PARAMS), PARAMS, SPECS, MESH)
  inner = _inner(specs, state_type)
  stacked = state_type is dualoptax.ScaleByDualOptimState
  assert inner.mu["w"] == (P(None, "fsdp", "tensor") if stacked else P("fsdp", "tensor"))
  assert inner.count == P()


def test_named_shardings_in_named_shardings_out():
  mesh = jax.make_mesh((1,), ("fsdp",))
  params = {"w": jnp.ones((64, 64))}
  shardings = {"w": NamedSharding(mesh, P("fsdp", None))}
  tx = dualoptax.dualoptim_plus(1e-3, state_bits=8)
  state = tx.init(params)
  placed = dualoptax.state_shardings(state, params, shardings)
  assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(placed))
  assert _inner(placed).delta_mu["w"].codes.spec == P(None, "fsdp", None)
  moved = jax.device_put(state, placed)  # the shardings fit the state, leaf by leaf
  assert jax.tree.structure(moved) == jax.tree.structure(state)


def test_errors_name_the_problem():
  state = dualoptax.dualoptim_plus(1e-3).init({"w": jnp.ones(4)})
  with pytest.raises(ValueError, match="mesh="):
    dualoptax.state_shardings(state, {"w": jnp.ones(4)}, {"w": P()})
  with pytest.raises(ValueError, match="2 shardings for 1 parameters"):
    dualoptax.state_shardings(state, {"w": jnp.ones(4)}, [P(), P()], MESH)


def test_init_places_moments_beside_their_parameters():
  mesh = jax.make_mesh((1,), ("fsdp",))
  params = {
    "w": jax.device_put(jnp.ones((64, 64)), NamedSharding(mesh, P("fsdp", None))),
    "b": jax.device_put(jnp.ones((64,)), NamedSharding(mesh, P())),
  }
  state = _inner(dualoptax.dualoptim_plus(1e-3, state_bits=8).init(params))
  # What state_shardings gives is where init already put them (as optax's zeros_like does).
  expected = _inner(
    dualoptax.state_shardings(state, params, jax.tree.map(lambda p: p.sharding, params))
  )
  for moments, specs in zip(
    (state.base_mu, state.base_nu, state.delta_mu, state.delta_nu),
    (expected.base_mu, expected.base_nu, expected.delta_mu, expected.delta_nu),
  ):
    for array, sharding in zip(jax.tree.leaves(moments), jax.tree.leaves(specs)):
      assert array.sharding == sharding
  assert state.delta_mu["w"].codes.sharding.spec == P(None, "fsdp", None)
  assert state.delta_mu["w"].absmax.sharding.spec == P(None, "fsdp")


def test_variables_around_parameters_and_moments():
  """nnx.State parameters (nnx.Param variables): the shardings wrap each spec like the
  state wraps its arrays, so that they fit the state leaf by leaf."""
  nnx = pytest.importorskip("flax.nnx")
  mesh = jax.make_mesh((1,), ("fsdp",))
  params = nnx.State({"w": nnx.Param(jnp.ones((64, 64))), "b": nnx.Param(jnp.ones(64))})
  shardings = nnx.State(
    {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P(None))}
  )
  state = dualoptax.dualoptim_plus(1e-3, state_bits=8).init(params)
  placed = dualoptax.state_shardings(state, params, shardings)
  # Codes of the parameter's shape keep its variable; stacked codes (K, ...) do not.
  codes = _inner(placed).base_mu["w"].codes
  assert isinstance(codes, nnx.Param) and codes.get_value().spec == P("fsdp", None)
  assert _inner(placed).delta_mu["w"].codes.spec == P(None, "fsdp", None)
  assert _inner(placed).delta_mu["b"].spec == P(None, None)
  assert _inner(placed).base_mu["b"].get_value().spec == P(None)
  moved = jax.device_put(state, placed)
  assert jax.tree.structure(moved) == jax.tree.structure(state)
