"""Run checkpoints: params + optimizer state (fp32 and 8-bit) + metadata round trip; LoRA
adapters and their state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import dualoptax
from train.runtime.checkpointing import RunCheckpointer


@pytest.mark.parametrize("state_bits", [32, 8])
def test_round_trip_is_bit_exact(tmp_path, state_bits):
  params = {"w": jnp.arange(64 * 80, dtype=jnp.float32).reshape(64, 80) / 100, "b": jnp.ones(3)}
  storage = dualoptax.MomentStorage(state_bits=state_bits, min_8bit_size=1024)
  tx = dualoptax.dualoptim_plus(1e-3, storage=storage)
  opt_state = tx.init(params)
  for t in range(3):
    updates, opt_state = tx.update(
      jax.tree.map(lambda p: jnp.sin(p + t), params), opt_state, params
    )
    params = optax.apply_updates(params, updates)
  state = {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(jax.random.key(3))}
  checkpointer = RunCheckpointer(tmp_path / "ckpt", max_to_keep=2)
  checkpointer.save(3, state, {"sampler": {"step": 3, "epochs": [1, 0]}, "note": "x"})
  step, restored, meta = checkpointer.restore(jax.tree.map(jnp.zeros_like, state))
  assert step == 3 and meta == {"sampler": {"step": 3, "epochs": [1, 0]}, "note": "x"}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  checkpointer.close()


def test_keeps_the_newest_and_errors_when_empty(tmp_path):
  checkpointer = RunCheckpointer(tmp_path / "ckpt", max_to_keep=2)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpointer.restore({"x": jnp.zeros(2)})
  for step in (1, 2, 3):
    checkpointer.save(step, {"x": jnp.full(2, float(step))}, {"step": step})
  assert checkpointer.latest_step() == 3
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["2", "3"]
  _, state, meta = checkpointer.restore({"x": jnp.zeros(2)}, step=2)
  np.testing.assert_array_equal(state["x"], [2.0, 2.0])
  assert meta == {"step": 2}
  with pytest.raises(ValueError, match="max_to_keep"):
    RunCheckpointer(tmp_path / "other", max_to_keep=0)


def test_lora_adapters_and_their_state_round_trip(tmp_path):
  """What a LoRA run checkpoints: the adapters (an nnx.State of LoRAParam) and the
  optimizer state over them; nothing of the base."""
  from flax import nnx

  import models
  from train.config import ModelConfig
  from train.program.modeling import FunctionalModel, tiny_hf_config

  section = ModelConfig(hidden_size=16, num_layers=1, num_heads=2)
  config = models.ModelConfig.from_hf(tiny_hf_config(section, 32, 0, 1, 2, max_positions=16))
  model, params = FunctionalModel.split(models.CausalLM(config, rngs=nnx.Rngs(0)), config)
  lora = models.LoRAConfig(rank=2, targets=("q_proj", "down_proj"))
  _, weights = model.with_lora(params, lora)
  tx = dualoptax.dualoptim_plus(1e-2)
  adapters, opt_state = weights.adapters, tx.init(weights.adapters)
  grads = jax.tree.map(jnp.ones_like, adapters)
  updates, opt_state = tx.update(grads, opt_state, adapters, objective=dualoptax.FORGET)
  state = {"params": optax.apply_updates(adapters, updates), "opt_state": opt_state}
  checkpointer = RunCheckpointer(tmp_path / "ckpt")
  checkpointer.save(1, state, {"step": 1})
  _, restored, _ = checkpointer.restore(jax.tree.map(jnp.zeros_like, state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  checkpointer.close()
  raw = ocp.StandardCheckpointer().restore(tmp_path / "ckpt" / "1" / "state")
  paths = [
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(raw["params"])[0]
  ]
  assert len(paths) == 4 and all("['lora']" in p for p in paths)
