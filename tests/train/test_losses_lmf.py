"""LMF, the logit-margin flattening forget loss (train/losses/forget.py ``lmf_loss``).

Checked against a float64 NumPy loop written from the docstring's formula, then property by
property: zero exactly at equal logits, shift invariance, a gradient that grows with the
peak (where the entropy's vanishes and ME's saturates), masking, empty batches, bf16, and
the plumbing through the spec and the model-level losses.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_lm import bag_logits_fn, bag_params

from train import losses as L

B, T, V = 3, 6, 7
IGN = L.IGNORE_INDEX
# Row 0: prompt, 3 answer tokens, 1 pad. Row 1: answer from position 1. Row 2: fully masked.
LABELS = np.array(
  [[IGN, IGN, 3, 1, 5, IGN], [IGN, 2, 4, 0, 6, 1], [IGN, IGN, IGN, IGN, IGN, IGN]], np.int32
)
# Positions t whose next label is scored: [B, T-1].
SCORED = LABELS[:, 1:] != IGN
TOL = dict(rtol=2e-5, atol=2e-6)


def _logits(seed, shape=(B, T, V), scale=2.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def np_flat(logits, labels):
  """``sum_{b,t} m_bt (1/V) sum_v (z_v - mean z)^2 / max(sum m, 1)``, loop by loop."""
  x = np.asarray(logits, np.float64)
  terms = []
  for b in range(labels.shape[0]):
    for t in range(labels.shape[1] - 1):
      if labels[b, t + 1] != IGN:
        z = x[b, t]
        mean = sum(z) / len(z)
        terms.append(sum((v - mean) ** 2 for v in z) / len(z))
  return sum(terms) / max(len(terms), 1)


def _entropy(z):
  lp = jax.nn.log_softmax(z, axis=-1)
  return -jnp.sum(jnp.exp(lp) * lp)


def _peaked(margin, vocab=8):
  """One scored position whose first logit is ``margin`` above the other ``vocab - 1``."""
  z = jnp.zeros((1, 2, vocab), jnp.float32).at[0, 0, 0].set(margin)
  return z, np.array([[IGN, 1]], np.int32)


# ------------------------------------------------------------------ value


def test_matches_numpy_and_is_positive():
  logits = _logits(0)
  value = L.lmf_loss(logits, LABELS)
  np.testing.assert_allclose(value, np_flat(logits, LABELS), **TOL)
  assert value.dtype == jnp.float32 and float(value) > 0


def test_large_common_offset_is_accurate():
  # Logits around 1e4 with a spread of ~1: mean(z^2) - mean^2 in float32 would be off by
  # units; the centred form keeps float32 accuracy.
  logits = (1e4 + _logits(1, scale=1.0)).astype(np.float32)
  np.testing.assert_allclose(L.lmf_loss(logits, LABELS), np_flat(logits, LABELS), rtol=1e-5)


def test_zero_exactly_at_equal_logits_positive_otherwise():
  # A different constant at every position, including non-dyadic ones.
  consts = np.random.default_rng(2).uniform(-30, 30, (B, T, 1)).astype(np.float32)
  equal = jnp.broadcast_to(jnp.asarray(consts), (B, T, V))
  value, grad = jax.value_and_grad(L.lmf_loss)(equal, LABELS)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)
  # Make exactly one scored position non-constant, by a tiny amount: strictly positive.
  for b, t in zip(*np.nonzero(SCORED)):
    bumped = equal.at[b, t, V - 1].add(1e-2)
    assert float(L.lmf_loss(bumped, LABELS)) > 0, (b, t)


def test_invariant_to_adding_a_constant():
  logits = _logits(3)
  base = L.lmf_loss(logits, LABELS)
  per_position = np.random.default_rng(4).uniform(-50, 50, (B, T, 1)).astype(np.float32)
  np.testing.assert_allclose(L.lmf_loss(logits + per_position, LABELS), base, rtol=1e-4)
  np.testing.assert_allclose(L.lmf_loss(logits + np.float32(37.5), LABELS), base, rtol=1e-5)
  # And the gradient is orthogonal to the all-ones direction at every position.
  grad = jax.grad(L.lmf_loss)(jnp.asarray(logits), LABELS)
  np.testing.assert_allclose(np.sum(grad, axis=-1), 0.0, atol=1e-6)


def test_bf16_logits_give_the_float32_value():
  bf16 = jnp.asarray(_logits(5, scale=4.0), jnp.bfloat16)
  value = L.lmf_loss(bf16, LABELS)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, L.lmf_loss(bf16.astype(jnp.float32), LABELS), rtol=1e-6)
  np.testing.assert_allclose(value, np_flat(np.asarray(bf16, np.float32), LABELS), **TOL)


# ------------------------------------------------------------------ gradient


def test_gradient_is_the_centred_logits():
  logits = jnp.asarray(_logits(6))
  grad = jax.grad(L.lmf_loss)(logits, LABELS)
  z = np.asarray(logits, np.float64)[:, :-1]
  expected = (2.0 / V) * (z - z.mean(-1, keepdims=True)) * SCORED[..., None] / SCORED.sum()
  np.testing.assert_allclose(grad[:, :-1], expected, rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(grad[:, -1]) == 0.0)  # the last position predicts nothing


def test_peaked_gradient_grows_where_entropy_vanishes_and_me_saturates():
  """At a sharp peak LMF's gradient grows linearly with the margin; the entropy's vanishes
  (exponentially) and ME's, ``softmax(z) - 1/V``, tends to a constant below norm 1."""
  norms = {}
  for margin in (10.0, 50.0):
    z, labels = _peaked(margin)
    g_flat = jax.grad(L.lmf_loss)(z, labels)
    g_me = jax.grad(L.me_loss)(z, labels)
    g_ent = jax.grad(lambda a: _entropy(a[0, 0]))(z)
    for g in (g_flat, g_me, g_ent):
      assert np.all(np.isfinite(g))
    norms[margin] = [float(jnp.linalg.norm(g)) for g in (g_flat, g_me, g_ent)]
  (flat10, me10, ent10), (flat50, me50, ent50) = norms[10.0], norms[50.0]
  vocab = 8
  # LMF: (2/V)(z - mean) exactly, so the norm is 2 M sqrt(V - 1) / V^(3/2): linear in M.
  np.testing.assert_allclose(flat50, 2 * 50 * math.sqrt(vocab - 1) / vocab**1.5, rtol=1e-5)
  np.testing.assert_allclose(flat50 / flat10, 5.0, rtol=1e-5)
  # ME: does not vanish, but does not grow either; bounded by sqrt(1 - 1/V).
  limit = math.sqrt(1 - 1 / vocab)
  assert 0.99 * limit < me10 <= me50 <= limit + 1e-6
  # Entropy: already tiny at a margin of 10 and vanished at 50.
  assert ent10 < 1e-2 and ent50 < 1e-15
  assert flat50 > 1e15 * ent50


