"""Our Flax models against transformers' PyTorch models: logits and greedy generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_support import HF_CONFIGS, ONE_PER_FAMILY, VOCAB, padded_batch, save_hf_model, torch_logits

import models


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_match_transformers_on_right_padded_batch(name, tmp_path):
  hf_model = save_hf_model(name, tmp_path)
  ids, mask = padded_batch(batch=3, seq=12, side="right")
  expected = torch_logits(hf_model, ids, mask)

  model, config = models.load_pretrained(tmp_path, dtype=jnp.float32)
  forward = jax.jit(lambda m, i, a: m(i, a))
  got = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))

  assert config.model_type == hf_model.config.model_type
  assert got.shape == expected.shape
  real = mask.astype(bool)
  assert np.abs(got[real] - expected[real]).max() <= 1e-4


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_bfloat16_forward_close_to_float32(name, tmp_path):
  save_hf_model(name, tmp_path)
  ids, mask = padded_batch(batch=2, seq=8, side="right")
  model32, _ = models.load_pretrained(tmp_path)
  model16, config16 = models.load_pretrained(tmp_path, dtype=jnp.bfloat16)
  assert config16.dtype == jnp.bfloat16 and config16.param_dtype == jnp.bfloat16
  assert model16.embed.embedding[...].dtype == jnp.bfloat16
  logits32 = np.asarray(model32(jnp.asarray(ids), jnp.asarray(mask)))
  logits16 = np.asarray(model16(jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert np.isfinite(logits16).all()
  # bf16 has ~3 significant digits; logits here are O(1).
  assert np.abs(logits16[real] - logits32[real]).max() < 0.25
  assert np.abs(logits16[real] - logits32[real]).max() > 0  # really ran in bf16


def _hf_generate(hf_model, ids, mask, eos, pad, max_new_tokens):
  with torch.no_grad():
    out = hf_model.generate(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      max_new_tokens=max_new_tokens,
      do_sample=False,
      eos_token_id=eos,
      pad_token_id=pad,
    )
  return out[:, ids.shape[1] :].numpy()


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_greedy_generation_matches_transformers(name, tmp_path):
  hf_model = save_hf_model(name, tmp_path)
  model, _ = models.load_pretrained(tmp_path)
  ids, mask = padded_batch(batch=3, seq=7, side="left", seed=1)
  pad, new = 0, 20

  # First without an EOS (ids >= 3 and VOCAB-1 rarely win), then with a token
  # row 0 really produces, so stopping and post-EOS padding are exercised.
  no_eos = np.asarray(
    models.generate(model, ids, mask, max_new_tokens=new, eos_token_id=VOCAB + 1, pad_token_id=pad)
  )
  expected = _hf_generate(hf_model, ids, mask, VOCAB + 1, pad, new)
  np.testing.assert_array_equal(no_eos, expected)

  eos = int(no_eos[0, 5])
  got = np.asarray(
    models.generate(model, ids, mask, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad)
  )
  expected = _hf_generate(hf_model, ids, mask, eos, pad, new)
  # HF stops early once every row is done; our buffer is padded to `new`.
  np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)
  assert (got[:, expected.shape[1] :] == pad).all()
  first_eos = int(np.argmax(got[0] == eos))
  assert first_eos <= 5 and (got[0, first_eos + 1 :] == pad).all()


def _torch_loss_and_grads(hf_model, ids, mask):
  hf_model.zero_grad(set_to_none=True)
  logits = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
  token_loss = torch.nn.functional.cross_entropy(
    logits[:, :-1].reshape(-1, logits.shape[-1]),
    torch.from_numpy(ids[:, 1:]).reshape(-1),
    reduction="none",
  )
  weights = torch.from_numpy(mask[:, 1:].reshape(-1).astype(np.float32))
  loss = (token_loss * weights).sum() / weights.sum()
  loss.backward()
  return loss.item(), {n: p.grad.numpy() for n, p in hf_model.named_parameters()}


def _check_gradients_match_transformers(name, tmp_path, remat):
  # The fused projections and the hand-written LayerNorm backward must give
  # the gradients PyTorch autograd gives, for every parameter.
  hf_model = save_hf_model(name, tmp_path)
  ids, mask = padded_batch(batch=3, seq=12, side="right")
  expected_loss, expected = _torch_loss_and_grads(hf_model, ids, mask)

  model, config = models.load_pretrained(tmp_path, dtype=jnp.float32)
  model.set_remat(remat)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params, rest)(jnp.asarray(ids), jnp.asarray(mask))
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    token_loss = -jnp.take_along_axis(log_probs, jnp.asarray(ids[:, 1:, None]), -1)[..., 0]
    weights = jnp.asarray(mask[:, 1:], jnp.float32)
    return (token_loss * weights).sum() / weights.sum()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  got = models.export_tensors(nnx.merge(graphdef, grads, rest), config)

  assert abs(float(loss) - expected_loss) <= 1e-5
  assert set(got) == set(expected)
  for hf_name, grad in expected.items():
    scale = max(np.abs(grad).max(), 1e-3)
    assert np.abs(np.asarray(got[hf_name]) - grad).max() <= 1e-4 * scale, hf_name


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_gradients_match_transformers(name, tmp_path):
  _check_gradients_match_transformers(name, tmp_path, "none")


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_gradients_with_remat_match_transformers(name, remat, tmp_path):
  # Rematerialized blocks (a custom_vjp around jax.checkpoint, around the
  # hand-written matmul/attention/norm backward passes) change nothing.
  _check_gradients_match_transformers(name, tmp_path, remat)
