"""Model-agnostic, batched and jitted answer scoring and greedy generation.

The evaluator needs two things from a model, in :class:`ScoringModel`:

* ``logits(input_ids, attention_mask) -> [B, T, V]`` for right-padded int32 ``[B, T]``
  inputs (``attention_mask`` is 1 on real tokens, 0 on padding);
* ``generate(input_ids, attention_mask, max_new_tokens) -> [B, max_new_tokens]`` new token
  ids, greedily, for **left-padded** prompts. Tokens after the first EOS are ignored.

A model may also offer ``answer_nll(input_ids, attention_mask, target_mask) -> [B]`` (the
:func:`masked_mean_nll` of its logits fused in one jitted call, so the ``[B, T, V]`` logits
never leave the computation); without it the evaluator calls ``logits`` and then a jitted
:func:`masked_mean_nll`.

:class:`FunctionModel` builds both from a plain function. For a Flax NNX model, split it so
its weights are an argument of the jitted computation rather than constants baked into it::

    graphdef, state = nnx.split(model)
    apply = lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask)
    scoring_model = FunctionModel(apply, params=state)

(a model with its own KV-cached ``generate`` can implement :class:`ScoringModel` directly).

Batches have a fixed number of rows and a length rounded up to a multiple of
``length_multiple``, so only a handful of shapes are ever compiled. Items are sorted by
length before batching (less padding) and the results are put back in item order.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from train.data.prompting import EncodedAnswer

Array = Any


@runtime_checkable
class ScoringModel(Protocol):
  """What the evaluator needs from a causal language model (see the module docstring)."""

  def logits(self, input_ids: Array, attention_mask: Array) -> Array:
    """Next-token logits ``[B, T, V]`` for right-padded ``[B, T]`` int32 inputs."""
    ...

  def generate(self, input_ids: Array, attention_mask: Array, max_new_tokens: int) -> Array:
    """Greedy continuation ``[B, max_new_tokens]`` of left-padded ``[B, P]`` prompts."""
    ...


def masked_mean_nll(logits: Array, input_ids: Array, target_mask: Array) -> Array:
  """Mean negative log-likelihood of the masked tokens of each row.

  Args:
    logits: ``[B, T, V]``; position ``t`` predicts token ``t + 1``.
    input_ids: ``[B, T]`` int.
    target_mask: ``[B, T]``, 1 where the token is scored (answer tokens), 0 elsewhere
      (prompt, padding). Position 0 is never scored.

  Returns:
    ``[B]`` float32: the sum of the scored tokens' NLL over their count (0 where none).
  """
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = input_ids[:, 1:]
  token_nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  mask = target_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(token_nll * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


_jitted_masked_mean_nll = jax.jit(masked_mean_nll)


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionModel:
  """A :class:`ScoringModel` made from a logits function.

  Attributes:
    apply_fn: ``apply_fn(input_ids, attention_mask) -> logits``, or
      ``apply_fn(params, input_ids, attention_mask)`` when ``params`` is given. It must be
      traceable by JAX (it is jitted, together with the NLL and the generation loop).
    params: Passed as the first argument of ``apply_fn`` (an argument of the jitted
      functions, so large weights are not compiled in as constants); ``None`` for none.

  ``generate`` is a simple greedy loop that recomputes the logits of the whole buffer at
  every step (no KV cache): exact for any causal model whose logits at a position depend
  only on the non-masked tokens up to it, and fine for small models and tests. Models with
  a cache should implement :class:`ScoringModel` themselves.
  """

  apply_fn: Callable[..., Array]
  params: Any = None

  def _call(self, params, input_ids, attention_mask):
    if self.params is None:
      return self.apply_fn(input_ids, attention_mask)
    return self.apply_fn(params, input_ids, attention_mask)

  @functools.cached_property
  def _jitted_logits(self):
    return jax.jit(self._call)

  @functools.cached_property
  def _jitted_nll(self):
    return jax.jit(
      lambda params, ids, mask, target_mask: masked_mean_nll(
        self._call(params, ids, mask), ids, target_mask
      )
    )

  @functools.cached_property
  def _jitted_generate(self):
    def generate(params, input_ids, attention_mask, max_new_tokens):
      batch, prompt_length = input_ids.shape
      ids = jnp.concatenate(
        [input_ids, jnp.zeros((batch, max_new_tokens), input_ids.dtype)], axis=1
      )
      mask = jnp.concatenate(
        [attention_mask, jnp.zeros((batch, max_new_tokens), attention_mask.dtype)], axis=1
      )

      def step(i, carry):
        ids, mask = carry
        logits = self._call(params, ids, mask)
        last = jax.lax.dynamic_index_in_dim(logits, prompt_length + i - 1, axis=1, keepdims=False)
        next_token = jnp.argmax(last, axis=-1).astype(ids.dtype)
        ids = jax.lax.dynamic_update_index_in_dim(ids, next_token, prompt_length + i, axis=1)
        mask = jax.lax.dynamic_update_index_in_dim(
          mask, jnp.ones_like(next_token, mask.dtype), prompt_length + i, axis=1
        )
        return ids, mask

      ids, _ = jax.lax.fori_loop(0, max_new_tokens, step, (ids, mask))
      return ids[:, prompt_length:]

    return jax.jit(generate, static_argnums=3)

  def logits(self, input_ids: Array, attention_mask: Array) -> Array:
    return self._jitted_logits(self.params, input_ids, attention_mask)

  def answer_nll(self, input_ids: Array, attention_mask: Array, target_mask: Array) -> Array:
    """:func:`masked_mean_nll` of this model's logits, fused in one jitted function."""
    return self._jitted_nll(self.params, input_ids, attention_mask, target_mask)

  def generate(self, input_ids: Array, attention_mask: Array, max_new_tokens: int) -> Array:
    return self._jitted_generate(self.params, input_ids, attention_mask, int(max_new_tokens))


