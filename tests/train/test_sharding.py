"""Placement rules: parameters by logical axes, optimizer moments follow their parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import dualoptax
import models
from train.config import MeshConfig, ModelConfig
from train.program.modeling import FunctionalModel, tiny_hf_config
from train.runtime import sharding


def test_moments_follow_their_parameter_and_scalars_are_replicated():
  hf = tiny_hf_config(ModelConfig(hidden_size=64), 100, 1, 2, 0)
  config = models.ModelConfig.from_hf(hf, dtype=jnp.float32)
  _, params = FunctionalModel.split(models.CausalLM(config, rngs=nnx.Rngs(0)), config)
  mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1))
  param_sh = sharding.param_shardings(params, mesh)
  tx = dualoptax.dualoptim_plus(
    1e-3, storage=dualoptax.MomentStorage(state_bits=8, min_8bit_size=1024)
  )
  opt_state = tx.init(params)
  state_sh = sharding.state_shardings(opt_state, params, param_sh, mesh)
  inner = dualoptax.find_state(state_sh, dualoptax.ScaleByDualOptimPlusState)
  k_proj = lambda tree: tree["layers"][0]["attn"]["k_proj"]["kernel"]
  assert k_proj(param_sh).spec == P("fsdp", None)  # ('embed', 'kv_heads')
  assert inner.count.spec == P()
  assert k_proj(inner.base_mu).codes.get_value().spec == P("fsdp", None)
  # The per-objective axis of stacked moments is never sharded; absmax is split by block.
  assert k_proj(inner.delta_mu).codes.spec == P(None, "fsdp", None)
  assert k_proj(inner.delta_mu).absmax.spec == P(None, "fsdp")


def test_mesh_sizes_must_cover_the_devices():
  with pytest.raises(ValueError, match="does not cover"):
    sharding.make_mesh(MeshConfig(data=2, fsdp=2))
  assert sharding.make_mesh(MeshConfig(data=1, fsdp=-1)).shape["fsdp"] == jax.device_count()


def test_place_batch_builds_global_arrays_on_the_batch_sharding():
  mesh = sharding.make_mesh(MeshConfig())
  batch_sh = sharding.batch_sharding(mesh)
  local = {"input_ids": np.arange(2 * 4 * 5).reshape(2, 4, 5).astype(np.int32)}
  placed = sharding.place_batch(local, batch_sh)
  assert placed["input_ids"].sharding == batch_sh
  assert placed["input_ids"].shape == (2, 4 * jax.process_count(), 5)
  np.testing.assert_array_equal(np.asarray(placed["input_ids"]), local["input_ids"])
