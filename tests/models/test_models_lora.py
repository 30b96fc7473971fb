"""LoRA adapters: identity at init, merging, export to transformers, training only adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx
from hf_support import ONE_PER_FAMILY, padded_batch, save_hf_model, torch_logits

import models

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _logits(model, ids, mask):
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def _count_lora(model):
  return sum(isinstance(v, models.LoRAParam) for _, v in nnx.iter_graph(model))


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_zero_initialized_adapters_equal_base_model(name, tmp_path):
  save_hf_model(name, tmp_path)
  model, config = models.load_pretrained(tmp_path)
  ids, mask = padded_batch(2, 8, "right")
  base = _logits(model, ids, mask)

  lora_config = models.LoRAConfig(rank=4, alpha=8.0, targets=ALL_PROJECTIONS)
  models.apply_lora(model, lora_config, rngs=nnx.Rngs(1))
  projections_per_layer = 7 if config.mlp_type == "gated" else 6
  assert _count_lora(model) == 2 * projections_per_layer * config.num_layers
  np.testing.assert_array_equal(_logits(model, ids, mask), base)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_merged_and_exported_adapters_match_unmerged(name, tmp_path):
  save_hf_model(name, tmp_path / "hf")
  model, config = models.load_pretrained(tmp_path / "hf")
  ids, mask = padded_batch(2, 8, "right")
  real = mask.astype(bool)
  base = _logits(model, ids, mask)

  lora_config = models.LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
  models.apply_lora(model, lora_config, rngs=nnx.Rngs(2), b_init=nnx.initializers.normal(0.2))
  adapted = _logits(model, ids, mask)
  assert np.abs(adapted - base)[real].max() > 1e-2  # adapters really act

  # Export merges on the fly; transformers sees the adapted model.
  models.save_pretrained(model, config, tmp_path / "merged")
  hf_merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert np.abs(torch_logits(hf_merged, ids, mask) - adapted)[real].max() <= 1e-4

  models.merge_lora(model)
  assert _count_lora(model) == 0
  assert np.abs(_logits(model, ids, mask) - adapted)[real].max() <= 1e-5


def test_unknown_target_is_rejected(tmp_path):
  save_hf_model("gpt2-default", tmp_path)
  model, _ = models.load_pretrained(tmp_path)
  with pytest.raises(ValueError, match="gate_proj"):
    models.apply_lora(model, models.LoRAConfig(targets=("gate_proj",)), rngs=nnx.Rngs(0))


def test_optax_partition_trains_only_adapters(tmp_path):
  save_hf_model("llama-gqa-tied-bias-theta", tmp_path)
  model, _ = models.load_pretrained(tmp_path)
  models.apply_lora(model, models.LoRAConfig(rank=4, targets=ALL_PROJECTIONS), rngs=nnx.Rngs(0))
  ids, mask = padded_batch(2, 8, "right")
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)

  params = nnx.state(model, nnx.Param)
  mask_tree = models.lora_mask(params)
  flat_mask = jax.tree.leaves(mask_tree)
  assert 0 < sum(flat_mask) < len(flat_mask)
  assert sum(flat_mask) == _count_lora(model)

  tx = optax.multi_transform(
    {"lora": optax.adam(1e-2), "frozen": optax.set_to_zero()}, models.lora_labels
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(m):
    logits = m(ids, mask)
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(log_probs, ids[:, 1:, None], -1)[..., 0]
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()

  @nnx.jit
  def step(m, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    opt.update(m, grads)
    return loss

  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  losses = [float(step(model, optimizer)) for _ in range(5)]
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  assert losses[-1] < losses[0]
  for is_lora, old, new in zip(flat_mask, jax.tree.leaves(before), jax.tree.leaves(after)):
    if is_lora:
      continue
    np.testing.assert_array_equal(old, new)
  lora_changed = [
    not np.array_equal(o, n)
    for m_, o, n in zip(flat_mask, jax.tree.leaves(before), jax.tree.leaves(after))
    if m_
  ]
  assert any(lora_changed)


def test_adapter_dropout_only_in_train_mode(tmp_path):
  save_hf_model("phi-half-rotary", tmp_path)
  model, _ = models.load_pretrained(tmp_path)
  models.apply_lora(
    model,
    models.LoRAConfig(rank=4, dropout=0.5),
    rngs=nnx.Rngs(0),
    b_init=nnx.initializers.normal(0.2),
  )
  ids, mask = padded_batch(1, 8, "right")
  model.eval()
  first, second = _logits(model, ids, mask), _logits(model, ids, mask)
  np.testing.assert_array_equal(first, second)
  model.train()
  assert np.abs(_logits(model, ids, mask) - first).max() > 1e-3