def as_scoring_model(model: ScoringModel | Callable[..., Array]) -> ScoringModel:
  """A :class:`ScoringModel` as is; a plain ``logits_fn(input_ids, attention_mask)`` wrapped."""
  if isinstance(model, ScoringModel):
    return model
  if callable(model):
    return FunctionModel(model)
  raise TypeError(f"expected a ScoringModel or a logits function, got {type(model).__name__}")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _length_sorted_batches(
  lengths: np.ndarray, batch_size: int, length_multiple: int, progress_description: str | None
) -> Iterator[tuple[np.ndarray, int]]:
  """``(rows, padded_length)`` per batch of at most ``batch_size`` rows, shortest rows first
  (fewer pad tokens and distinct shapes), with a progress bar when ``progress_description``
  is given."""
  order = np.argsort(lengths, kind="stable")
  bar = tqdm(
    total=len(lengths), desc=progress_description, disable=progress_description is None, leave=False
  )
  for start in range(0, len(order), batch_size):
    rows = order[start : start + batch_size]
    yield rows, _round_up(int(lengths[rows].max()), length_multiple)
    bar.update(len(rows))
  bar.close()


def score_answers(
  model: ScoringModel,
  encoded: Sequence[EncodedAnswer],
  *,
  pad_token_id: int,
  batch_size: int,
  length_multiple: int,
  progress_description: str | None = None,
) -> np.ndarray:
  """Mean answer-token NLL of every encoded sequence, batched.

  Args:
    model: The model.
    encoded: The sequences (:func:`~train.data.prompting.encode_answer`).
    pad_token_id: Token used for (right) padding; never scored.
    batch_size: Rows per batch (the last batch is filled up with copies, then dropped).
    length_multiple: Sequence lengths are rounded up to a multiple of this.
    progress_description: Show a progress bar with this description; ``None`` for none.

  Returns:
    ``[len(encoded)]`` float64 mean NLLs, in the order of ``encoded``.
  """
  nll = np.zeros(len(encoded), np.float64)
  if not encoded:
    return nll
  lengths = np.array([len(e.input_ids) for e in encoded])
  fused = getattr(model, "answer_nll", None)
  for rows, length in _length_sorted_batches(
    lengths, batch_size, length_multiple, progress_description
  ):
    ids = np.full((batch_size, length), pad_token_id, np.int32)
    attention = np.zeros((batch_size, length), np.int32)
    target = np.zeros((batch_size, length), np.int32)
    for r, i in enumerate(rows):
      e = encoded[i]
      ids[r, : len(e.input_ids)] = e.input_ids
      attention[r, : len(e.input_ids)] = 1
      target[r, e.num_prompt_tokens : len(e.input_ids)] = 1
    ids[len(rows) :], attention[len(rows) :], target[len(rows) :] = ids[0], attention[0], target[0]
    if fused is not None:
      batch_nll = fused(ids, attention, target)
    else:
      batch_nll = _jitted_masked_mean_nll(model.logits(ids, attention), ids, target)
    nll[rows] = np.asarray(batch_nll, np.float64)[: len(rows)]
  return nll


def _stop_ids(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
  if eos_token_id is None:
    return frozenset()
  if isinstance(eos_token_id, (int, np.integer)):
    return frozenset({int(eos_token_id)})
  return frozenset(int(t) for t in eos_token_id)


def generate_greedy(
  model: ScoringModel,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  eos_token_id: int | Sequence[int] | None,
  pad_token_id: int,
  batch_size: int,
  length_multiple: int,
  progress_description: str | None = None,
) -> list[list[int]]:
  """Greedy continuations of token-id prompts, cut before the first EOS.

  ``eos_token_id`` may be several ids (a chat template's end-of-turn token and the
  tokenizer's EOS): a row ends at the first of any of them; ``None`` cuts nothing.

  Prompts are left-padded to a multiple of ``length_multiple`` in batches of
  ``batch_size`` rows (sorted by length; results come back in prompt order).

  Returns:
    One list of new token ids per prompt, without the EOS and what follows it.
  """
  outputs: list[list[int]] = [[] for _ in prompts]
  if not prompts or max_new_tokens <= 0:
    return outputs
  lengths = np.array([len(p) for p in prompts])
  if lengths.min() == 0:
    raise ValueError(f"prompt {int(lengths.argmin())} has no token")
  stop_ids = _stop_ids(eos_token_id)
  for rows, length in _length_sorted_batches(
    lengths, batch_size, length_multiple, progress_description
  ):
    ids = np.full((batch_size, length), pad_token_id, np.int32)
    attention = np.zeros((batch_size, length), np.int32)
    for r, i in enumerate(rows):
      ids[r, length - lengths[i] :] = prompts[i]
      attention[r, length - lengths[i] :] = 1
    ids[len(rows) :], attention[len(rows) :] = ids[0], attention[0]
    new_tokens = np.asarray(model.generate(ids, attention, max_new_tokens))
    if new_tokens.shape[:1] != (batch_size,) or new_tokens.ndim != 2:
      raise ValueError(
        f"generate returned shape {new_tokens.shape}; expected ({batch_size}, <= {max_new_tokens})"
      )
    for r, i in enumerate(rows):
      tokens = new_tokens[r].tolist()
      end = next((k for k, t in enumerate(tokens) if t in stop_ids), len(tokens))
      outputs[i] = tokens[:end]
  return outputs


def generate_texts(
  model: ScoringModel,
  encoder: Any,
  prompts: Sequence[str],
  *,
  max_new_tokens: int,
  pad_token_id: int,
  batch_size: int,
  length_multiple: int,
  progress_description: str | None = None,
) -> list[str]:
  """Greedy answers to rendered ``prompts`` (``encoder``: a
  ``train.data.prompting.PromptEncoder``), cut at its stop tokens and decoded without
  special tokens; not stripped (the paper's token entropy counts a leading space)."""
  new_tokens = generate_greedy(
    model,
    [encoder.encode_prompt(p) for p in prompts],
    max_new_tokens=max_new_tokens,
    eos_token_id=encoder.stop_token_ids,
    pad_token_id=pad_token_id,
    batch_size=batch_size,
    length_multiple=length_multiple,
    progress_description=progress_description,
  )
  return [encoder.tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
