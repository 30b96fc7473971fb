"""Causal self-attention with grouped-query heads, RoPE and a functional KV cache.

The cache is a plain pytree (`KVCache`) passed in and returned, not module
state, so the generation loop can carry it through `lax.while_loop` while the
model's parameters stay read-only.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models import sharding
from models.layers import Dense, LayerNorm, dense_group, dot, materialized_transpose
from models.rotary import apply_rotary


class KVCache(NamedTuple):
  """Keys and values of one layer for every cache slot.

  Attributes:
    k: [batch, max_len, num_kv_heads, head_dim].
    v: [batch, max_len, num_kv_heads, head_dim].
  """

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, batch: int, max_len: int, config: Any) -> KVCache:
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    return cls(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype))


def _einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype: Any) -> jax.Array:
  """`jnp.einsum` accumulated in float32 and returned in `out_dtype`."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _attention_fwd(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  # Scores, softmax and probabilities stay float32 for 16-bit q/k/v (HF Llama
  # rounds the scores to the compute dtype first); only the probabilities
  # that multiply v are cast to v's dtype, as HF does.
  scores = _einsum("bhqd,bhkd->bhqk", q, k, jnp.float32) * scale
  # A finite fill keeps fully-masked rows (padding queries) NaN-free.
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = _einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v, v.dtype)
  return out, (q, k, v, mask, probs)


def _attention_bwd(
  scale: float, residuals: tuple[jax.Array, ...], g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, None]:
  q, k, v, mask, probs = residuals
  g_probs = _einsum("bhqd,bhkd->bhqk", g, v, jnp.float32)
  # Softmax backward; masked scores got a constant fill, so no gradient.
  g_scores = probs * (g_probs - (g_probs * probs).sum(-1, keepdims=True))
  g_scores = jnp.where(mask, g_scores * scale, 0.0)
  g_q = _einsum("bhqk,bhkd->bhqd", g_scores.astype(k.dtype), k, q.dtype)
  # Key/value gradients contract the query axis: transpose the narrow
  # [.., q, head_dim] operand instead of the [.., q, k] one.
  g_k = materialized_transpose(dot(materialized_transpose(q), g_scores.astype(q.dtype)))
  g_v = materialized_transpose(dot(materialized_transpose(g), probs.astype(g.dtype)))
  return g_q, g_k, g_v, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
  """Softmax attention on head-major operands, with a hand-written backward.

  Args:
    q: [batch, heads, q_len, head_dim].
    k, v: [batch, heads, kv_len, head_dim].
    mask: boolean, broadcastable to [batch, heads, q_len, kv_len].
    scale: Multiplier on the scores.

  Returns:
    [batch, heads, q_len, head_dim].
  """
  return _attention_fwd(q, k, v, mask, scale)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
  """Masked softmax attention with grouped key/value heads.

  Args:
    q: [batch, q_len, num_heads, head_dim].
    k, v: [batch, kv_len, num_kv_heads, head_dim]; query head h reads kv head
      h // (num_heads // num_kv_heads), as in HF `repeat_kv`.
    mask: [batch, q_len, kv_len] boolean, True where attending is allowed.
    scale: Multiplier on the scores.

  Returns:
    [batch, q_len, num_heads, head_dim].
  """
  batch, q_len, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  groups = num_heads // num_kv_heads
  # Head-major 4-D operands only: XLA:CPU runs [batch, heads] batched matmuls
  # far faster than 5-D grouped ones. The query heads sharing a kv head are
  # folded into the query axis (and the mask tiled to match), so
  # grouped-query attention needs no repeated keys/values.
  q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  q = q.reshape(batch, num_kv_heads, groups * q_len, head_dim)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  mask = jnp.tile(mask, (1, groups, 1))[:, None]
  out = _attention(q, k, v, mask, scale)
  out = out.reshape(batch, num_kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
  return out.reshape(batch, q_len, num_heads, head_dim)


class Attention(nnx.Module):
  """Multi-head / grouped-query causal self-attention.

  Projections are named q_proj, k_proj, v_proj, o_proj for every family
  (GPT-2's fused c_attn is split by the checkpoint mapping).
  """

  def __init__(self, config: Any, layer_idx: int, rngs: nnx.Rngs):
    self.num_heads = config.num_heads
    self.num_kv_heads = config.num_kv_heads
    self.head_dim = config.head_dim
    self.rotary_dim = config.rotary_dim if config.position_type == "rotary" else 0
    self.scale = config.attn_scale
    if config.scale_attn_by_inverse_layer_idx:
      self.scale /= layer_idx + 1
    d = config.hidden_size
    q_width = config.num_heads * config.head_dim
    kv_width = config.num_kv_heads * config.head_dim
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    self.q_proj = Dense(
      d, q_width, (sharding.EMBED, sharding.HEADS), use_bias=config.qkv_bias, **kw
    )
    self.k_proj = Dense(
      d, kv_width, (sharding.EMBED, sharding.KV_HEADS), use_bias=config.qkv_bias, **kw
    )
    self.v_proj = Dense(
      d, kv_width, (sharding.EMBED, sharding.KV_HEADS), use_bias=config.qkv_bias, **kw
    )
    self.o_proj = Dense(
      q_width, d, (sharding.HEADS, sharding.EMBED), use_bias=config.attn_out_bias, **kw
    )
    if config.qk_layernorm:
      norm_kw = dict(axes=(sharding.HEAD_DIM,), **kw)
      self.q_norm = LayerNorm(config.head_dim, config.norm_eps, **norm_kw)
      self.k_norm = LayerNorm(config.head_dim, config.norm_eps, **norm_kw)
    else:
      self.q_norm = nnx.data(None)
      self.k_norm = nnx.data(None)

  def input_projections(self) -> tuple[Dense, ...]:
    """The projections applied to the attention input (fused into one matmul)."""
    return (self.q_proj, self.k_proj, self.v_proj)

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
    projected: list[jax.Array] | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Attends `x` to itself (and to the cache, if given).

    Args:
      x: [batch, seq, hidden].
      mask: [batch, seq, kv_len] boolean; kv_len is seq without a cache, or
        the cache length with one.
      rope: (cos, sin) for the positions of `x`, or None (no rotary).
      cache: This layer's cache; the new keys/values are written at
        `cache_index` and attention runs over the whole cache.
      cache_index: First cache slot of `x`.
      projected: `input_projections()` applied to `x`, if the caller already
        computed them (Phi fuses them with the MLP's); else computed here.

    Returns:
      (output [batch, seq, hidden], updated cache or None).
    """
    batch, seq, _ = x.shape
    if projected is None:
      projected = dense_group(x, self.input_projections())
    q, k, v = projected
    q = q.reshape(batch, seq, self.num_heads, self.head_dim)
    k = k.reshape(batch, seq, self.num_kv_heads, self.head_dim)
    v = v.reshape(batch, seq, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      cos, sin = rope
      q = apply_rotary(q, cos, sin, self.rotary_dim)
      k = apply_rotary(k, cos, sin, self.rotary_dim)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      cache = KVCache(
        jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
        jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start),
      )
      k, v = cache.k, cache.v
    out = dot_product_attention(q, k, v, mask, self.scale)
    return self.o_proj(out.reshape(batch, seq, -1)), cache
