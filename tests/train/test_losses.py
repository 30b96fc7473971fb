"""Unlearning losses (train/losses/) against direct float64 NumPy computations.

Every reference below is written out loop by loop from the formula in the loss's docstring,
on tiny random logits with hand-built label masks (prompt tokens, padding, a fully-masked
row), so a wrong shift, mask, reduction or sign shows up as a mismatch.
"""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_lm import bag_logits_fn, bag_params

from train import losses as L

B, T, V = 3, 6, 7
IGN = L.IGNORE_INDEX
# Row 0: 2 prompt tokens, 3 answer tokens, 1 pad. Row 1: answer from position 1 on.
# Row 2: fully masked (e.g. a dummy row padding the batch to a fixed size).
LABELS = np.array(
  [[IGN, IGN, 3, 1, 5, IGN], [IGN, 2, 4, 0, 6, 1], [IGN, IGN, IGN, IGN, IGN, IGN]], np.int32
)
# IDK answers to the same questions: different lengths; row 1 fully masked this time, so
# the only row valid in BOTH batches is row 0.
IDK_LABELS = np.array(
  [[IGN, IGN, IGN, 6, 2, IGN], [IGN, IGN, IGN, IGN, IGN, IGN], [IGN, 1, 1, 3, IGN, IGN]], np.int32
)
ATTENTION = np.array([[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 0, 0, 0]], np.int32)
TOL = dict(rtol=2e-5, atol=2e-5)


def _logits(seed, shape=(B, T, V), scale=2.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------ direct NumPy references


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    row = x[idx]
    out[idx] = row - (row.max() + math.log(sum(math.exp(v - row.max()) for v in row)))
  return out


def np_token_nlls(logits, labels):
  """List per row of the NLLs of its target tokens (position t predicts labels[t+1])."""
  lp = np_log_softmax(logits)
  rows = []
  for b in range(labels.shape[0]):
    rows.append(
      [-lp[b, t, labels[b, t + 1]] for t in range(labels.shape[1] - 1) if labels[b, t + 1] != IGN]
    )
  return rows


def np_seq_nll(logits, labels):
  return np.array([sum(r) for r in np_token_nlls(logits, labels)])


def np_counts(labels):
  return np.array(
    [
      len([1 for t in range(1, labels.shape[1]) if labels[b, t] != IGN])
      for b in range(labels.shape[0])
    ]
  )


def np_mean_token_nll(logits, labels):
  rows = np_token_nlls(logits, labels)
  n = sum(len(r) for r in rows)
  return sum(sum(r) for r in rows) / max(n, 1)


def np_log_sigmoid(x):
  return np.log(1.0 / (1.0 + np.exp(-np.asarray(x, np.float64))))


def np_valid_mean(values, valid):
  vals = [v for v, ok in zip(values, valid) if ok]
  return sum(vals) / max(len(vals), 1)


# ------------------------------------------------------------------ primitives


def test_sequence_nll_and_counts_match_numpy():
  logits = _logits(0)
  np.testing.assert_allclose(L.sequence_nll(logits, LABELS), np_seq_nll(logits, LABELS), **TOL)
  np.testing.assert_array_equal(L.token_counts(LABELS), [3, 5, 0])
  np.testing.assert_array_equal(L.token_counts(LABELS), np_counts(LABELS))
  np.testing.assert_allclose(
    L.mean_token_nll(logits, LABELS), np_mean_token_nll(logits, LABELS), **TOL
  )
  assert float(L.sequence_nll(logits, LABELS)[2]) == 0.0


def test_batch_forms_are_equivalent():
  logits = _logits(1)
  ids = np.where(LABELS == IGN, 0, LABELS)
  as_dict = {"input_ids": ids, "attention_mask": ATTENTION, "labels": LABELS}
  as_batch = L.LMBatch(ids, ATTENTION, LABELS)
  for form in (LABELS, as_dict, as_batch):
    np.testing.assert_allclose(L.sequence_nll(logits, form), np_seq_nll(logits, LABELS), **TOL)
  with pytest.raises(ValueError, match="'labels'"):
    L.as_batch({"input_ids": ids, "attention_mask": ATTENTION})


def test_labels_from_target_mask():
  ids = np.arange(12, dtype=np.int32).reshape(2, 6)
  mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(
    L.labels_from_target_mask(ids, mask), [[IGN, IGN, 2, 3, IGN, IGN], [IGN, 7, 8, 9, 10, 11]]
  )


def test_shape_errors_name_the_shapes():
  with pytest.raises(ValueError, match=r"\(3, 5\).*\(3, 6, 7\)"):
    L.sequence_nll(_logits(0), LABELS[:, :5])
  with pytest.raises(ValueError, match=r"\[B, T, V\]"):
    L.sequence_nll(_logits(0)[0], LABELS)


def test_bf16_logits_are_scored_in_float32():
  logits = jnp.asarray(_logits(2), jnp.bfloat16)
  upcast = np.asarray(logits.astype(jnp.float32))
  out = L.sequence_nll(logits, LABELS)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_seq_nll(upcast, LABELS), **TOL)
  np.testing.assert_allclose(L.me_loss(logits, LABELS), L.me_loss(upcast, LABELS), **TOL)


