"""Unlearning losses: forget GA / NPO / SimNPO / DPO / ME / IDK, retain GD / KL / AP.

Every loss is a pure, jittable function of **logits** (and, where it needs one, the logits
of a frozen reference model), never of a model. :func:`forget_loss`, :func:`retain_loss` and
:func:`combined_loss` run a generic ``logits_fn(params, input_ids, attention_mask)`` on the
right batches for a :class:`LossConfig` such as ``LossConfig.from_spec("NPO+GD")``.

Conventions
-----------

**Batches.** A batch (:class:`LMBatch`, any mapping, or any object with these attributes)
holds right- or left-padded int ``[B, T]`` arrays:

* ``input_ids`` — the tokens of prompt + answer (+ padding);
* ``attention_mask`` — 1 on real tokens, 0 on padding (only passed on to ``logits_fn``);
* ``labels`` — Hugging Face style: ``labels[b, t]`` is the token that must be predicted at
  position ``t`` (normally ``input_ids[b, t]``) or :data:`IGNORE_INDEX` (``-100``) where the
  position is not scored (prompt, padding).

**Shift.** Logits at position ``t`` predict token ``t + 1``, so a loss pairs
``logits[:, :-1]`` with ``labels[:, 1:]`` (``labels[:, 0]`` is never scored), exactly like
``transformers``' causal-LM loss and the reference trainer's ``get_batch_loss``. The
*targets* of a row are the positions ``t < T - 1`` with ``labels[b, t + 1] != -100``;
:func:`token_counts` counts them. An evaluator-style ``target_mask`` aligned with
``input_ids`` converts with :func:`labels_from_target_mask`.

**Numerics.** Log-softmax is always taken in float32 (bf16 logits are upcast first);
log-sigmoid is ``jax.nn.log_sigmoid`` (``-softplus(-x)``, no overflow).

**Reductions** (they follow the reference trainer, CityU-MLO/DualOptim ``LLM/trainer/losses.py``,
which uses Hugging Face's ``outputs.loss`` for the token-level losses):

* *token-level* losses (GA, IDK, GD, ME, KL) average over all target tokens of the batch:
  ``sum over targets / max(number of targets, 1)``;
* *sequence-level* losses (NPO, SimNPO, DPO, AP) compute one value per row from the row's
  **summed** answer NLL ``NLL_b = -sum_t log p(y_t | y_<t)`` and average over rows.

**Empty rows.** A row with no target (e.g. a dummy row that pads a batch to a fixed size)
has ``NLL_b = 0`` and contributes **nothing**: token-level losses simply have no tokens from
it; sequence-level losses average only over *valid* rows (rows with at least one target, in
every batch the loss pairs), dividing by ``max(number of valid rows, 1)``. A batch with no
target at all gives a loss of 0 with zero gradient, never NaN. (The reference has no such
rows; for batches without empty rows the two agree exactly.)

Example:

>>> import numpy as np
>>> logits = np.zeros((1, 3, 4), np.float32)           # uniform over a vocabulary of 4
>>> labels = np.array([[-100, 2, 3]], np.int32)          # two answer tokens
>>> bool(np.isclose(sequence_nll(logits, labels)[0], 2 * np.log(4)))
True
>>> round(float(me_loss(logits, labels)), 6)             # uniform is ME's optimum
0.0
>>> config = LossConfig.from_spec("NPO+GD", beta=0.1)
>>> config.spec, needs_reference_model(config), needs_idk_batch(config)
('NPO+GD', True, False)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
Params = Any
LogitsFn = Callable[[Params, Array, Array], Array]
"""``logits_fn(params, input_ids, attention_mask) -> logits [B, T, V]``; must be traceable."""

IGNORE_INDEX: int = -100
"""Label of a position that is not scored (Hugging Face / PyTorch ``ignore_index``)."""

FORGET_LOSSES: tuple[str, ...] = ("GA", "NPO", "SimNPO", "DPO", "ME", "IDK")
"""Canonical names of the forget losses."""
RETAIN_LOSSES: tuple[str, ...] = ("GD", "KL", "AP")
"""Canonical names of the retain (regularization) losses."""
KL_TOKENS: tuple[str, ...] = ("answer", "all")
"""Positions the KL retain loss averages over (see :func:`kl_loss`)."""

_REFERENCE_FORGET = frozenset({"NPO", "DPO"})
_REFERENCE_RETAIN = frozenset({"KL"})
_IDK_FORGET = frozenset({"DPO", "IDK"})
_IDK_RETAIN = frozenset({"AP"})


# ----------------------------------------------------------------------------- batches


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LMBatch:
  """One tokenized batch (a JAX pytree, so it can be passed straight into ``jax.jit``).

  Attributes:
    input_ids: int ``[B, T]`` tokens.
    attention_mask: int ``[B, T]``, 1 on real tokens and 0 on padding.
    labels: int ``[B, T]``, the token to predict at each position or :data:`IGNORE_INDEX`
      (see the module docstring for the shift).
  """

  input_ids: Array
  attention_mask: Array
  labels: Array


def as_batch(batch: Any) -> LMBatch:
  """Returns ``batch`` as an :class:`LMBatch`.

  Args:
    batch: An :class:`LMBatch`, a mapping with keys ``input_ids``, ``attention_mask`` and
      ``labels``, or any object with those attributes.

  Raises:
    ValueError: If a field is missing (the message names it and the type of ``batch``).
  """
  if isinstance(batch, LMBatch):
    return batch
  fields = {}
  for name in ("input_ids", "attention_mask", "labels"):
    if isinstance(batch, Mapping):
      present = name in batch
      value = batch[name] if present else None
    else:
      present = hasattr(batch, name)
      value = getattr(batch, name, None)
    if not present:
      raise ValueError(
          f"batch of type {type(batch).__name__} has no {name!r}; a batch needs "
          "'input_ids', 'attention_mask' and 'labels'")
    fields[name] = value
  return LMBatch(**fields)


def _labels(batch_or_labels: Any) -> Array:
  """The ``labels`` of a batch; an array is taken to be the labels themselves."""
  if isinstance(batch_or_labels, (np.ndarray, jax.Array)):
    return batch_or_labels
  if isinstance(batch_or_labels, Mapping):
    if "labels" not in batch_or_labels:
      raise ValueError(f"batch has no 'labels' (keys: {sorted(batch_or_labels)})")
    return batch_or_labels["labels"]
  if hasattr(batch_or_labels, "labels"):
    return batch_or_labels.labels
  raise ValueError(
      f"expected a batch with 'labels' or a labels array, got {type(batch_or_labels).__name__}")


def labels_from_target_mask(input_ids: Array, target_mask: Array) -> Array:
  """HF-style labels from a 0/1 ``target_mask`` aligned with ``input_ids``.

  ``labels[b, t] = input_ids[b, t]`` where ``target_mask[b, t]`` is set, else ``-100``
  (the evaluator's ``masked_mean_nll`` uses the same alignment, so both score the same
  tokens).
  """
  input_ids = jnp.asarray(input_ids)
  return jnp.where(jnp.asarray(target_mask).astype(bool), input_ids,
                   jnp.asarray(IGNORE_INDEX, input_ids.dtype))


# ----------------------------------------------------------------------------- primitives


def _check_shapes(logits: Array, labels: Array, what: str = "logits") -> None:
  # Shapes are static under jit, so this check costs nothing at run time.
  if logits.ndim != 3:
    raise ValueError(f"{what} must be [B, T, V], got shape {tuple(logits.shape)}")
  if tuple(labels.shape) != tuple(logits.shape[:2]):
    raise ValueError(
        f"labels shape {tuple(labels.shape)} does not match {what} shape "
        f"{tuple(logits.shape)} (expected labels [B, T] = {tuple(logits.shape[:2])})")
  if logits.shape[1] < 2:
    raise ValueError(f"sequences need at least 2 positions to score a next token, got T={logits.shape[1]}")


def shifted_log_probs(logits: Array) -> Array:
  """Float32 log-softmax of ``logits[:, :-1]``: ``[B, T-1, V]``, row ``t`` predicts token ``t+1``."""
  return jax.nn.log_softmax(jnp.asarray(logits)[:, :-1].astype(jnp.float32), axis=-1)


def target_mask(labels: Array) -> Array:
  """Float32 ``[B, T-1]``: 1 where position ``t``'s target ``labels[:, t+1]`` is scored."""
  return (jnp.asarray(labels)[:, 1:] != IGNORE_INDEX).astype(jnp.float32)


