"""Scalar numerics shared by the optimizers.

The reference computes bias-correction coefficients such as ``1 - beta**t`` in float64
before they meet float32 tensors. JAX runs in float32 by default, and the naive float32
``1 - 0.999**t`` loses ~1e-5 relative accuracy (the power rounds to a number close to 1,
then the subtraction cancels). ``-expm1(t * log(beta))`` has no cancellation: with
``log(beta)`` taken in float64 while ``beta`` is still a Python number, the result is
accurate to a few float32 ulps for every ``t``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def is_concrete_number(value: Any) -> bool:
  """True for Python numbers and concrete (non-traced) scalar arrays."""
  if isinstance(value, jax.core.Tracer):
    return False
  try:
    float(value)
  except (TypeError, ValueError):
    return False
  return True


def log_of_decay(beta: Any) -> jax.Array:
  """``log(beta)`` as float32, computed in float64 when ``beta`` is concrete."""
  if is_concrete_number(beta):
    beta = float(beta)
    return jnp.float32(-math.inf if beta == 0.0 else math.log(beta))
  # Traced (e.g. under `optax.inject_hyperparams`): `beta` already lives in float32,
  # so its own representation error bounds the accuracy; log1p avoids adding more.
  beta = jnp.asarray(beta, jnp.float32)
  return jnp.log1p(beta - 1.0)


def one_minus_power(beta: Any, count: jax.Array) -> jax.Array:
  """``1 - beta**count`` in float32 without cancellation.

  Args:
    beta: decay rate in [0, 1), a Python number or a scalar array.
    count: non-negative integer scalar array (the exponent).

  Returns:
    A float32 scalar. ``count == 0`` gives exactly 0.
  """
  exponent = count.astype(jnp.float32) * log_of_decay(beta)
  # beta == 0 gives 0 * -inf = nan at count 0; 1 - 0**0 = 0 there by convention.
  return jnp.where(count == 0, jnp.float32(0.0), -jnp.expm1(exponent))


def one_minus(beta: Any) -> Any:
  """``1 - beta``, kept a Python float when ``beta`` is one (rounded once to float32)."""
  if is_concrete_number(beta):
    return 1.0 - float(beta)
  return 1.0 - beta