# ------------------------------------------------------------------ forget losses


def test_ga_gd_idk_sft_are_token_mean_nll():
  logits = _logits(3)
  expected = np_mean_token_nll(logits, LABELS)
  np.testing.assert_allclose(L.gd_loss(logits, LABELS), expected, **TOL)
  np.testing.assert_allclose(L.ga_loss(logits, LABELS), -expected, **TOL)
  # SFT descends on the forget rows' own answers (safety alignment's refusals).
  np.testing.assert_allclose(L.sft_loss(logits, LABELS), expected, **TOL)
  np.testing.assert_allclose(
    L.idk_loss(logits, IDK_LABELS), np_mean_token_nll(logits, IDK_LABELS), **TOL
  )


def test_ga_gradient_is_minus_gd_gradient():
  logits = jnp.asarray(_logits(4))
  g_ga = jax.grad(L.ga_loss)(logits, LABELS)
  g_gd = jax.grad(L.gd_loss)(logits, LABELS)
  np.testing.assert_allclose(g_ga, -g_gd, atol=1e-7)
  assert np.abs(g_gd).max() > 0
  # No gradient at all on positions without a target (prompt, padding, the empty row).
  np.testing.assert_array_equal(g_gd[2], 0.0)
  np.testing.assert_array_equal(g_gd[0, :1], 0.0)  # predicts labels[0,1] = ignored
  np.testing.assert_array_equal(g_gd[:, -1], 0.0)  # last position predicts nothing


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_matches_numpy(beta):
  logits, ref = _logits(5), _logits(6)
  d = np_seq_nll(logits, LABELS) - np_seq_nll(ref, LABELS)
  per_row = -(2.0 / beta) * np_log_sigmoid(beta * d)
  expected = np_valid_mean(per_row, np_counts(LABELS) > 0)
  np.testing.assert_allclose(L.npo_loss(logits, ref, LABELS, beta), expected, **TOL)


def test_npo_at_initialization():
  """At pi == pi_ref: log sigmoid(0) = -log 2, so L = (2/beta) log 2 for every row.

  Gradient: dL/dNLL_b = -(2/beta) * beta * (1 - sigmoid(0)) / n_valid = -1/n_valid, so
  grad L = -grad mean_valid_b NLL_b (sequence-summed gradient ascent).
  """
  beta = 0.1
  logits = jnp.asarray(_logits(7))
  np.testing.assert_allclose(
    L.npo_loss(logits, logits, LABELS, beta), 2 / beta * math.log(2), rtol=1e-6
  )
  g_npo = jax.grad(lambda x: L.npo_loss(x, logits, LABELS, beta))(logits)
  g_ga = jax.grad(lambda x: -jnp.sum(L.sequence_nll(x, LABELS)) / 2.0)(logits)  # 2 valid rows
  np.testing.assert_allclose(g_npo, g_ga, atol=1e-6)


def test_npo_no_gradient_to_reference_logits():
  logits, ref = jnp.asarray(_logits(8)), jnp.asarray(_logits(9))
  g_ref = jax.grad(lambda r: L.npo_loss(logits, r, LABELS, 0.1))(ref)
  np.testing.assert_array_equal(g_ref, 0.0)