def token_counts(batch_or_labels: Any) -> Array:
  """Number of target (answer) tokens of each row: float32 ``[B]``."""
  return jnp.sum(target_mask(_labels(batch_or_labels)), axis=-1)


def token_log_likelihoods(logits: Array, batch_or_labels: Any) -> tuple[Array, Array]:
  """Per-position ``log p(target)`` and the target mask.

  Args:
    logits: ``[B, T, V]`` (any float dtype; computed in float32).
    batch_or_labels: A batch or its ``labels`` ``[B, T]``.

  Returns:
    ``(log_p, mask)``, both float32 ``[B, T-1]``. ``log_p`` is 0 where ``mask`` is 0, so
    ignored positions never produce NaN or gradients.
  """
  labels = jnp.asarray(_labels(batch_or_labels))
  _check_shapes(logits, labels)
  log_probs = shifted_log_probs(logits)
  mask = target_mask(labels)
  # -100 is not a valid index: gather at 0 instead and mask the result away.
  targets = jnp.where(mask > 0, labels[:, 1:], 0).astype(jnp.int32)
  log_p = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return log_p * mask, mask


def sequence_nll(logits: Array, batch_or_labels: Any) -> Array:
  """Summed answer NLL of each row: ``NLL_b = -sum_t mask[b,t] log p(y[b,t+1] | y[b,<=t])``.

  Returns:
    float32 ``[B]`` (0 for a row without targets).
  """
  log_p, _ = token_log_likelihoods(logits, batch_or_labels)
  return -jnp.sum(log_p, axis=-1)


