"""Model-level losses: run ``logits_fn`` on the right batches for a :class:`LossConfig`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from train.losses.forget import (
  dpo_loss,
  ga_loss,
  idk_loss,
  lmf_loss,
  me_loss,
  npo_loss,
  sft_loss,
  simnpo_loss,
)
from train.losses.retain import ap_loss, gd_loss, kl_loss, llmu_terms
from train.losses.spec import (
  _IDK_FORGET,
  _IDK_RETAIN,
  _MISMATCH_RETAIN,
  _REFERENCE_FORGET,
  _REFERENCE_RETAIN,
  RETAIN_LOSSES,
  LossConfig,
)
from train.losses.tokens import (
  Array,
  LMBatch,
  LogitsFn,
  Params,
  as_batch,
  mean_token_nll,
  token_counts,
)


def _logits(logits_fn: LogitsFn, params: Params, batch: LMBatch) -> Array:
  return logits_fn(params, batch.input_ids, batch.attention_mask)


def _ref_logits(logits_fn: LogitsFn, ref_params: Params, batch: LMBatch) -> Array:
  # The reference model is frozen: no gradient to its weights, nor through its logits (both,
  # so that passing the trained params themselves as ref_params is also safe).
  return jax.lax.stop_gradient(_logits(logits_fn, jax.lax.stop_gradient(ref_params), batch))


def _require(value: Any, what: str, loss: str) -> None:
  if value is None:
    raise ValueError(f"the {loss} loss needs {what}, got None")


def _weighted(
  objective: str, name: str, coeff: float, raw: Array, metrics: dict[str, Array]
) -> tuple[Array, dict[str, Array]]:
  """``coeff * raw`` and the metrics with it and ``raw`` logged (not differentiated)."""
  loss = coeff * raw
  metrics[f"{objective}/loss"] = jax.lax.stop_gradient(loss)
  metrics[f"{objective}/{name}"] = jax.lax.stop_gradient(raw)
  return loss, metrics


def forget_loss(
  config: LossConfig,
  logits_fn: LogitsFn,
  params: Params,
  ref_params: Params | None,
  forget_batch: Any,
  idk_batch: Any | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The forget objective ``forget_coeff * L_forget`` for one step.

  Args:
    config: The losses.
    logits_fn: ``logits_fn(params, input_ids, attention_mask) -> [B, T, V]``.
    params: The trained weights (gradients are taken with respect to these).
    ref_params: Frozen reference weights for NPO / DPO (``None`` otherwise); wrapped in
      ``stop_gradient``.
    forget_batch: Forget questions with their true answers (unused by IDK, may be ``None``).
    idk_batch: Forget questions with IDK answers, row-aligned with ``forget_batch`` (DPO,
      IDK; ``None`` otherwise).

  Returns:
    ``(loss, metrics)``: the scalar ``forget_coeff * L`` and float32 scalars
    ``forget/loss`` (= loss), ``forget/<NAME>`` (L itself), ``forget/nll`` (token-mean NLL
    of the forget answers, when the forget batch is used) and ``forget/tokens``.

  Raises:
    ValueError: If a batch or ``ref_params`` the loss needs is ``None``.
  """
  name = config.forget
  metrics: dict[str, Array] = {}
  if name in _REFERENCE_FORGET:
    _require(ref_params, "ref_params (a frozen reference model)", name)
  if name in _IDK_FORGET:
    _require(idk_batch, "an IDK batch (forget questions with IDK answers)", name)
    idk = as_batch(idk_batch)
  if name != "IDK":
    _require(forget_batch, "a forget batch", name)
    forget = as_batch(forget_batch)
    logits = _logits(logits_fn, params, forget)
    metrics["forget/nll"] = jax.lax.stop_gradient(mean_token_nll(logits, forget))
    metrics["forget/tokens"] = jnp.sum(token_counts(forget))

  if name == "GA":
    raw = ga_loss(logits, forget)
  elif name == "NPO":
    raw = npo_loss(logits, _ref_logits(logits_fn, ref_params, forget), forget, config.beta)
  elif name == "SimNPO":
    raw = simnpo_loss(logits, forget, config.beta, config.simnpo_gamma)
  elif name == "DPO":
    raw = dpo_loss(
      _logits(logits_fn, params, idk),
      logits,
      _ref_logits(logits_fn, ref_params, idk),
      _ref_logits(logits_fn, ref_params, forget),
      idk,
      forget,
      config.beta,
    )
  elif name == "ME":
    raw = me_loss(logits, forget)
  elif name == "LMF":
    raw = lmf_loss(logits, forget)
  elif name == "SFT":
    raw = sft_loss(logits, forget)
  elif name == "IDK":
    raw = idk_loss(_logits(logits_fn, params, idk), idk)
    metrics["forget/tokens"] = jnp.sum(token_counts(idk))
  else:  # LossConfig validates names, so this is unreachable.
    raise AssertionError(name)
  return _weighted("forget", name, config.forget_coeff, raw, metrics)