@pytest.mark.parametrize("beta,gamma", [(2.5, 0.0), (4.5, 0.3)])
def test_simnpo_matches_numpy(beta, gamma):
  logits = _logits(10)
  counts = np_counts(LABELS)
  per_tok = np_seq_nll(logits, LABELS) / np.maximum(counts, 1)
  per_row = -(2.0 / beta) * np_log_sigmoid(beta * per_tok - gamma)
  expected = np_valid_mean(per_row, counts > 0)
  np.testing.assert_allclose(L.simnpo_loss(logits, LABELS, beta, gamma), expected, **TOL)


def test_simnpo_gamma_equals_open_unlearning_delta_times_beta():
  logits, beta, delta = _logits(11), 4.5, 0.2
  counts = np_counts(LABELS)
  per_tok = np_seq_nll(logits, LABELS) / np.maximum(counts, 1)
  ou = np_valid_mean(-(2 / beta) * np_log_sigmoid(beta * (per_tok - delta)), counts > 0)
  np.testing.assert_allclose(L.simnpo_loss(logits, LABELS, beta, gamma=beta * delta), ou, **TOL)


def test_dpo_matches_numpy():
  beta = 0.5
  lp, lr, rp, rr = (_logits(s) for s in (12, 13, 14, 15))  # pref/rej, current/ref
  logp_w = -np_seq_nll(lp, IDK_LABELS)
  logp_l = -np_seq_nll(lr, LABELS)
  ref_w = -np_seq_nll(rp, IDK_LABELS)
  ref_l = -np_seq_nll(rr, LABELS)
  per_row = -(2.0 / beta) * np_log_sigmoid(beta * ((logp_w - logp_l) - (ref_w - ref_l)))
  valid = (np_counts(IDK_LABELS) > 0) & (np_counts(LABELS) > 0)
  assert valid.tolist() == [True, False, False]
  expected = np_valid_mean(per_row, valid)
  got = L.dpo_loss(lp, lr, rp, rr, IDK_LABELS, LABELS, beta)
  np.testing.assert_allclose(got, expected, **TOL)


def test_dpo_at_initialization_and_direction():
  beta = 0.1
  lp, lr = jnp.asarray(_logits(16)), jnp.asarray(_logits(17))
  np.testing.assert_allclose(
    L.dpo_loss(lp, lr, lp, lr, IDK_LABELS, LABELS, beta), 2 / beta * math.log(2), rtol=1e-6
  )
  # Descending the loss must raise the IDK answer's likelihood and lower the forget one's.
  g_w, g_l = jax.grad(
    lambda a, b: L.dpo_loss(a, b, lp, lr, IDK_LABELS, LABELS, beta), argnums=(0, 1)
  )(lp, lr)
  step = 1e-1
  assert L.sequence_nll(lp - step * g_w, IDK_LABELS)[0] < L.sequence_nll(lp, IDK_LABELS)[0]
  assert L.sequence_nll(lr - step * g_l, LABELS)[0] > L.sequence_nll(lr, LABELS)[0]


def test_me_matches_numpy():
  logits = _logits(18)
  lp = np_log_softmax(logits)
  terms = []
  for b in range(B):
    for t in range(T - 1):
      if LABELS[b, t + 1] != IGN:
        terms.append(sum((1 / V) * (math.log(1 / V) - lp[b, t, v]) for v in range(V)))
  np.testing.assert_allclose(L.me_loss(logits, LABELS), sum(terms) / len(terms), **TOL)
  assert float(L.me_loss(logits, LABELS)) > 0


def test_me_is_zero_with_zero_gradient_at_uniform():
  # Any logits constant along the vocabulary are uniform predictions.
  logits = jnp.broadcast_to(jnp.arange(B * T, dtype=jnp.float32).reshape(B, T, 1), (B, T, V))
  value, grad = jax.value_and_grad(L.me_loss)(logits, LABELS)
  assert abs(float(value)) < 1e-6
  np.testing.assert_allclose(grad, 0.0, atol=1e-7)


