"""The forget losses: GA, NPO, SimNPO, DPO, ME, LMF, IDK and SFT, as functions of logits."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from train.losses.tokens import (
  Array,
  _check_beta,
  _check_shapes,
  _labels,
  _row_mean,
  _valid_rows,
  mean_token_nll,
  sequence_nll,
  shifted_log_probs,
  target_mask,
  token_counts,
)


def ga_loss(logits: Array, batch: Any) -> Array:
  """Gradient ascent: the negated token-mean NLL of the forget answers.

  ``L_GA = -(sum_b NLL_b) / max(sum_b n_b, 1)``  (reference: ``-outputs.loss``).

  Args:
    logits: Current model's ``[B, T, V]`` logits on the forget batch.
    batch: The forget batch (or its labels).
  """
  return -mean_token_nll(logits, batch)


def npo_loss(logits: Array, ref_logits: Array, batch: Any, beta: float) -> Array:
  """Negative Preference Optimization (Zhang et al. 2024).

  ``L_NPO = -(2/beta) mean_b log sigmoid(beta (NLL_b - NLL_ref_b))``
  ``      =  (2/beta) mean_b log(1 + (pi(y_b|x_b) / pi_ref(y_b|x_b))^beta)``

  with ``NLL`` the summed answer NLL of the current and reference model (reference:
  ``npo_loss`` in DualOptim, same as licong-lin/negative-preference-optimization). At
  ``pi == pi_ref`` it equals ``(2/beta) log 2`` and its gradient is ``-mean_b grad NLL_b``,
  i.e. that of (sequence-summed) gradient ascent.

  Args:
    logits: Current model's logits on the forget batch.
    ref_logits: Frozen reference model's logits on the same batch (no gradient flows).
    batch: The forget batch (or its labels).
    beta: Inverse temperature (> 0; the reference uses 0.1).
  """
  _check_beta(beta)
  nll = sequence_nll(logits, batch)
  ref_nll = jax.lax.stop_gradient(sequence_nll(ref_logits, batch))
  per_row = -(2.0 / beta) * jax.nn.log_sigmoid(beta * (nll - ref_nll))
  return _row_mean(per_row, _valid_rows(batch))


def simnpo_loss(logits: Array, batch: Any, beta: float, gamma: float = 0.0) -> Array:
  """SimNPO (Fan et al. 2024): reference-free, length-normalised NPO.

  ``L_SimNPO = -(2/beta) mean_b log sigmoid(beta NLL_b / n_b - gamma)``

  i.e. the paper's ``-(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - gamma)`` with ``n_b``
  the number of answer tokens. open-unlearning's ``SimNPO`` writes the margin as ``delta``
  inside the product, ``log sigmoid(beta (NLL_b / n_b - delta))``: the same loss with
  ``gamma = beta * delta``.

  Args:
    logits: Current model's logits on the forget batch.
    batch: The forget batch (or its labels).
    beta: Inverse temperature (> 0).
    gamma: Reward margin (``0`` in the open-unlearning TOFU configs).
  """
  _check_beta(beta)
  counts = token_counts(batch)
  per_token_nll = sequence_nll(logits, batch) / jnp.maximum(counts, 1.0)
  per_row = -(2.0 / beta) * jax.nn.log_sigmoid(beta * per_token_nll - gamma)
  return _row_mean(per_row, (counts > 0).astype(jnp.float32))


def _preference_loss(
  logits_preferred: Array,
  logits_rejected: Array,
  preferred_batch: Any,
  rejected_batch: Any,
  beta: float,
  scale: float,
  ref_log_ratio: Array | None = None,
) -> Array:
  """``-(scale/beta) mean_b log sigmoid(beta (log_ratio_b - ref_log_ratio_b))``."""
  # log pi(preferred) - log pi(rejected) = NLL(rejected) - NLL(preferred).
  log_ratio = sequence_nll(logits_rejected, rejected_batch) - sequence_nll(
    logits_preferred, preferred_batch
  )
  if ref_log_ratio is not None:
    log_ratio = log_ratio - jax.lax.stop_gradient(ref_log_ratio)
  per_row = -(scale / beta) * jax.nn.log_sigmoid(beta * log_ratio)
  return _row_mean(per_row, _valid_rows(preferred_batch, rejected_batch))


def dpo_loss(
  logits_preferred: Array,
  logits_rejected: Array,
  ref_logits_preferred: Array,
  ref_logits_rejected: Array,
  preferred_batch: Any,
  rejected_batch: Any,
  beta: float,
) -> Array:
  """DPO for unlearning: prefer the IDK answer over the forget answer (Rafailov et al. 2023).

  ``L_DPO = -(2/beta) mean_b log sigmoid(beta [(log pi(w_b) - log pi(l_b))
                                               - (log pi_ref(w_b) - log pi_ref(l_b))])``

  with ``w_b`` the preferred (IDK) answer, ``l_b`` the rejected (forget) answer, ``log pi``
  the summed answer log-likelihood of row ``b`` (``= -NLL_b``). The ``2/beta`` scale is the
  reference trainer's (DualOptim ``dpo_loss``), so the loss is ``(2/beta) log 2`` at
  ``pi == pi_ref``. Row ``b`` of the two batches must be the same question.

  Args:
    logits_preferred: Current model's logits on the IDK batch.
    logits_rejected: Current model's logits on the forget batch.
    ref_logits_preferred: Reference model's logits on the IDK batch.
    ref_logits_rejected: Reference model's logits on the forget batch.
    preferred_batch: The IDK batch (forget questions, IDK answers) or its labels.
    rejected_batch: The forget batch or its labels.
    beta: Inverse temperature (> 0; the reference uses 0.1).
  """
  _check_beta(beta)
  if logits_preferred.shape[0] != logits_rejected.shape[0]:
    raise ValueError(
      f"preferred and rejected batches must have the same number of rows (paired "
      f"questions), got {logits_preferred.shape[0]} and {logits_rejected.shape[0]}"
    )
  ref_log_ratio = sequence_nll(ref_logits_rejected, rejected_batch) - sequence_nll(
    ref_logits_preferred, preferred_batch
  )
  return _preference_loss(
    logits_preferred,
    logits_rejected,
    preferred_batch,
    rejected_batch,
    beta,
    scale=2.0,
    ref_log_ratio=ref_log_ratio,
  )


def me_loss(logits: Array, batch: Any) -> Array:
  """Maximum entropy: KL(uniform || p) per answer position, token-mean over the batch.

  ``L_ME = sum_{b,t} m_bt KL(U || p_bt) / max(sum m, 1)``, with
  ``KL(U || p) = sum_v (1/V)(log(1/V) - log p_v) = -log V - mean_v log p_v``,

  where ``p_bt`` is the predicted distribution at position ``t`` (which predicts answer
  token ``t+1``). This is DualOptim's ``get_me_loss`` (from Yuan et al., "A Closer Look at
  Machine Unlearning for LLMs", ICLR 2025), which computes ``log(softmax + 1e-12)``; here
  the exact float32 log-softmax is used instead (same value up to ~1e-12 relative). It is
  >= 0 and 0 exactly at uniform predictions. Only the mask of the labels matters, not the
  label values.

  Args:
    logits: Current model's logits on the forget batch.
    batch: The forget batch (or its labels).
  """
  labels = jnp.asarray(_labels(batch))
  _check_shapes(logits, labels)
  log_probs = shifted_log_probs(logits)
  vocab = log_probs.shape[-1]
  kl = -math.log(vocab) - jnp.mean(log_probs, axis=-1)
  mask = target_mask(labels)
  return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def lmf_loss(logits: Array, batch: Any) -> Array:
  """Logit-margin flattening (Entesari et al. 2025): the spread of the logits, softmax-free.

  ``L_LMF = sum_{b,t} m_bt flat(z_bt) / max(sum m, 1)``, with
  ``flat(z) = (1/V) sum_v (z_v - zbar)^2`` and ``zbar = (1/V) sum_v z_v``,

  where ``z_bt`` are the float32 logits at position ``t`` (which predicts answer token
  ``t+1``) and ``m`` the target mask, exactly as in :func:`me_loss`; only the mask of the
  labels matters. ``flat`` is the population variance of the logits: >= 0, 0 exactly when
  all ``V`` logits are equal (the uniform prediction) and unchanged by adding a constant to
  them (as softmax is), so like ME it pushes forget predictions toward uniform, but without
  a softmax. Why that matters: its gradient ``(2/V)(z - zbar)`` grows linearly with the
  margin of a peaked logit, so a confidently memorised token gets the strongest push, while
  the entropy's gradient vanishes as the prediction becomes one-hot and ME's
  (``softmax(z) - 1/V``) saturates below norm 1.

  The centred form is used, never ``mean(z^2) - zbar^2``, which cancels catastrophically
  when ``|zbar|`` dwarfs the spread; it costs one extra ``[B, T-1, V]`` float32.

  The authors' released trainer (open-unlearning's ``PDU``) penalises the squared
  max-minus-mean margin ``(max_v z_v - zbar)^2`` instead, over every position (prompt and
  padding included). This variance variant moves every logit toward the mean, not only the
  largest one down, and scores the answer positions only, as ME does.

  Named LMF rather than FLAT: "FLAT" already names another unlearning method (Wang et al.
  2024, loss adjustment with only forget data).

  Args:
    logits: Current model's logits on the forget batch (any float dtype; float32 inside).
    batch: The forget batch (or its labels).
  """
  labels = jnp.asarray(_labels(batch))
  _check_shapes(logits, labels)
  z = jnp.asarray(logits)[:, :-1].astype(jnp.float32)
  # flat is shift-invariant, so subtracting one logit changes nothing mathematically (hence
  # no gradient through it) but removes a large common offset before the mean, and makes
  # positions whose logits are all equal exactly 0 whatever their value.
  z = z - jax.lax.stop_gradient(z[..., :1])
  centred = z - jnp.mean(z, axis=-1, keepdims=True)
  flat = jnp.mean(jnp.square(centred), axis=-1)
  mask = target_mask(labels)
  return jnp.sum(flat * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sft_loss(logits: Array, batch: Any) -> Array:
  """Supervised fine-tuning: the token-mean NLL of the batch's own answers (descent).

  ``L_SFT = sum_b NLL_b / max(sum_b n_b, 1)``, i.e. ``-L_GA``. In safety alignment the
  first objective's rows are harmful instructions with refusals, which the model should
  learn, not unlearn.

  Args:
    logits: Current model's ``[B, T, V]`` logits on the batch.
    batch: The batch (or its labels).
  """
  return mean_token_nll(logits, batch)


def idk_loss(logits: Array, idk_batch: Any) -> Array:
  """IDK fine-tuning: token-mean NLL of "I don't know"-style answers to forget questions.

  ``L_IDK = sum_b NLL_b(idk) / max(sum_b n_b, 1)`` (reference: ``outputs.loss``).

  Args:
    logits: Current model's logits on the IDK batch.
    idk_batch: Forget questions paired with IDK answers (or its labels).
  """
  return mean_token_nll(logits, idk_batch)
