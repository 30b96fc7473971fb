"""Rotary position embedding (RoPE), full or partial, HF "rotate_half" layout.

HF rotates the first `rotary_dim` features of each head by pairing feature i
with feature i + rotary_dim / 2 (not adjacent pairs), and leaves the remaining
features untouched (Phi's `partial_rotary_factor`). We follow that layout so
checkpoints load without permuting q/k weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(
  positions: jax.Array, rotary_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
  """Cosine and sine tables for integer `positions`.

  Args:
    positions: [batch, seq] integer positions.
    rotary_dim: Number of rotated features per head (even).
    theta: RoPE base.

  Returns:
    (cos, sin), each [batch, seq, rotary_dim] in float32.
  """
  exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
  inv_freq = 1.0 / (theta**exponents)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  freqs = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(freqs), jnp.sin(freqs)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, rotary_dim: int) -> jax.Array:
  """Rotates the first `rotary_dim` features of every head of `x`.

  Args:
    x: [batch, seq, heads, head_dim].
    cos, sin: [batch, seq, rotary_dim] from `rotary_angles`.
    rotary_dim: Number of leading features to rotate.

  Returns:
    Array like `x`.
  """
  if rotary_dim == 0:
    return x
  x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
  half = rotary_dim // 2
  rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  # Rotate in float32 and cast back: bf16 angles lose precision at long range.
  x_rot = x_rot.astype(jnp.float32) * cos + rotated_half.astype(jnp.float32) * sin
  return jnp.concatenate([x_rot.astype(x.dtype), x_pass], axis=-1)