def test_me_ignores_label_values_only_mask():
  logits = _logits(19)
  other = np.where(LABELS == IGN, IGN, (LABELS + 1) % V)
  np.testing.assert_allclose(L.me_loss(logits, LABELS), L.me_loss(logits, other), rtol=1e-7)


# ------------------------------------------------------------------ retain losses


def _np_kl(p_logits, q_logits):
  """KL(q || p) at each position, q = reference."""
  lp, lq = np_log_softmax(p_logits), np_log_softmax(q_logits)
  out = np.zeros(lp.shape[:-1])
  for idx in np.ndindex(out.shape):
    out[idx] = sum(math.exp(lq[idx][v]) * (lq[idx][v] - lp[idx][v]) for v in range(V))
  return out


def test_kl_answer_tokens_matches_numpy():
  logits, ref = _logits(20), _logits(21)
  kl = _np_kl(logits, ref)
  terms = [kl[b, t] for b in range(B) for t in range(T - 1) if LABELS[b, t + 1] != IGN]
  np.testing.assert_allclose(L.kl_loss(logits, ref, LABELS), sum(terms) / len(terms), **TOL)


def test_kl_all_tokens_is_reference_batchmean():
  logits, ref = _logits(22), _logits(23)
  expected = _np_kl(logits, ref).sum() / (B * T)  # every position, padding included
  np.testing.assert_allclose(L.kl_loss(logits, ref, LABELS, tokens="all"), expected, **TOL)
  with pytest.raises(ValueError, match="answer, all"):
    L.kl_loss(logits, ref, LABELS, tokens="prompt")


def test_kl_of_identical_logits_is_zero_with_zero_gradient():
  logits = jnp.asarray(_logits(24))
  for tokens in L.KL_TOKENS:
    value, grad = jax.value_and_grad(L.kl_loss)(logits, logits, LABELS, tokens)
    assert abs(float(value)) < 1e-6
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)


def test_kl_is_ref_to_current_direction():
  logits, ref = _logits(25), _logits(26)
  forward = float(L.kl_loss(logits, ref, LABELS))
  backward = float(L.kl_loss(ref, logits, LABELS))
  assert abs(forward - backward) > 1e-3  # so the check below can tell them apart
  kl = _np_kl(logits, ref)
  terms = [kl[b, t] for b in range(B) for t in range(T - 1) if LABELS[b, t + 1] != IGN]
  assert math.isclose(forward, sum(terms) / len(terms), rel_tol=1e-5)


def test_ap_matches_numpy():
  beta = 0.1
  logits, idk_logits = _logits(27), _logits(28)
  d = np_seq_nll(idk_logits, IDK_LABELS) - np_seq_nll(logits, LABELS)
  per_row = -(1.0 / beta) * np_log_sigmoid(beta * d)
  valid = (np_counts(IDK_LABELS) > 0) & (np_counts(LABELS) > 0)
  np.testing.assert_allclose(
    L.ap_loss(logits, idk_logits, LABELS, IDK_LABELS, beta), np_valid_mean(per_row, valid), **TOL
  )
  # Equal likelihoods: (1/beta) log 2.
  same = np.array([[IGN, IGN, 3, 1, 5, IGN]] * 2, np.int32)
  x = _logits(29, (2, T, V))
  np.testing.assert_allclose(L.ap_loss(x, x, same, same, beta), math.log(2) / beta, rtol=1e-6)


# ------------------------------------------------------------------ empty batches


@pytest.mark.parametrize("name", ["ga", "gd", "idk", "me", "npo", "simnpo", "kl", "dpo", "ap"])
def test_fully_masked_batch_gives_zero_loss_and_gradient(name):
  labels = np.full((2, 5), IGN, np.int32)
  x, r = jnp.asarray(_logits(30, (2, 5, V))), jnp.asarray(_logits(31, (2, 5, V)))
  fns = {
    "ga": lambda a: L.ga_loss(a, labels),
    "gd": lambda a: L.gd_loss(a, labels),
    "idk": lambda a: L.idk_loss(a, labels),
    "me": lambda a: L.me_loss(a, labels),
    "npo": lambda a: L.npo_loss(a, r, labels, 0.1),
    "simnpo": lambda a: L.simnpo_loss(a, labels, 2.5, 0.5),
    "kl": lambda a: L.kl_loss(a, r, labels),
    "dpo": lambda a: L.dpo_loss(a, a, r, r, labels, labels, 0.1),
    "ap": lambda a: L.ap_loss(a, r, labels, labels, 0.1),
  }
  value, grad = jax.value_and_grad(fns[name])(x)
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0.0)


