"""Bounded (sine) LoRA adapters: the output bound however large the factors grow, the plain
adapter to first order near init, bounds on exactly the MLP adapters, merging and export
with the same update, and the ``model.lora`` section's bounded targets."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import models
from models import sharding
from models.layers import Dense
from models.lora import BoundedLoRAAdapter, LoRAAdapter

MLP = ("gate_proj", "up_proj", "down_proj")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", *MLP)
RANK, ALPHA, FREQUENCY = 4, 8.0, 50.0
BOUND = ALPHA / (RANK * FREQUENCY)  # largest |dW_ij| of a bounded adapter


CONFIG = models.LoRAConfig(rank=RANK, alpha=ALPHA, targets=("up_proj",), frequency=FREQUENCY)


def _dense(in_features=32, out_features=24):
  return Dense(
    in_features,
    out_features,
    (sharding.EMBED, sharding.MLP),
    use_bias=False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs=nnx.Rngs(0),
  )


def _adapter_pair(b_std):
  """A bounded and a plain adapter of one `Dense`, with the same `a` and `b`."""
  b_init = nnx.initializers.normal(b_std)
  bounded = BoundedLoRAAdapter(_dense(), CONFIG, nnx.Rngs(1), b_init=b_init)
  plain = LoRAAdapter(_dense(), CONFIG, nnx.Rngs(1), b_init=b_init)
  np.testing.assert_array_equal(bounded.a[...], plain.a[...])
  np.testing.assert_array_equal(bounded.b[...], plain.b[...])
  return bounded, plain


def _inputs(in_features=32):
  return jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, in_features)), jnp.float32)


def test_bounded_output_stays_within_the_bound_as_the_factors_grow():
  bounded, plain = _adapter_pair(b_std=0.1)
  x = _inputs()
  bound = BOUND * np.abs(np.asarray(x)).sum(-1, keepdims=True)  # alpha/(rank w) ||x||_1
  a0, b0 = bounded.a[...], bounded.b[...]
  plain_sizes = []
  for scale in 10.0 ** np.arange(1, 7):
    for adapter in (bounded, plain):
      adapter.a.set_value(a0 * scale)
      adapter.b.set_value(b0 * scale)
    out = np.asarray(bounded(x))
    assert np.all(np.abs(out) <= bound * (1 + 1e-5)), scale
    delta = np.asarray(bounded.delta_kernel())
    assert np.abs(delta).max() <= BOUND * (1 + 1e-6)
    assert np.abs(delta).max() >= 0.5 * BOUND  # the sine saturates: the bound is tight
    plain_sizes.append(np.abs(np.asarray(plain(x))).max())
  # The same scaling blows up a plain adapter (quadratically in the scale).
  assert np.all(np.diff(np.log10(plain_sizes)) > 1.5)
  assert plain_sizes[-1] > 1e6 * bound.max()


def test_bounded_adapter_is_the_plain_one_to_first_order_near_init():
  x = _inputs()
  bounded, plain = _adapter_pair(b_std=1e-5)
  near, reference = np.asarray(bounded(x)), np.asarray(plain(x))
  assert np.abs(reference).max() > 0
  assert np.abs(near - reference).max() / np.abs(reference).max() < 1e-3
  # Far from init (w a @ b of order 1) the two differ: the comparison above can fail.
  bounded, plain = _adapter_pair(b_std=1.0)
  far, reference = np.asarray(bounded(x)), np.asarray(plain(x))
  assert np.abs(far - reference).max() / np.abs(reference).max() > 0.1
  # b = 0 (the default init) adds nothing.
  fresh = BoundedLoRAAdapter(_dense(), CONFIG, nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(fresh(x)), 0.0)


def _tiny_llama():
  hf = transformers.LlamaConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    max_position_embeddings=64,
  )
  config = models.ModelConfig.from_hf(hf)
  return models.CausalLM(config, rngs=nnx.Rngs(0)), config


def test_apply_lora_bounds_exactly_the_mlp_adapters_and_merging_keeps_the_logits(tmp_path):
  model, config = _tiny_llama()
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 96, size=(2, 12)))
  mask = jnp.ones_like(ids)
  base = np.asarray(model(ids, mask))
  lora = models.LoRAConfig(
    rank=RANK, alpha=ALPHA, targets=ALL_PROJECTIONS, bounded_targets=MLP, frequency=FREQUENCY
  )
  # b ~ N(0, 0.2): w a @ b of order 1, where the sine and the plain product differ.
  models.apply_lora(model, lora, rngs=nnx.Rngs(2), b_init=nnx.initializers.normal(0.2))
  kinds = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, LoRAAdapter):
      kinds.setdefault(path[-2], set()).add(type(node))
      if isinstance(node, BoundedLoRAAdapter):
        product = np.asarray(node.a[...] @ node.b[...]) * node.scaling
        delta = np.asarray(node.delta_kernel())
        assert np.abs(delta).max() <= BOUND * (1 + 1e-6)
        assert np.abs(delta - product).max() > 0.1 * np.abs(product).max()
  assert kinds == {
    name: {BoundedLoRAAdapter if name in MLP else LoRAAdapter} for name in ALL_PROJECTIONS
  }
  adapted = np.asarray(model(ids, mask))
  assert np.abs(adapted - base).max() > 1e-2  # the adapters act

  # Export folds in the same update (load back: a model without adapters).
  models.save_pretrained(model, config, tmp_path / "merged")
  exported, _ = models.load_pretrained(tmp_path / "merged")
  assert np.abs(np.asarray(exported(ids, mask)) - adapted).max() <= 1e-5

  models.merge_lora(model)
  assert not any(isinstance(node, LoRAAdapter) for _, node in nnx.iter_graph(model))
  assert np.abs(np.asarray(model(ids, mask)) - adapted).max() <= 1e-5


@pytest.mark.parametrize("frequency", [0.0, -2.5])
def test_lora_config_rejects_a_nonpositive_frequency(frequency):
  with pytest.raises(ValueError, match=re.escape(f"frequency must be > 0, got {frequency!r}")):
    models.LoRAConfig(frequency=frequency)


def test_lora_config_rejects_bounded_targets_outside_targets():
  with pytest.raises(ValueError, match="down_proj"):
    models.LoRAConfig(targets=("q_proj",), bounded_targets=("down_proj",))


def test_lora_section_gives_the_bounded_mlp_targets():
  from train.config import LoRASection
  from train.program.modeling import FunctionalModel, lora_config

  targets = ("q_proj", "v_proj", "up_proj", "down_proj")
  section = LoRASection(enabled=True, targets=targets, bounded=True, frequency=7.0)
  config = lora_config(section)
  assert config.targets == targets
  assert config.bounded_targets == ("up_proj", "down_proj")
  assert config.frequency == 7.0
  assert lora_config(LoRASection(enabled=True, targets=targets)).bounded_targets == ()

  # The functional model's adapters (training, evaluation and saving use them) are bounded.
  module, model_config = _tiny_llama()
  functional, params = FunctionalModel.split(module, model_config)
  adapted, weights = functional.with_lora(params, config)
  kinds = {
    path[-2]: type(node)
    for path, node in nnx.iter_graph(adapted.module(weights))
    if isinstance(node, LoRAAdapter)
  }
  assert kinds == {
    "q_proj": LoRAAdapter,
    "v_proj": LoRAAdapter,
    "up_proj": BoundedLoRAAdapter,
    "down_proj": BoundedLoRAAdapter,
  }