def test_a_descent_step_raises_the_entropy():
  """Descending LMF shrinks every position's centred logits, i.e. raises the softmax
  temperature, so each scored prediction gets closer to uniform."""
  logits = jnp.asarray(_logits(7))
  grad = jax.grad(L.lmf_loss)(logits, LABELS)
  stepped = logits - 0.5 * grad
  ent = jax.vmap(jax.vmap(_entropy))
  before, after = ent(logits[:, :-1]), ent(stepped[:, :-1])
  assert np.all(np.asarray(after - before)[SCORED] > 0)
  np.testing.assert_array_equal(np.asarray(after)[~SCORED], np.asarray(before)[~SCORED])
  assert float(L.me_loss(stepped, LABELS)) < float(L.me_loss(logits, LABELS))


# ------------------------------------------------------------------ masking


def test_unscored_positions_do_not_contribute():
  logits = _logits(8)
  noise = 100.0 * np.random.default_rng(9).standard_normal(logits.shape).astype(np.float32)
  unscored = np.ones((B, T), bool)
  unscored[:, :-1] = ~SCORED  # prompt, padding, the masked row and the last position
  changed = np.where(unscored[..., None], logits + noise, logits)
  np.testing.assert_allclose(L.lmf_loss(changed, LABELS), L.lmf_loss(logits, LABELS), **TOL)
  grad = jax.grad(L.lmf_loss)(jnp.asarray(logits), LABELS)
  assert np.all(np.asarray(grad)[unscored] == 0.0)
  # Label values do not matter, only which are -100.
  other = np.where(LABELS == IGN, IGN, (LABELS + 3) % V)
  np.testing.assert_array_equal(L.lmf_loss(logits, other), L.lmf_loss(logits, LABELS))


def test_batch_without_targets_is_zero_with_zero_gradient():
  labels = np.full((2, 5), IGN, np.int32)
  value, grad = jax.value_and_grad(L.lmf_loss)(jnp.asarray(_logits(10, (2, 5, V))), labels)
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0.0)


