"""Rematerialization (`ModelConfig.remat`) and bfloat16 models: same numbers, less memory.

Tiny random HF models (hf_support) for the exact checks; SmolLM2-135M-Instruct's GGUF
(session fixture `smollm2_gguf`, skipped when unavailable) for loading and training a
real model in bfloat16.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_support import HF_CONFIGS, ONE_PER_FAMILY, padded_batch, save_hf_model

import dualoptax
import models

# XLA:CPU's scheduler for train's steps (train.runtime.compiler); the default one is the
# concurrency-optimized scheduler.
MEMORY_OPTIMIZED = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def _loss_fn(graphdef, rest, ids, mask):
  """Mean next-token cross-entropy over real tokens, as a function of the parameters."""

  def loss_fn(params):
    logits = nnx.merge(graphdef, params, rest)(ids, mask)
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    token_loss = -jnp.take_along_axis(log_probs, ids[:, 1:, None], -1)[..., 0]
    weights = mask[:, 1:].astype(jnp.float32)
    return (token_loss * weights).sum() / weights.sum()

  return loss_fn


def _loss_and_grads(model, ids, mask, compiler_options=None):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  step = jax.jit(jax.value_and_grad(_loss_fn(graphdef, rest, ids, mask)))
  compiled = step.lower(params).compile(compiler_options=compiler_options)
  loss, grads = compiled(params)
  return float(loss), grads, compiled.memory_analysis().temp_size_in_bytes


def _batch(batch=3, seq=12):
  ids, mask = padded_batch(batch=batch, seq=seq, side="right")
  return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def _relative_l2(got, expected) -> float:
  pairs = zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
  squares = [
    (float(jnp.sum((a.astype(jnp.float32) - b) ** 2)), float(jnp.sum(b.astype(jnp.float32) ** 2)))
    for a, b in pairs
  ]
  return (sum(d for d, _ in squares) / sum(n for _, n in squares)) ** 0.5


def test_remat_is_validated_and_a_hashable_static_field():
  config = models.ModelConfig.from_hf(HF_CONFIGS["llama-mha-untied"]())
  assert config.remat == "none"
  with pytest.raises(ValueError, match=r"remat=.partial."):
    config.replace(remat="partial")
  with pytest.raises(ValueError, match=r"remat=True"):
    dataclasses.replace(config, remat=True)
  full = config.replace(remat="full")
  assert full != config and hash(full) != hash(config)  # a different compiled program
  assert full == config.replace(remat="full") and hash(full) == hash(config.replace(remat="full"))
  model = models.CausalLM(config, rngs=nnx.Rngs(0))
  model.set_remat("dots")
  assert model.config.remat == "dots" and model.config.replace(remat="none") == config
  with pytest.raises(ValueError, match="remat"):
    model.set_remat("everything")


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_remat_gives_the_same_loss_gradients_and_logits(name, tmp_path):
  save_hf_model(name, tmp_path)
  ids, mask = _batch()
  model, _ = models.load_pretrained(tmp_path)
  loss, grads, _ = _loss_and_grads(model, ids, mask)
  logits = jax.jit(lambda m: m(ids, mask))(model)
  for remat in ("full", "dots"):
    model.set_remat(remat)
    remat_loss, remat_grads, _ = _loss_and_grads(model, ids, mask)
    assert abs(remat_loss - loss) <= 1e-6 * abs(loss), remat
    for got, expected in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
      scale = max(float(jnp.abs(expected).max()), 1e-3)
      assert float(jnp.abs(got - expected).max()) <= 1e-6 * scale + 1e-8, remat
    np.testing.assert_array_equal(jax.jit(lambda m: m(ids, mask))(model), logits)


def test_remat_keeps_lora_dropout_masks_and_advances_rng_counts():
  # NNX-style training (the module is mutated): the recomputation must see the
  # dropout masks of the forward pass, and the RNG counts must still advance.
  ids, mask = _batch()
  runs = {}
  for remat in ("none", "full", "dots"):
    config = models.ModelConfig.from_hf(HF_CONFIGS["llama-mha-untied"]()).replace(remat=remat)
    model = models.CausalLM(config, rngs=nnx.Rngs(0))
    lora = models.LoRAConfig(rank=2, dropout=0.5, targets=("q_proj", "up_proj"))
    models.apply_lora(model, lora, nnx.Rngs(1), b_init=nnx.initializers.normal(0.1))
    model.train()

    def loss_fn(model):
      log_probs = jax.nn.log_softmax(model(ids, mask)[:, :-1])
      return -jnp.take_along_axis(log_probs, ids[:, 1:, None], -1).mean()

    step = nnx.jit(nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, models.LoRAParam)))
    steps = [step(model) for _ in range(2)]
    counts = [int(c) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))]
    runs[remat] = steps, counts
  (first, second), counts = runs["none"]
  assert first[0] != second[0] and counts == [2] * len(counts)  # new masks each step
  for remat in ("full", "dots"):
    steps, remat_counts = runs[remat]
    assert remat_counts == counts
    for (loss, grads), (expected_loss, expected_grads) in zip(steps, (first, second)):
      assert abs(float(loss) - float(expected_loss)) <= 1e-6 * abs(float(expected_loss))
      for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        assert float(jnp.abs(got - expected).max()) <= 1e-6 * float(jnp.abs(expected).max())


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_remat_lowers_peak_memory_under_both_xla_cpu_schedulers(name):
  config = models.ModelConfig.from_hf(HF_CONFIGS[name]()).replace(num_layers=4)
  model = models.CausalLM(config, rngs=nnx.Rngs(0))
  ids, mask = _batch(batch=4, seq=128)
  # Measured temp bytes / no remat, default scheduler: full 0.34-0.42, dots 0.47-0.53;
  # memory-optimized scheduler: full and dots 0.59-0.68.
  for options, bound in ((None, 0.6), (MEMORY_OPTIMIZED, 0.75)):
    temp = {}
    for remat in ("none", "full", "dots"):
      model.set_remat(remat)
      temp[remat] = _loss_and_grads(model, ids, mask, options)[2]
    assert temp["full"] < bound * temp["none"], (options, temp)
    assert temp["dots"] < bound * temp["none"], (options, temp)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_bfloat16_loss_and_gradients_close_to_float32(name, tmp_path):
  save_hf_model(name, tmp_path)
  ids, mask = _batch()
  model32, _ = models.load_pretrained(tmp_path)
  loss32, grads32, _ = _loss_and_grads(model32, ids, mask)
  for param_dtype in (jnp.bfloat16, jnp.float32):  # pure bf16, and float32 master weights
    model, config = models.load_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=param_dtype)
    assert config.dtype == jnp.bfloat16 and config.param_dtype == param_dtype
    loss, grads, _ = _loss_and_grads(model, ids, mask)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(param_dtype)}
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    # Measured: loss within 5e-3, gradients within 3 % (relative L2) of float32's.
    assert 0 < abs(loss - loss32) < 0.02 * loss32
    assert _relative_l2(grads, grads32) < 0.08


@pytest.mark.parametrize("name", ["llama-gqa-tied-bias-theta", "phi-half-rotary"])
def test_bfloat16_logits_are_float32_never_rounded_to_bfloat16(name, tmp_path):
  # Tied (embedding) and untied (Dense, with Phi's bias) LM heads.
  save_hf_model(name, tmp_path)
  ids, mask = _batch()
  model, _ = models.load_pretrained(tmp_path, dtype=jnp.bfloat16)
  logits = jax.jit(lambda m: m(ids, mask))(model)
  assert logits.dtype == jnp.float32
  # Accumulated and returned in float32: most logits are not bfloat16 numbers.
  rounded = logits.astype(jnp.bfloat16).astype(jnp.float32)
  assert float(jnp.mean(rounded != logits)) > 0.9


def test_dualoptax_keeps_float32_moments_for_bfloat16_params(tmp_path):
  save_hf_model("llama-mha-untied", tmp_path)
  ids, mask = _batch()
  model, _ = models.load_pretrained(tmp_path, dtype=jnp.bfloat16)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads = jax.grad(_loss_fn(graphdef, rest, ids, mask))(params)
  num_params = len(jax.tree.leaves(params))
  for tx in (dualoptax.dualoptim(1e-2), dualoptax.dualoptim_plus(1e-2)):
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, objective=dualoptax.FORGET)
    moments = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(moments) >= 2 * num_params  # at least a first and a second moment each
    assert {m.dtype for m in moments if m.ndim > 0} == {jnp.dtype(jnp.float32)}
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}


TEXT = (
  "The sky looks blue during the day because air molecules scatter short wavelengths of "
  "sunlight more strongly than long ones, so blue light reaches our eyes from every "
  "direction of the sky."
)


def test_smollm2_trains_in_bfloat16(smollm2_gguf):
  tokens = models.load_tokenizer(smollm2_gguf)(TEXT)["input_ids"][:32]
  ids = jnp.asarray([tokens, tokens[::-1]], jnp.int32)
  mask = jnp.ones(ids.shape, jnp.int32)
  model16, config16 = models.load_pretrained(smollm2_gguf, dtype=jnp.bfloat16)
  assert config16.dtype == jnp.bfloat16 and config16.param_dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model16, nnx.Param))} == {
    jnp.dtype(jnp.bfloat16)
  }
  model16.set_remat("full")
  loss16, grads16, _ = _loss_and_grads(model16, ids, mask)
  del model16
  model32, _ = models.load_pretrained(smollm2_gguf)
  loss32, grads32, _ = _loss_and_grads(model32, ids, mask)
  assert np.isfinite(loss16) and all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads16))
  assert abs(loss16 - loss32) < 0.02 * loss32, (loss16, loss32)
  assert _relative_l2(grads16, grads32) < 0.15
