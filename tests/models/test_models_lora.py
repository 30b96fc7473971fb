"""LoRA adapters: identity at init, merging, export to transformers, training only adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx
from hf_support import HF_CONFIGS, ONE_PER_FAMILY, padded_batch, save_hf_model, torch_logits

import models
from models.lora import LoRAAdapter, draw_dropout_masks

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


def _adapted_llama(num_layers=2, dropout=0.25):
  hf = HF_CONFIGS["llama-mha-untied"]()
  hf.num_hidden_layers = num_layers
  model = models.CausalLM(models.ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
  lora = models.LoRAConfig(rank=2, dropout=dropout, targets=ALL_PROJECTIONS)
  models.apply_lora(model, lora, rngs=nnx.Rngs(1), b_init=nnx.initializers.normal(0.2))
  return model


def _adapters(model):
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, LoRAAdapter)]


def _keep(adapter):
  """An adapter's drawn mask, unpacked (8 bits to a byte, little-endian)."""
  packed = np.asarray(adapter.dropout_mask.get_value())
  assert packed.dtype == np.uint8
  width = adapter.a.shape[0]
  return np.unpackbits(packed, axis=-1, count=width, bitorder="little").astype(bool)


def test_drawn_dropout_masks_are_per_adapter_and_a_function_of_the_key():
  model = _adapted_llama(dropout=0.25)
  ids, mask = padded_batch(2, 8, "right")

  def draw(seed):
    draw_dropout_masks(model, jax.random.key(seed), ids.shape)
    return [_keep(adapter) for adapter in _adapters(model)]

  first, again, other = draw(0), draw(0), draw(1)
  adapters = _adapters(model)
  assert len(first) == 14
  for adapter, keep in zip(adapters, first):
    assert keep.shape == (*ids.shape, adapter.a.shape[0])
  for a, b, c in zip(first, again, other):
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
  # Each adapter its own mask (q/k/v and gate/up see the same input).
  columns = [keep[..., :64].ravel() for keep in first]
  assert len({c.tobytes() for c in columns}) == len(columns)
  dropped = 1.0 - np.concatenate([keep.ravel() for keep in first]).mean()
  assert abs(dropped - 0.25) < 0.03  # ~8500 draws: 5 standard deviations

  # The adapter applies its mask (kept inputs scaled by 1 / (1 - rate)) until redrawn.
  adapter = adapters[0]
  x = jax.random.normal(jax.random.key(5), (*ids.shape, adapter.a.shape[0]))
  dropped_x = np.where(first[0], np.asarray(x) / 0.75, 0.0)
  expected = dropped_x @ np.asarray(adapter.a[...]) @ np.asarray(adapter.b[...]) * adapter.scaling
  draw(0)
  np.testing.assert_allclose(adapter(x), expected, rtol=1e-5, atol=1e-6)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  np.testing.assert_array_equal(model(ids, mask), model(ids, mask))
  eval_logits = nnx.view(model, deterministic=True)(ids, mask)
  assert np.abs(model(ids, mask) - eval_logits).max() > 1e-3


def test_evaluation_mode_draws_no_masks():
  model = _adapted_llama()
  ids, mask = padded_batch(2, 8, "right")
  evaluation = nnx.view(model, deterministic=True)
  draw_dropout_masks(evaluation, jax.random.key(0), ids.shape)
  assert all(adapter.dropout_mask is None for adapter in _adapters(evaluation))
  no_dropout = _adapted_llama(dropout=0.0)
  draw_dropout_masks(no_dropout, jax.random.key(0), ids.shape)
  assert all(adapter.dropout_mask is None for adapter in _adapters(no_dropout))


def _random_ops(num_layers):
  """Counts of random-bit generators and threefry hashes in a training forward and
  backward pass with masks drawn by `draw_dropout_masks`."""
  graphdef, params, rest = nnx.split(_adapted_llama(num_layers), models.LoRAParam, ...)
  ids = jnp.zeros((2, 8), jnp.int32)

  def loss(params, key):
    model = nnx.merge(graphdef, params, rest, copy=True)
    draw_dropout_masks(model, key, ids.shape)
    return model(ids).sum()

  text = jax.jit(jax.grad(loss)).lower(params, jax.random.key(0)).as_text()
  return text.count("stablehlo.rng_bit_generator"), text.count("call @threefry")


def test_masks_are_one_random_bits_call_however_many_adapters():
  # XLA:CPU compiles a threefry loop (and a Philox expansion) per random call: per-adapter
  # draws made a 420-adapter step compile 5-7x slower than without dropout.
  one_layer, three_layers = _random_ops(1), _random_ops(3)
  assert one_layer == three_layers
  assert one_layer[0] == 1


def test_drawn_masks_follow_each_adapters_rate():
  hf = HF_CONFIGS["llama-mha-untied"]()
  model = models.CausalLM(models.ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
  for rate, targets in ((0.5, ("q_proj",)), (0.1, ("up_proj", "down_proj"))):
    models.apply_lora(model, models.LoRAConfig(dropout=rate, targets=targets), nnx.Rngs(1))
  draw_dropout_masks(model, jax.random.key(0), (4, 16))
  dropped = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, LoRAAdapter):
      dropped.setdefault(path[-2], []).append(1.0 - _keep(node).mean())
  assert np.allclose(dropped["q_proj"], 0.5, atol=0.05)  # 4096 draws per adapter
  assert np.allclose(dropped["up_proj"] + dropped["down_proj"], 0.1, atol=0.03)


def test_masks_of_widths_not_a_multiple_of_eight():
  from models.layers import Dense

  class Projections(nnx.Module):
    def __init__(self, rngs):
      kw = dict(use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
      self.q_proj = Dense(12, 5, ("embed", "heads"), **kw)
      self.v_proj = Dense(3, 5, ("embed", "heads"), **kw)

  model = Projections(nnx.Rngs(0))
  lora = models.LoRAConfig(rank=2, dropout=0.5, targets=("q_proj", "v_proj"))
  models.apply_lora(model, lora, nnx.Rngs(1), b_init=nnx.initializers.normal(0.5))
  draw_dropout_masks(model, jax.random.key(0), (6,))
  for dense in (model.q_proj, model.v_proj):
    adapter = dense.lora
    keep = _keep(adapter)
    assert keep.shape == (6, adapter.a.shape[0]) and 0 < keep.sum() < keep.size
    x = jax.random.normal(jax.random.key(1), keep.shape)
    expected = np.where(keep, np.asarray(x) * 2.0, 0.0) @ adapter.a[...] @ adapter.b[...]
    np.testing.assert_allclose(adapter(x), expected * adapter.scaling, rtol=1e-5, atol=1e-6)
