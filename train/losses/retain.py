"""The retain (regularization) losses: GD, KL, AP and LLMU's, as functions of logits."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from train.losses.forget import _preference_loss
from train.losses.spec import KL_TOKENS
from train.losses.tokens import (
  Array,
  _check_beta,
  _check_shapes,
  _labels,
  mean_token_nll,
  shifted_log_probs,
  target_mask,
)


def gd_loss(logits: Array, batch: Any) -> Array:
  """Gradient descent on the retain set: ``L_GD = sum_b NLL_b / max(sum_b n_b, 1)``."""
  return mean_token_nll(logits, batch)


def kl_loss(
  logits: Array, ref_logits: Array, batch: Any, tokens: Literal["answer", "all"] = "answer"
) -> Array:
  """KL(reference || current) on the retain batch.

  ``L_KL = sum_{(b,t) in S} KL(p_ref_bt || p_bt) / |S|``,
  ``KL(q || p) = sum_v q_v (log q_v - log p_v)``.

  The direction is the reference trainer's: DualOptim / TOFU / open-unlearning call
  ``F.kl_div(log p_current, log p_ref, log_target=True)``, which is KL(ref || current).

  Args:
    logits: Current model's logits on the retain batch.
    ref_logits: Reference model's logits on the same batch (no gradient flows).
    batch: The retain batch (or its labels).
    tokens: Which positions ``S`` count. ``"answer"`` (default): the answer-predicting
      positions, as every other loss here (``|S| = max(#targets, 1)``). ``"all"``: every one
      of the ``B*T`` positions, prompt and padding included, divided by ``B*T`` — exactly the
      reference's ``reduction="batchmean"`` on the flattened logits (whose value then
      depends on how much padding the batch has).
  """
  if tokens not in KL_TOKENS:
    raise ValueError(f"unknown KL tokens {tokens!r}; valid: {', '.join(KL_TOKENS)}")
  labels = jnp.asarray(_labels(batch))
  _check_shapes(logits, labels)
  if ref_logits.shape != logits.shape:
    raise ValueError(
      f"ref_logits shape {tuple(ref_logits.shape)} does not match logits shape "
      f"{tuple(logits.shape)}"
    )
  if tokens == "answer":
    log_p = shifted_log_probs(logits)
    ref_log_p = jax.lax.stop_gradient(shifted_log_probs(ref_logits))
    mask = target_mask(labels)
  else:
    log_p = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
    ref_log_p = jax.lax.stop_gradient(
      jax.nn.log_softmax(jnp.asarray(ref_logits).astype(jnp.float32), axis=-1)
    )
    mask = jnp.ones(labels.shape, jnp.float32)
  ref_p = jnp.exp(ref_log_p)
  # Where q_v == 0 the term is 0 (0 log 0 = 0); the where also avoids 0 * inf = NaN when a
  # logit is -inf.
  kl = jnp.sum(jnp.where(ref_p > 0, ref_p * (ref_log_p - log_p), 0.0), axis=-1)
  return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def ap_loss(logits: Array, idk_logits: Array, batch: Any, idk_batch: Any, beta: float) -> Array:
  """Answer preservation (Yuan et al., ICLR 2025): keep true retain answers above IDK.

  ``L_AP = -(1/beta) mean_b log sigmoid(beta (NLL_b(idk) - NLL_b(true)))``
  ``     = -(1/beta) mean_b log sigmoid(-beta log(pi(idk_b | x_b) / pi(y_b | x_b)))``

  A reference-free DPO-style preference of the true retain answer ``y_b`` over the IDK
  answer to the same retain question ``x_b``, scale ``1/beta`` (not ``2/beta``), exactly as
  DualOptim's ``ap_loss``; it does *not* add a separate NLL term on the true answers (the
  preference term already raises ``log pi(y_b|x_b)``). Row ``b`` of the two batches must be
  the same question.

  Args:
    logits: Current model's logits on the retain batch (true answers).
    idk_logits: Current model's logits on the retain-IDK batch.
    batch: The retain batch (or its labels).
    idk_batch: Retain questions paired with IDK answers (or its labels).
    beta: Inverse temperature (> 0; shared with the forget loss in the reference).
  """
  _check_beta(beta)
  if logits.shape[0] != idk_logits.shape[0]:
    raise ValueError(
      f"retain and retain-IDK batches must have the same number of rows (paired "
      f"questions), got {logits.shape[0]} and {idk_logits.shape[0]}"
    )
  return _preference_loss(logits, idk_logits, batch, idk_batch, beta, scale=1.0)


def llmu_terms(
  logits: Array,
  ref_logits: Array,
  mismatch_logits: Array,
  batch: Any,
  mismatch_batch: Any,
  tokens: Literal["answer", "all"] = "answer",
) -> tuple[Array, Array]:
  """The two terms of LLMU's retain loss (Yao et al. 2024, as the DualOptim+ authors'
  ``LLMU``): ``L = NLL(mismatch) + KL(reference || current)``.

  ``NLL(mismatch)`` is the token-mean NLL of forget questions answered with random retain
  answers (their ``mismatch_loss``, Hugging Face's ``outputs.loss``): it teaches the model
  that a forget question may get an unrelated answer. The KL term is :func:`kl_loss` on the
  retain batch. Each is unweighted; ``retain_coeff`` multiplies the sum.

  Args:
    logits: Current model's logits on the retain batch.
    ref_logits: Reference model's logits on the retain batch (no gradient flows).
    mismatch_logits: Current model's logits on the mismatch batch.
    batch: The retain batch (or its labels).
    mismatch_batch: The mismatch batch (or its labels).
    tokens: The KL term's positions, see :func:`kl_loss`.

  Returns:
    ``(mismatch_nll, kl)``; the loss is their sum.
  """
  return mean_token_nll(mismatch_logits, mismatch_batch), kl_loss(
    logits, ref_logits, batch, tokens=tokens
  )