def mean_token_nll(logits: Array, batch_or_labels: Any) -> Array:
  """Batch token-mean NLL ``sum_b NLL_b / max(sum_b n_b, 1)`` (Hugging Face ``outputs.loss``)."""
  log_p, mask = token_log_likelihoods(logits, batch_or_labels)
  return -jnp.sum(log_p) / jnp.maximum(jnp.sum(mask), 1.0)


def _valid_rows(*batches_or_labels: Any) -> Array:
  """1.0 for rows with at least one target in every given batch, else 0.0."""
  valid = None
  for item in batches_or_labels:
    rows = (token_counts(item) > 0).astype(jnp.float32)
    valid = rows if valid is None else valid * rows
  return valid


def _row_mean(values: Array, valid: Array) -> Array:
  # jnp.where (not a product) so a non-finite value in an empty row cannot leak a NaN.
  return jnp.sum(jnp.where(valid > 0, values, 0.0)) / jnp.maximum(jnp.sum(valid), 1.0)


def _check_beta(beta: float) -> None:
  if isinstance(beta, (int, float)) and not (beta > 0 and math.isfinite(beta)):
    raise ValueError(f"beta must be a positive finite number, got {beta!r}")


# ----------------------------------------------------------------------------- forget losses


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


def _preference_loss(logits_preferred: Array, logits_rejected: Array,
                     preferred_batch: Any, rejected_batch: Any, beta: float,
                     scale: float, ref_log_ratio: Array | None = None) -> Array:
  """``-(scale/beta) mean_b log sigmoid(beta (log_ratio_b - ref_log_ratio_b))``."""
  # log pi(preferred) - log pi(rejected) = NLL(rejected) - NLL(preferred).
  log_ratio = sequence_nll(logits_rejected, rejected_batch) - sequence_nll(
      logits_preferred, preferred_batch)
  if ref_log_ratio is not None:
    log_ratio = log_ratio - jax.lax.stop_gradient(ref_log_ratio)
  per_row = -(scale / beta) * jax.nn.log_sigmoid(beta * log_ratio)
  return _row_mean(per_row, _valid_rows(preferred_batch, rejected_batch))


def dpo_loss(logits_preferred: Array, logits_rejected: Array, ref_logits_preferred: Array,
             ref_logits_rejected: Array, preferred_batch: Any, rejected_batch: Any,
             beta: float) -> Array:
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
        f"questions), got {logits_preferred.shape[0]} and {logits_rejected.shape[0]}")
  ref_log_ratio = sequence_nll(ref_logits_rejected, rejected_batch) - sequence_nll(
      ref_logits_preferred, preferred_batch)
  return _preference_loss(logits_preferred, logits_rejected, preferred_batch, rejected_batch,
                          beta, scale=2.0, ref_log_ratio=ref_log_ratio)


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


def idk_loss(logits: Array, idk_batch: Any) -> Array:
  """IDK fine-tuning: token-mean NLL of "I don't know"-style answers to forget questions.

  ``L_IDK = sum_b NLL_b(idk) / max(sum_b n_b, 1)`` (reference: ``outputs.loss``).

  Args:
    logits: Current model's logits on the IDK batch.
    idk_batch: Forget questions paired with IDK answers (or its labels).
  """
  return mean_token_nll(logits, idk_batch)


# ----------------------------------------------------------------------------- retain losses


def gd_loss(logits: Array, batch: Any) -> Array:
  """Gradient descent on the retain set: ``L_GD = sum_b NLL_b / max(sum_b n_b, 1)``."""
  return mean_token_nll(logits, batch)


def kl_loss(logits: Array, ref_logits: Array, batch: Any,
            tokens: Literal["answer", "all"] = "answer") -> Array:
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
        f"ref_logits shape {tuple(ref_logits.shape)} does not match logits shape {tuple(logits.shape)}")
  if tokens == "answer":
    log_p = shifted_log_probs(logits)
    ref_log_p = jax.lax.stop_gradient(shifted_log_probs(ref_logits))
    mask = target_mask(labels)
  else:
    log_p = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
    ref_log_p = jax.lax.stop_gradient(
        jax.nn.log_softmax(jnp.asarray(ref_logits).astype(jnp.float32), axis=-1))
    mask = jnp.ones(labels.shape, jnp.float32)
  ref_p = jnp.exp(ref_log_p)
  # Where q_v == 0 the term is 0 (0 log 0 = 0); the where also avoids 0 * inf = NaN when a
  # logit is -inf.
  kl = jnp.sum(jnp.where(ref_p > 0, ref_p * (ref_log_p - log_p), 0.0), axis=-1)
  return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def ap_loss(logits: Array, idk_logits: Array, batch: Any, idk_batch: Any,
            beta: float) -> Array:
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
        f"questions), got {logits.shape[0]} and {idk_logits.shape[0]}")
  return _preference_loss(logits, idk_logits, batch, idk_batch, beta, scale=1.0)


# ----------------------------------------------------------------------------- configuration


def _canonical(name: str, valid: tuple[str, ...], kind: str, spec: str | None = None) -> str:
  lookup = {v.upper(): v for v in valid}
  key = name.strip().upper() if isinstance(name, str) else None
  if key not in lookup:
    where = f" in loss spec {spec!r}" if spec is not None else ""
    raise ValueError(f"unknown {kind} loss {name!r}{where}; valid {kind} losses: {', '.join(valid)}")
  return lookup[key]


def parse_loss_spec(spec: str) -> tuple[str, str | None]:
  """Parses ``"FORGET+RETAIN"`` (or just ``"FORGET"``) into canonical names.

  Names are case-insensitive and may have spaces around them: ``"simnpo + gd"`` gives
  ``("SimNPO", "GD")``, ``"GA"`` gives ``("GA", None)`` (no retain loss).

  Raises:
    ValueError: For an unknown name or a malformed spec; the message names the bad part and
      lists the valid names.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(
        f"loss spec must be a string like 'NPO+GD', got {spec!r}; forget losses: "
        f"{', '.join(FORGET_LOSSES)}; retain losses: {', '.join(RETAIN_LOSSES)}")
  parts = spec.split("+")
  if len(parts) > 2:
    raise ValueError(f"loss spec {spec!r} has {len(parts)} parts; expected 'FORGET+RETAIN' or 'FORGET'")
  forget = _canonical(parts[0], FORGET_LOSSES, "forget", spec)
  retain = _canonical(parts[1], RETAIN_LOSSES, "retain", spec) if len(parts) == 2 else None
  return forget, retain


def _check_number(name: str, value: Any, positive: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  if positive and value <= 0:
    raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which unlearning losses to use, and their hyperparameters.

  Hashable, so it can be a static argument of ``jax.jit``.

  Attributes:
    forget: Forget loss, one of :data:`FORGET_LOSSES` (any case; stored canonical).
    retain: Retain loss, one of :data:`RETAIN_LOSSES`, or ``None`` for none.
    forget_coeff: Multiplies the forget loss (reference ``forget_coeff``; its TOFU config
      suggests 0.1 for ME+GD and 1.0 otherwise).
    retain_coeff: Multiplies the retain loss (reference ``regularization_coeff``).
    beta: Inverse temperature of NPO, SimNPO, DPO and AP (one shared value, as in the
      reference; 0.1 there).
    simnpo_gamma: SimNPO's reward margin ``gamma``.
    kl_tokens: Positions the KL retain loss averages over, see :func:`kl_loss`.
  """

  forget: str = "ME"
  retain: str | None = "GD"
  forget_coeff: float = 1.0
  retain_coeff: float = 1.0
  beta: float = 0.1
  simnpo_gamma: float = 0.0
  kl_tokens: str = "answer"

  def __post_init__(self):
    object.__setattr__(self, "forget", _canonical(self.forget, FORGET_LOSSES, "forget"))
    if self.retain is not None:
      object.__setattr__(self, "retain", _canonical(self.retain, RETAIN_LOSSES, "retain"))
    _check_number("forget_coeff", self.forget_coeff)
    _check_number("retain_coeff", self.retain_coeff)
    _check_number("beta", self.beta, positive=True)
    _check_number("simnpo_gamma", self.simnpo_gamma)
    if self.kl_tokens not in KL_TOKENS:
      raise ValueError(f"unknown kl_tokens {self.kl_tokens!r}; valid: {', '.join(KL_TOKENS)}")

  @classmethod
  def from_spec(cls, spec: str, **kwargs: Any) -> LossConfig:
    """``LossConfig.from_spec("IDK+AP", beta=0.1)``; see :func:`parse_loss_spec`."""
    forget, retain = parse_loss_spec(spec)
    return cls(forget=forget, retain=retain, **kwargs)

  @property
  def spec(self) -> str:
    """The canonical ``"FORGET+RETAIN"`` (or ``"FORGET"``) string."""
    return self.forget if self.retain is None else f"{self.forget}+{self.retain}"


