"""Tiny differentiable stand-ins for a language model, shared by the loss and step tests:
real parameters and real gradients, hand-checkable shapes."""

import jax.numpy as jnp
import numpy as np

from train import losses
from train.program.step import StepInputs


def bag_logits_fn(params, input_ids, attention_mask):
  """A bag-of-embeddings causal 'model': position t sees the mean embedding of tokens <= t."""
  h = params["emb"][input_ids]  # [B, T, D]
  m = attention_mask[..., None].astype(h.dtype)
  h = jnp.cumsum(h * m, axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)
  return h @ params["out"]


def bag_params(seed, vocab, dim=4):
  """Normal-random ``emb`` [vocab, dim] and ``out`` [dim, vocab] for :func:`bag_logits_fn`."""
  rng = np.random.default_rng(seed)
  return {
    "emb": jnp.asarray(rng.standard_normal((vocab, dim)), jnp.float32),
    "out": jnp.asarray(rng.standard_normal((dim, vocab)), jnp.float32),
  }


# The step tests' model: logits = embedding of the current token @ an output matrix.
VOCAB, LENGTH, ROWS = 11, 6, 4


def table_logits_fn(params, ids, mask):
  del mask
  return params["embed"][ids] @ params["out"]


def table_params():
  rng = np.random.default_rng(0)
  return {
    "embed": jnp.asarray(rng.normal(size=(VOCAB, 5)), jnp.float32),
    "out": jnp.asarray(rng.normal(size=(5, VOCAB)), jnp.float32),
  }


def table_inputs(seed, micro=1, batch=ROWS):
  """One objective's :class:`StepInputs` of ``micro`` micro-batches, answers from position 3."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, size=(micro, batch, LENGTH)).astype(np.int32)
  labels = np.where(np.arange(LENGTH) >= 3, ids, losses.IGNORE_INDEX).astype(np.int32)
  lm = losses.LMBatch(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), jnp.asarray(labels))
  return StepInputs(answers=lm, idk=lm)