def test_extreme_logits_stay_finite():
  logits = jnp.asarray(_logits(32, scale=1e4))
  ref = jnp.asarray(_logits(33, scale=1e4))
  for value in (
    L.npo_loss(logits, ref, LABELS, 0.1),
    L.kl_loss(logits, ref, LABELS),
    L.me_loss(logits, LABELS),
    L.simnpo_loss(logits, LABELS, 2.5),
    L.ap_loss(logits, ref, LABELS, LABELS, 0.1),
  ):
    assert np.isfinite(float(value))
  g = jax.grad(lambda a: L.npo_loss(a, ref, LABELS, 0.1) + L.kl_loss(a, ref, LABELS))(logits)
  assert np.all(np.isfinite(g))


# ------------------------------------------------------------------ configuration


ALL_SPECS = [f"{f}+{r}" for f in L.FORGET_LOSSES for r in L.RETAIN_LOSSES]


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_every_spec_parses_and_round_trips(spec):
  canonical = L.LLMU_SPEC if spec == "GA+LLMU" else spec  # the method's own name
  config = L.LossConfig.from_spec(spec)
  assert config.spec == canonical
  assert L.LossConfig.from_spec(spec.lower().replace("+", " + ")).spec == canonical
  assert L.LossConfig.from_spec(canonical) == config


def test_spec_parsing_details():
  assert L.parse_loss_spec("simnpo+gd") == ("SimNPO", "GD")
  assert L.parse_loss_spec("GA") == ("GA", None)
  assert L.parse_loss_spec(" llmu ") == ("GA", "LLMU")  # LLMU alone: GA + mismatch/KL
  config = L.LossConfig.from_spec("ME+GD", forget_coeff=0.1, beta=0.5)
  assert (config.forget_coeff, config.retain_coeff, config.beta) == (0.1, 1.0, 0.5)
  hash(config)  # usable as a static jit argument
  assert L.LossConfig(forget="npo", retain="kl") == L.LossConfig.from_spec("NPO+KL")


@pytest.mark.parametrize(
  "spec,pattern",
  [
    ("FOO+GD", r"unknown forget loss 'FOO'.*GA, NPO, SimNPO, DPO, ME, IDK"),
    ("NPO+BAR", r"unknown retain loss 'BAR'.*GD, KL, AP"),
    ("GD+NPO", r"unknown forget loss 'GD'"),
    ("NPO+GD+KL", r"3 parts"),
    ("", r"forget losses: GA, NPO"),
    ("NPO+", r"unknown retain loss ''"),
  ],
)
def test_bad_specs_list_valid_names(spec, pattern):
  with pytest.raises(ValueError, match=pattern):
    L.parse_loss_spec(spec)


