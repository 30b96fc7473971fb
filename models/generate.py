"""Greedy decoding with a preallocated KV cache, compiled as one `jax.jit` call.

Prompts are left-padded so every row's last prompt token sits in the same
cache slot; the prefill fills slots [0, prompt_len) and step i writes slot
prompt_len + i. The whole decode loop is a `lax.while_loop`, so there is one
compiled program per (shape, max_new_tokens) and no Python loop per token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import KVCache
from models.transformer import CausalLM, default_positions


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  max_new_tokens: int,
  eos_ids: jax.Array,
  pad_id: jax.Array,
) -> jax.Array:
  model = nnx.merge(graphdef, state)
  config = model.config
  batch, prompt_len = input_ids.shape
  caches = [
    KVCache.zeros(batch, prompt_len + max_new_tokens, config) for _ in range(config.num_layers)
  ]
  # Generated slots are all real tokens; causality hides the unfilled ones.
  key_valid = jnp.concatenate(
    [attention_mask.astype(bool), jnp.ones((batch, max_new_tokens), bool)], axis=1
  )
  positions = default_positions(attention_mask)
  logits, caches = model.forward_with_cache(input_ids, positions, key_valid, caches, 0)
  next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  last_position = positions[:, -1]

  def cond(carry):
    step, _, _, _, done = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, token, caches, out, done = carry
    # Rows that already emitted EOS emit padding, like HF generate.
    token = jnp.where(done, pad_id, token)
    out = out.at[:, step].set(token)
    done = done | jnp.isin(token, eos_ids)
    logits, caches = model.forward_with_cache(
      token[:, None], (last_position + 1 + step)[:, None], key_valid, caches, prompt_len + step
    )
    token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    return step + 1, token, caches, out, done

  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  carry = (jnp.int32(0), next_token, caches, out, jnp.zeros((batch,), bool))
  return jax.lax.while_loop(cond, body, carry)[3]


def generate(
  model: CausalLM,
  input_ids: jax.Array,
  attention_mask: jax.Array | None = None,
  *,
  max_new_tokens: int,
  eos_token_id: int | Sequence[int] | None = None,
  pad_token_id: int | None = None,
) -> jax.Array:
  """Greedy continuation of a left-padded batch of prompts.

  Args:
    model: The causal LM (LoRA dropout should be off: call `model.eval()`).
    input_ids: [batch, prompt_len] left-padded prompt ids.
    attention_mask: [batch, prompt_len], 0 at padding; None for no padding.
    max_new_tokens: Number of tokens to generate per row.
    eos_token_id: Id(s) that end a row; defaults to the config's EOS.
    pad_token_id: Filler after a row's EOS; defaults to the config's pad id,
      else the first EOS id, else 0.

  Returns:
    [batch, max_new_tokens] int32 new tokens; after a row's EOS (which is
    included) the row holds `pad_token_id`. Decoding stops early when every
    row has finished.
  """
  config = model.config
  if eos_token_id is None:
    eos_ids = config.eos_token_ids
  elif isinstance(eos_token_id, int):
    eos_ids = (eos_token_id,)
  else:
    eos_ids = tuple(int(e) for e in eos_token_id)
  if pad_token_id is None:
    pad_token_id = config.pad_token_id
  if pad_token_id is None:
    pad_token_id = eos_ids[0] if eos_ids else 0
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  graphdef, state = nnx.split(model)
  # EOS/pad ids are traced (not static) so changing them does not recompile;
  # -1 never matches a token and stands in for "no EOS".
  eos_array = jnp.asarray(eos_ids or (-1,), jnp.int32)
  return _greedy(
    graphdef,
    state,
    input_ids,
    jnp.asarray(attention_mask, jnp.int32),
    max_new_tokens,
    eos_array,
    jnp.int32(pad_token_id),
  )