def needs_reference_model(config: LossConfig) -> bool:
  """Whether the losses need a frozen reference model (NPO, DPO, KL)."""
  return config.forget in _REFERENCE_FORGET or config.retain in _REFERENCE_RETAIN


def needs_idk_batch(config: LossConfig,
                    objective: Literal["forget", "retain"] | None = None) -> bool:
  """Whether the losses need IDK-answer batches.

  Args:
    config: The losses.
    objective: ``"forget"``: IDK answers to *forget* questions (DPO, IDK). ``"retain"``:
      IDK answers to *retain* questions (AP). ``None``: either.
  """
  forget = config.forget in _IDK_FORGET
  retain = config.retain in _IDK_RETAIN
  if objective is None:
    return forget or retain
  if objective == "forget":
    return forget
  if objective == "retain":
    return retain
  raise ValueError(f"objective must be 'forget', 'retain' or None, got {objective!r}")


# ----------------------------------------------------------------------------- model-level losses


def _logits(logits_fn: LogitsFn, params: Params, batch: LMBatch) -> Array:
  return logits_fn(params, batch.input_ids, batch.attention_mask)


def _ref_logits(logits_fn: LogitsFn, ref_params: Params, batch: LMBatch) -> Array:
  # The reference model is frozen: no gradient to its weights, nor through its logits (both,
  # so that passing the trained params themselves as ref_params is also safe).
  return jax.lax.stop_gradient(_logits(logits_fn, jax.lax.stop_gradient(ref_params), batch))


def _require(value: Any, what: str, loss: str) -> None:
  if value is None:
    raise ValueError(f"the {loss} loss needs {what}, got None")