@pytest.mark.parametrize(
  "kwargs,pattern",
  [
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=float("nan")), "beta must be a finite number"),
    (dict(forget_coeff="1"), "forget_coeff must be a finite number"),
    (dict(kl_tokens="prompt"), "unknown kl_tokens 'prompt'; valid: answer, all"),
    (dict(retain="XX"), "unknown retain loss 'XX'"),
  ],
)
def test_bad_config_values_are_named(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    L.LossConfig(**kwargs)


@pytest.mark.parametrize(
  "spec,ref,idk_forget,idk_retain",
  [
    ("LLMU", True, False, False),
    ("GA+GD", False, False, False),
    ("NPO+GD", True, False, False),
    ("SimNPO+GD", False, False, False),
    ("DPO+GD", True, True, False),
    ("ME+GD", False, False, False),
    ("IDK+AP", False, True, True),
    ("GA+KL", True, False, False),
    ("ME+AP", False, False, True),
  ],
)
def test_what_the_program_must_load(spec, ref, idk_forget, idk_retain):
  config = L.LossConfig.from_spec(spec)
  assert L.needs_reference_model(config) is ref
  assert L.needs_idk_batch(config, "forget") is idk_forget
  assert L.needs_idk_batch(config, "retain") is idk_retain
  assert L.needs_idk_batch(config) is (idk_forget or idk_retain)
  assert L.needs_mismatch_batch(config) is (spec == "LLMU")


# ------------------------------------------------------------------ model-level losses


def _params(seed):
  return bag_params(seed, V)


def _batch(labels, seed):
  ids = np.random.default_rng(seed).integers(0, V, labels.shape).astype(np.int32)
  ids = np.where(labels == IGN, ids, labels).astype(np.int32)
  mask = (np.arange(labels.shape[1]) < labels.shape[1] - 1).astype(np.int32)
  return L.LMBatch(
    jnp.asarray(ids), jnp.asarray(np.broadcast_to(mask, labels.shape)), jnp.asarray(labels)
  )


FORGET = _batch(LABELS, 40)
FORGET_IDK = _batch(IDK_LABELS, 41)
RETAIN = _batch(np.roll(LABELS, 1, axis=0), 42)
RETAIN_IDK = _batch(np.roll(IDK_LABELS, 1, axis=0), 43)


def _direct_forget(name, config, params, ref):
  lg = lambda p, b: bag_logits_fn(p, b.input_ids, b.attention_mask)
  return {
    "GA": lambda: L.ga_loss(lg(params, FORGET), FORGET),
    "NPO": lambda: L.npo_loss(lg(params, FORGET), lg(ref, FORGET), FORGET, config.beta),
    "SimNPO": lambda: L.simnpo_loss(lg(params, FORGET), FORGET, config.beta, config.simnpo_gamma),
    "DPO": lambda: L.dpo_loss(
      lg(params, FORGET_IDK),
      lg(params, FORGET),
      lg(ref, FORGET_IDK),
      lg(ref, FORGET),
      FORGET_IDK,
      FORGET,
      config.beta,
    ),
    "ME": lambda: L.me_loss(lg(params, FORGET), FORGET),
    "IDK": lambda: L.idk_loss(lg(params, FORGET_IDK), FORGET_IDK),
    "SFT": lambda: L.sft_loss(lg(params, FORGET), FORGET),
    "LMF": lambda: L.lmf_loss(lg(params, FORGET), FORGET),
  }[name]()


def _direct_retain(name, config, params, ref):
  lg = lambda p, b: bag_logits_fn(p, b.input_ids, b.attention_mask)
  return {
    "GD": lambda: L.gd_loss(lg(params, RETAIN), RETAIN),
    "KL": lambda: L.kl_loss(lg(params, RETAIN), lg(ref, RETAIN), RETAIN, config.kl_tokens),
    "AP": lambda: L.ap_loss(
      lg(params, RETAIN), lg(params, RETAIN_IDK), RETAIN, RETAIN_IDK, config.beta
    ),
  }[name]()


@pytest.mark.parametrize("name", L.FORGET_LOSSES)
def test_forget_loss_matches_direct_and_jits(name):
  config = L.LossConfig(forget=name, retain="GD", forget_coeff=0.7, beta=0.5, simnpo_gamma=0.1)
  params, ref = _params(0), _params(1)
  loss, metrics = L.forget_loss(config, bag_logits_fn, params, ref, FORGET, FORGET_IDK)
  direct = _direct_forget(name, config, params, ref)
  np.testing.assert_allclose(loss, 0.7 * direct, **TOL)
  np.testing.assert_allclose(metrics[f"forget/{name}"], direct, **TOL)
  np.testing.assert_allclose(metrics["forget/loss"], loss, **TOL)
  jitted = jax.jit(L.forget_loss, static_argnums=(0, 1))
  # Batches as plain dicts work as well as LMBatch.
  as_dict = lambda b: {
    "input_ids": b.input_ids,
    "attention_mask": b.attention_mask,
    "labels": b.labels,
  }
  loss_j, metrics_j = jitted(
    config, bag_logits_fn, params, ref, as_dict(FORGET), as_dict(FORGET_IDK)
  )
  np.testing.assert_allclose(loss_j, loss, **TOL)
  assert set(metrics_j) == set(metrics)
  grads = jax.grad(lambda p: L.forget_loss(config, bag_logits_fn, p, ref, FORGET, FORGET_IDK)[0])(
    params
  )
  assert all(np.all(np.isfinite(g)) and np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
  "name,kl_tokens", [("GD", "answer"), ("KL", "answer"), ("KL", "all"), ("AP", "answer")]
)
def test_retain_loss_matches_direct_and_jits(name, kl_tokens):
  config = L.LossConfig(forget="GA", retain=name, retain_coeff=2.0, beta=0.5, kl_tokens=kl_tokens)
  params, ref = _params(2), _params(3)
  loss, metrics = L.retain_loss(config, bag_logits_fn, params, ref, RETAIN, RETAIN_IDK)
  direct = _direct_retain(name, config, params, ref)
  np.testing.assert_allclose(loss, 2.0 * direct, **TOL)
  np.testing.assert_allclose(metrics[f"retain/{name}"], direct, **TOL)
  np.testing.assert_allclose(
    metrics["retain/nll"],
    L.gd_loss(bag_logits_fn(params, RETAIN.input_ids, RETAIN.attention_mask), RETAIN),
    **TOL,
  )
  loss_j, _ = jax.jit(L.retain_loss, static_argnums=(0, 1))(
    config, bag_logits_fn, params, ref, RETAIN, RETAIN_IDK
  )
  np.testing.assert_allclose(loss_j, loss, **TOL)


def test_reference_model_is_frozen_and_npo_starts_at_2_log2_over_beta():
  config = L.LossConfig.from_spec("NPO+KL", beta=0.1, forget_coeff=0.5)
  params = _params(4)
  loss, _ = L.forget_loss(config, bag_logits_fn, params, params, FORGET)
  np.testing.assert_allclose(loss, 0.5 * 2 / 0.1 * math.log(2), rtol=1e-6)
  # Gradient w.r.t. ref_params is zero, and passing params as their own reference gives the
  # same gradient as passing a detached copy.
  g_ref = jax.grad(lambda r: L.forget_loss(config, bag_logits_fn, params, r, FORGET)[0])(params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_ref))
  g_self = jax.grad(lambda p: L.forget_loss(config, bag_logits_fn, p, p, FORGET)[0])(params)
  copy = jax.tree.map(jnp.array, params)
  g_copy = jax.grad(lambda p: L.forget_loss(config, bag_logits_fn, p, copy, FORGET)[0])(params)
  for a, b in zip(jax.tree.leaves(g_self), jax.tree.leaves(g_copy)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  r_loss, _ = L.retain_loss(config, bag_logits_fn, params, params, RETAIN)
  assert abs(float(r_loss)) < 1e-6


def test_combined_loss_is_sum_of_both():
  config = L.LossConfig.from_spec("DPO+AP", forget_coeff=0.3, retain_coeff=1.5)
  params, ref = _params(5), _params(6)
  loss, metrics = L.combined_loss(
    config, bag_logits_fn, params, ref, FORGET, RETAIN, FORGET_IDK, RETAIN_IDK
  )
  f, _ = L.forget_loss(config, bag_logits_fn, params, ref, FORGET, FORGET_IDK)
  r, _ = L.retain_loss(config, bag_logits_fn, params, ref, RETAIN, RETAIN_IDK)
  np.testing.assert_allclose(loss, f + r, **TOL)
  assert {"loss", "forget/DPO", "retain/AP"} <= set(metrics)
  only_forget = L.LossConfig.from_spec("GA")
  loss_ga, metrics_ga = L.combined_loss(only_forget, bag_logits_fn, params, None, FORGET, None)
  np.testing.assert_allclose(loss_ga, metrics_ga["forget/GA"], **TOL)


def test_missing_inputs_are_named():
  params = _params(7)
  with pytest.raises(ValueError, match="NPO loss needs ref_params"):
    L.forget_loss(L.LossConfig.from_spec("NPO+GD"), bag_logits_fn, params, None, FORGET)
  with pytest.raises(ValueError, match="DPO loss needs an IDK batch"):
    L.forget_loss(L.LossConfig.from_spec("DPO+GD"), bag_logits_fn, params, params, FORGET)
  with pytest.raises(ValueError, match="AP loss needs an IDK batch"):
    L.retain_loss(L.LossConfig.from_spec("IDK+AP"), bag_logits_fn, params, None, RETAIN)
  with pytest.raises(ValueError, match="KL loss needs ref_params"):
    L.retain_loss(L.LossConfig.from_spec("GA+KL"), bag_logits_fn, params, None, RETAIN)
  with pytest.raises(ValueError, match="'GA' has no retain loss"):
    L.retain_loss(L.LossConfig.from_spec("GA"), bag_logits_fn, params, None, RETAIN)
  # IDK needs no forget batch at all.
  loss, _ = L.forget_loss(
    L.LossConfig.from_spec("IDK+AP"), bag_logits_fn, params, None, None, FORGET_IDK
  )
  assert np.isfinite(float(loss))


def test_module_docstring_examples():
  result = doctest.testmod(L, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ PyTorch cross-check


def test_matches_reference_style_torch_formulas():
  """The reference trainer's formulas, re-expressed with torch ops (independent of NumPy).

  Token-level losses use CrossEntropyLoss(ignore_index=-100) on shifted logits; sequence
  losses sum it per row; KL('all') is F.kl_div(..., 'batchmean', log_target=True) on the
  flattened logits; ME is F.kl_div(log softmax, uniform). All rows here have targets.
  """
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  labels = LABELS[:2]
  idk_labels = np.array([[IGN, IGN, IGN, 6, 2, IGN], [IGN, IGN, 1, 1, 3, IGN]], np.int32)
  x, r, xi, ri = (_logits(s, (2, T, V)) for s in (50, 51, 52, 53))
  tt = lambda a: torch.tensor(np.asarray(a, np.float64))
  tl = lambda a: torch.tensor(np.asarray(a, np.int64))

  def batch_nll(logits, lab):
    return F.cross_entropy(
      tt(logits)[:, :-1].transpose(-1, -2), tl(lab)[:, 1:], ignore_index=-100, reduction="none"
    ).sum(-1)

  def hf_loss(logits, lab):
    return F.cross_entropy(
      tt(logits)[:, :-1].reshape(-1, V), tl(lab)[:, 1:].reshape(-1), ignore_index=-100
    )

  beta = 0.1
  npo = -F.logsigmoid(beta * (batch_nll(x, labels) - batch_nll(r, labels))).mean() * 2 / beta
  dpo = (
    -F.logsigmoid(
      beta
      * (
        (-batch_nll(xi, idk_labels) + batch_nll(x, labels))
        - (-batch_nll(ri, idk_labels) + batch_nll(r, labels))
      )
    ).mean()
    * 2
    / beta
  )
  ap = -F.logsigmoid(beta * (batch_nll(xi, idk_labels) - batch_nll(x, labels))).mean() / beta
  kl_all = F.kl_div(
    F.log_softmax(tt(x), -1).view(-1, V),
    F.log_softmax(tt(r), -1).view(-1, V),
    reduction="batchmean",
    log_target=True,
  )
  soft = F.softmax(tt(x)[:, :-1], -1).reshape(-1, V)
  me_tok = F.kl_div(soft.log(), torch.full_like(soft, 1 / V), reduction="none").sum(-1)
  mask = (tl(labels)[:, 1:] != -100).reshape(-1).double()
  me = (me_tok * mask).sum() / mask.sum()

  pairs = [
    (L.npo_loss(x, r, labels, beta), npo),
    (L.dpo_loss(xi, x, ri, r, idk_labels, labels, beta), dpo),
    (L.ap_loss(x, xi, labels, idk_labels, beta), ap),
    (L.kl_loss(x, r, labels, tokens="all"), kl_all),
    (L.me_loss(x, labels), me),
    (L.ga_loss(x, labels), -hf_loss(x, labels)),
    (L.gd_loss(x, labels), hf_loss(x, labels)),
  ]
  for ours, theirs in pairs:
    np.testing.assert_allclose(float(ours), float(theirs), rtol=2e-5, atol=2e-5)