def retain_loss(
  config: LossConfig,
  logits_fn: LogitsFn,
  params: Params,
  ref_params: Params | None,
  retain_batch: Any,
  idk_batch: Any | None = None,
  mismatch_batch: Any | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The retain objective ``retain_coeff * L_retain`` for one step.

  Args:
    config: The losses (``config.retain`` must not be ``None``).
    logits_fn: ``logits_fn(params, input_ids, attention_mask) -> [B, T, V]``.
    params: The trained weights.
    ref_params: Frozen reference weights for KL and LLMU (``None`` otherwise).
    retain_batch: Retain questions with their true answers.
    idk_batch: Retain questions with IDK answers, row-aligned with ``retain_batch`` (AP;
      ``None`` otherwise).
    mismatch_batch: Forget questions with the retain answers of ``retain_batch`` (LLMU;
      ``None`` otherwise).

  Returns:
    ``(loss, metrics)``: the scalar ``retain_coeff * L`` and float32 scalars
    ``retain/loss``, ``retain/<NAME>``, ``retain/nll`` (token-mean NLL of the true retain
    answers) and ``retain/tokens``; LLMU adds its terms ``retain/mismatch`` and
    ``retain/KL``.

  Raises:
    ValueError: If ``config.retain`` is ``None`` or a needed input is ``None``.
  """
  name = config.retain
  if name is None:
    raise ValueError(
      f"loss spec {config.spec!r} has no retain loss; use e.g. "
      f"'{config.forget}+GD' (retain losses: {', '.join(RETAIN_LOSSES)})"
    )
  _require(retain_batch, "a retain batch", name)
  if name in _REFERENCE_RETAIN:
    _require(ref_params, "ref_params (a frozen reference model)", name)
  if name in _IDK_RETAIN:
    _require(idk_batch, "an IDK batch (retain questions with IDK answers)", name)
  if name in _MISMATCH_RETAIN:
    _require(mismatch_batch, "a mismatch batch (forget questions with retain answers)", name)
  retain = as_batch(retain_batch)
  logits = _logits(logits_fn, params, retain)
  metrics: dict[str, Array] = {
    "retain/nll": jax.lax.stop_gradient(mean_token_nll(logits, retain)),
    "retain/tokens": jnp.sum(token_counts(retain)),
  }
  if name == "GD":
    raw = gd_loss(logits, retain)
  elif name == "KL":
    raw = kl_loss(
      logits, _ref_logits(logits_fn, ref_params, retain), retain, tokens=config.kl_tokens
    )
  elif name == "AP":
    idk = as_batch(idk_batch)
    raw = ap_loss(logits, _logits(logits_fn, params, idk), retain, idk, config.beta)
  elif name == "LLMU":
    mismatch = as_batch(mismatch_batch)
    mismatch_nll, kl = llmu_terms(
      logits,
      _ref_logits(logits_fn, ref_params, retain),
      _logits(logits_fn, params, mismatch),
      retain,
      mismatch,
      tokens=config.kl_tokens,
    )
    raw = mismatch_nll + kl
    metrics["retain/mismatch"] = jax.lax.stop_gradient(mismatch_nll)
    metrics["retain/KL"] = jax.lax.stop_gradient(kl)
  else:  # unreachable, see forget_loss
    raise AssertionError(name)
  return _weighted("retain", name, config.retain_coeff, raw, metrics)


def combined_loss(
  config: LossConfig,
  logits_fn: LogitsFn,
  params: Params,
  ref_params: Params | None,
  forget_batch: Any,
  retain_batch: Any | None,
  forget_idk_batch: Any | None = None,
  retain_idk_batch: Any | None = None,
  retain_mismatch_batch: Any | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Joint (non-alternating) objective ``forget_coeff * L_forget + retain_coeff * L_retain``.

  The reference's ``alternate=false`` mode. With ``config.retain`` ``None`` it is the
  forget objective alone and ``retain_batch`` is ignored. Metrics are those of
  :func:`forget_loss` and :func:`retain_loss` plus ``loss``.
  """
  loss, metrics = forget_loss(config, logits_fn, params, ref_params, forget_batch, forget_idk_batch)
  if config.retain is not None:
    r_loss, r_metrics = retain_loss(
      config, logits_fn, params, ref_params, retain_batch, retain_idk_batch, retain_mismatch_batch
    )
    loss = loss + r_loss
    metrics.update(r_metrics)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics
