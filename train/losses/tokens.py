"""Token-level building blocks of every loss: the batch type, the label shift, per-token
log-likelihoods and the row reductions."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any
Params = Any
LogitsFn = Callable[[Params, Array, Array], Array]
"""``logits_fn(params, input_ids, attention_mask) -> logits [B, T, V]``; must be traceable."""

IGNORE_INDEX: int = -100
"""Label of a position that is not scored: prompt and padding tokens (Hugging Face's and
PyTorch's ``ignore_index``; :mod:`train.data` writes it, the losses skip it)."""


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
        "'input_ids', 'attention_mask' and 'labels'"
      )
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
    f"expected a batch with 'labels' or a labels array, got {type(batch_or_labels).__name__}"
  )


def labels_from_target_mask(input_ids: Array, target_mask: Array) -> Array:
  """HF-style labels from a 0/1 ``target_mask`` aligned with ``input_ids``.

  ``labels[b, t] = input_ids[b, t]`` where ``target_mask[b, t]`` is set, else ``-100``
  (the evaluator's ``masked_mean_nll`` uses the same alignment, so both score the same
  tokens).
  """
  input_ids = jnp.asarray(input_ids)
  return jnp.where(
    jnp.asarray(target_mask).astype(bool), input_ids, jnp.asarray(IGNORE_INDEX, input_ids.dtype)
  )


# ----------------------------------------------------------------------------- primitives


def _check_shapes(logits: Array, labels: Array, what: str = "logits") -> None:
  # Shapes are static under jit, so this check costs nothing at run time.
  if logits.ndim != 3:
    raise ValueError(f"{what} must be [B, T, V], got shape {tuple(logits.shape)}")
  if tuple(labels.shape) != tuple(logits.shape[:2]):
    raise ValueError(
      f"labels shape {tuple(labels.shape)} does not match {what} shape "
      f"{tuple(logits.shape)} (expected labels [B, T] = {tuple(logits.shape[:2])})"
    )
  if logits.shape[1] < 2:
    raise ValueError(
      f"sequences need at least 2 positions to score a next token, got T={logits.shape[1]}"
    )


def shifted_log_probs(logits: Array) -> Array:
  """Float32 log-softmax of ``logits[:, :-1]``: ``[B, T-1, V]``; row ``t`` predicts token
  ``t+1``."""
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