def test_shape_errors_and_batch_forms():
  with pytest.raises(ValueError, match="does not match"):
    L.lmf_loss(_logits(11), LABELS[:, :-1])
  logits = _logits(12)
  batch = L.LMBatch(jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32), LABELS)
  value = L.lmf_loss(logits, LABELS)
  np.testing.assert_array_equal(L.lmf_loss(logits, batch), value)
  np.testing.assert_array_equal(L.lmf_loss(logits, {"labels": LABELS}), value)
  np.testing.assert_allclose(jax.jit(L.lmf_loss)(logits, LABELS), value, **TOL)


# ------------------------------------------------------------------ spec and objectives


def test_spec_parses_and_needs_nothing_extra():
  assert "LMF" in L.FORGET_LOSSES and "LMF" not in L.DESCENT_FORGET_LOSSES
  assert L.parse_loss_spec("lmf+gd") == ("LMF", "GD")
  assert L.parse_loss_spec(" Lmf ") == ("LMF", None)
  for retain in ("GD", "KL", "AP", None):
    spec = "LMF" if retain is None else f"lmf + {retain.lower()}"
    config = L.LossConfig.from_spec(spec)
    assert (config.forget, config.retain) == ("LMF", retain)
    assert config.spec == ("LMF" if retain is None else f"LMF+{retain}")
    assert L.needs_reference_model(config) is (retain == "KL")
    assert L.needs_idk_batch(config, "forget") is False
    assert L.needs_idk_batch(config, "retain") is (retain == "AP")


def _params(seed):
  return bag_params(seed, V)


def _batch(labels, seed):
  ids = np.random.default_rng(seed).integers(0, V, labels.shape).astype(np.int32)
  ids = np.where(labels == IGN, ids, labels).astype(np.int32)
  mask = np.broadcast_to((np.arange(labels.shape[1]) < labels.shape[1] - 1), labels.shape)
  return L.LMBatch(jnp.asarray(ids), jnp.asarray(mask.astype(np.int32)), jnp.asarray(labels))


FORGET = _batch(LABELS, 20)
RETAIN = _batch(np.roll(LABELS, 1, axis=0), 21)
RETAIN_IDK = _batch(np.roll(LABELS[:, ::-1], 1, axis=0), 22)


def test_forget_loss_runs_flat_through_logits_fn_and_reports_metrics():
  config = L.LossConfig.from_spec("LMF+GD", forget_coeff=0.3)
  params = _params(0)
  loss, metrics = L.forget_loss(config, bag_logits_fn, params, None, FORGET)
  logits = bag_logits_fn(params, FORGET.input_ids, FORGET.attention_mask)
  direct = L.lmf_loss(logits, FORGET)
  np.testing.assert_allclose(loss, 0.3 * direct, **TOL)
  assert set(metrics) == {"forget/loss", "forget/LMF", "forget/nll", "forget/tokens"}
  np.testing.assert_allclose(metrics["forget/LMF"], direct, **TOL)
  np.testing.assert_allclose(metrics["forget/loss"], loss, **TOL)
  np.testing.assert_allclose(metrics["forget/nll"], L.mean_token_nll(logits, FORGET), **TOL)
  assert float(metrics["forget/tokens"]) == SCORED.sum()
  loss_j, metrics_j = jax.jit(L.forget_loss, static_argnums=(0, 1))(
    config, bag_logits_fn, params, None, FORGET
  )
  np.testing.assert_allclose(loss_j, loss, **TOL)
  assert set(metrics_j) == set(metrics)
  grads = jax.grad(lambda p: L.forget_loss(config, bag_logits_fn, p, None, FORGET)[0])(params)
  assert all(np.all(np.isfinite(g)) and np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("spec", ["LMF", "LMF+GD", "LMF+KL", "LMF+AP"])
def test_combined_loss_with_every_retain(spec):
  config = L.LossConfig.from_spec(spec)
  params, ref = _params(1), _params(2)
  loss, metrics = L.combined_loss(
    config, bag_logits_fn, params, ref, FORGET, RETAIN, None, RETAIN_IDK
  )
  f, _ = L.forget_loss(config, bag_logits_fn, params, ref, FORGET)
  expected = f
  if config.retain is not None:
    r, _ = L.retain_loss(config, bag_logits_fn, params, ref, RETAIN, RETAIN_IDK)
    expected = f + r
    assert f"retain/{config.retain}" in metrics
  np.testing.assert_allclose(loss, expected, **TOL)
  assert "forget/LMF" in metrics and np.isfinite(float(loss))