def _weighted(objective: str, name: str, coeff: float, raw: Array,
              metrics: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
  """``coeff * raw`` and the metrics with it and ``raw`` logged (not differentiated)."""
  loss = coeff * raw
  metrics[f"{objective}/loss"] = jax.lax.stop_gradient(loss)
  metrics[f"{objective}/{name}"] = jax.lax.stop_gradient(raw)
  return loss, metrics


def forget_loss(config: LossConfig, logits_fn: LogitsFn, params: Params,
                ref_params: Params | None, forget_batch: Any,
                idk_batch: Any | None = None) -> tuple[Array, dict[str, Array]]:
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
    raw = dpo_loss(_logits(logits_fn, params, idk), logits,
                   _ref_logits(logits_fn, ref_params, idk),
                   _ref_logits(logits_fn, ref_params, forget), idk, forget, config.beta)
  elif name == "ME":
    raw = me_loss(logits, forget)
  elif name == "IDK":
    raw = idk_loss(_logits(logits_fn, params, idk), idk)
    metrics["forget/tokens"] = jnp.sum(token_counts(idk))
  else:  # LossConfig validates names, so this is unreachable.
    raise AssertionError(name)
  return _weighted("forget", name, config.forget_coeff, raw, metrics)


def retain_loss(config: LossConfig, logits_fn: LogitsFn, params: Params,
                ref_params: Params | None, retain_batch: Any,
                idk_batch: Any | None = None) -> tuple[Array, dict[str, Array]]:
  """The retain objective ``retain_coeff * L_retain`` for one step.

  Args:
    config: The losses (``config.retain`` must not be ``None``).
    logits_fn: ``logits_fn(params, input_ids, attention_mask) -> [B, T, V]``.
    params: The trained weights.
    ref_params: Frozen reference weights for KL (``None`` otherwise).
    retain_batch: Retain questions with their true answers.
    idk_batch: Retain questions with IDK answers, row-aligned with ``retain_batch`` (AP;
      ``None`` otherwise).

  Returns:
    ``(loss, metrics)``: the scalar ``retain_coeff * L`` and float32 scalars
    ``retain/loss``, ``retain/<NAME>``, ``retain/nll`` (token-mean NLL of the true retain
    answers) and ``retain/tokens``.

  Raises:
    ValueError: If ``config.retain`` is ``None`` or a needed input is ``None``.
  """
  name = config.retain
  if name is None:
    raise ValueError(f"loss spec {config.spec!r} has no retain loss; use e.g. "
                     f"'{config.forget}+GD' (retain losses: {', '.join(RETAIN_LOSSES)})")
  _require(retain_batch, "a retain batch", name)
  if name in _REFERENCE_RETAIN:
    _require(ref_params, "ref_params (a frozen reference model)", name)
  if name in _IDK_RETAIN:
    _require(idk_batch, "an IDK batch (retain questions with IDK answers)", name)
  retain = as_batch(retain_batch)
  logits = _logits(logits_fn, params, retain)
  metrics: dict[str, Array] = {
      "retain/nll": jax.lax.stop_gradient(mean_token_nll(logits, retain)),
      "retain/tokens": jnp.sum(token_counts(retain)),
  }
  if name == "GD":
    raw = gd_loss(logits, retain)
  elif name == "KL":
    raw = kl_loss(logits, _ref_logits(logits_fn, ref_params, retain), retain,
                  tokens=config.kl_tokens)
  elif name == "AP":
    idk = as_batch(idk_batch)
    raw = ap_loss(logits, _logits(logits_fn, params, idk), retain, idk, config.beta)
  else:  # unreachable, see forget_loss
    raise AssertionError(name)
  return _weighted("retain", name, config.retain_coeff, raw, metrics)


def combined_loss(config: LossConfig, logits_fn: LogitsFn, params: Params,
                  ref_params: Params | None, forget_batch: Any, retain_batch: Any | None,
                  forget_idk_batch: Any | None = None,
                  retain_idk_batch: Any | None = None) -> tuple[Array, dict[str, Array]]:
  """Joint (non-alternating) objective ``forget_coeff * L_forget + retain_coeff * L_retain``.

  The reference's ``alternate=false`` mode. With ``config.retain`` ``None`` it is the
  forget objective alone and ``retain_batch`` is ignored. Metrics are those of
  :func:`forget_loss` and :func:`retain_loss` plus ``loss``.
  """
  loss, metrics = forget_loss(config, logits_fn, params, ref_params, forget_batch,
                              forget_idk_batch)
  if config.retain is not None:
    r_loss, r_metrics = retain_loss(config, logits_fn, params, ref_params, retain_batch,
                                    retain_idk_batch)
    loss = loss + r_loss
    metrics.update(r_metrics)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics


__all__ = [
    "FORGET_LOSSES", "IGNORE_INDEX", "KL_TOKENS", "LMBatch", "LogitsFn", "LossConfig",
    "RETAIN_LOSSES", "ap_loss", "as_batch", "combined_loss", "dpo_loss", "forget_loss",
    "ga_loss", "gd_loss", "idk_loss", "kl_loss", "labels_from_target_mask", "me_loss",
    "mean_token_nll", "needs_idk_batch", "needs_reference_model", "npo_loss",
    "parse_loss_spec", "retain_loss", "sequence_nll", "shifted_log_probs", "simnpo_loss",
    "target_mask", "token_counts", "token_log_likelihoods",
]
