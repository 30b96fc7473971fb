"""Causal self-attention with grouped-query heads, RoPE and a functional KV cache.

The cache is a plain pytree (`KVCache`) passed in and returned, not module
state, so the generation loop can carry it through `lax.while_loop` while the
model's parameters stay read-only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models import sharding
from models.layers import Dense, LayerNorm
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
  q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k).astype(jnp.float32) * scale
  # A finite fill keeps fully-masked rows (padding queries) NaN-free.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
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
    self.q_proj = Dense(d, q_width, (sharding.EMBED, sharding.HEADS), use_bias=config.qkv_bias, **kw)
    self.k_proj = Dense(d, kv_width, (sharding.EMBED, sharding.KV_HEADS), use_bias=config.qkv_bias, **kw)
    self.v_proj = Dense(d, kv_width, (sharding.EMBED, sharding.KV_HEADS), use_bias=config.qkv_bias, **kw)
    self.o_proj = Dense(q_width, d, (sharding.HEADS, sharding.EMBED), use_bias=config.attn_out_bias, **kw)
    if config.qk_layernorm:
      norm_kw = dict(axes=(sharding.HEAD_DIM,), **kw)
      self.q_norm = LayerNorm(config.head_dim, config.norm_eps, **norm_kw)
      self.k_norm = LayerNorm(config.head_dim, config.norm_eps, **norm_kw)
    else:
      self.q_norm = nnx.data(None)
      self.k_norm = nnx.data(None)

  def __call__(
      self,
      x: jax.Array,
      mask: jax.Array,
      rope: tuple[jax.Array, jax.Array] | None,
      cache: KVCache | None = None,
      cache_index: jax.Array | int = 0,
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

    Returns:
      (output [batch, seq, hidden], updated cache or None).
    """
    batch, seq, _ = x.shape
    q = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
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
