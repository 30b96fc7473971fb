"""Building blocks shared by all families: projections, embeddings, norms, MLPs.

Kernels are stored (in_features, out_features), the JAX convention; the
checkpoint mapping transposes PyTorch `nn.Linear` weights on the way in/out.
Every parameter carries logical axis names (see `models/sharding.py`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models import sharding
from models.sharding import AxisNames

_INIT = nnx.initializers.normal(stddev=0.02)


def param(
    rngs: nnx.Rngs,
    init: Callable[..., jax.Array],
    shape: tuple[int, ...],
    dtype: Any,
    axes: AxisNames,
    kind: type[nnx.Param] = nnx.Param,
) -> nnx.Param:
  """Creates a `kind` parameter annotated with logical `axes` (not sharded yet)."""
  initializer = nnx.with_partitioning(init, axes, eager_sharding=False)
  return kind(initializer(rngs.params(), shape, dtype))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # HF "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation called `name` in HF configs."""
  if name not in _ACTIVATIONS:
    raise NotImplementedError(
        f"Activation {name!r} is not implemented; known: {sorted(_ACTIVATIONS)}"
    )
  return _ACTIVATIONS[name]


class Dense(nnx.Module):
  """Affine projection `x @ kernel + bias` with an optional LoRA adapter slot.

  Attributes:
    kernel: (in_features, out_features) weight.
    bias: (out_features,) bias or None.
    lora: None, or an adapter module set by `models.lora.apply_lora`; its
      output is added to the projection.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      axes: tuple[str, str],
      *,
      use_bias: bool,
      dtype: Any,
      param_dtype: Any,
      rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.axes = axes
    self.dtype = dtype
    self.kernel = param(rngs, _INIT, (in_features, out_features), param_dtype, axes)
    self.bias = (
        param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, (axes[1],))
        if use_bias
        else nnx.data(None)
    )
    self.lora = nnx.data(None)

  def effective_kernel(self) -> jax.Array:
    """The kernel with any LoRA update folded in (what export writes)."""
    kernel = self.kernel[...]
    if self.lora is not None:
      kernel = (kernel.astype(jnp.float32) + self.lora.delta_kernel()).astype(kernel.dtype)
    return kernel

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = x @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora is not None:
      y = y + self.lora(x).astype(self.dtype)
    return y


class Embedding(nnx.Module):
  """Token (or position) embedding table of shape (num_embeddings, features)."""

  def __init__(
      self,
      num_embeddings: int,
      features: int,
      axes: AxisNames,
      *,
      dtype: Any,
      param_dtype: Any,
      rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.embedding = param(rngs, _INIT, (num_embeddings, features), param_dtype, axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Projects `x` onto the embedding rows (tied LM head)."""
    return x.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, statistics in float32 (like torch)."""

  def __init__(
      self, features: int, eps: float, *, dtype: Any, param_dtype: Any,
      rngs: nnx.Rngs, axes: AxisNames = (sharding.EMBED,)
  ):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones, (features,), param_dtype, axes)
    self.bias = param(rngs, nnx.initializers.zeros, (features,), param_dtype, axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """Llama RMSNorm: normalise in float32, cast, then multiply by the scale."""

  def __init__(
      self, features: int, eps: float, *, dtype: Any, param_dtype: Any,
      rngs: nnx.Rngs, axes: AxisNames = (sharding.EMBED,)
  ):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones, (features,), param_dtype, axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


def make_norm(config: Any, rngs: nnx.Rngs) -> LayerNorm | RMSNorm:
  """The residual-stream norm chosen by `config.norm_type`."""
  cls = RMSNorm if config.norm_type == "rmsnorm" else LayerNorm
  return cls(
      config.hidden_size, config.norm_eps, dtype=config.dtype,
      param_dtype=config.param_dtype, rngs=rngs,
  )


class DenseMLP(nnx.Module):
  """Two-layer MLP `down(act(up(x)))` (Phi fc1/fc2, GPT-2 c_fc/c_proj)."""

  def __init__(self, config: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=config.mlp_bias, dtype=config.dtype,
              param_dtype=config.param_dtype, rngs=rngs)
    d, f = config.hidden_size, config.intermediate_size
    self.up_proj = Dense(d, f, (sharding.EMBED, sharding.MLP), **kw)
    self.down_proj = Dense(f, d, (sharding.MLP, sharding.EMBED), **kw)
    self.act = activation_fn(config.activation)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.up_proj(x)))


class GatedMLP(nnx.Module):
  """Gated MLP `down(act(gate(x)) * up(x))` (Llama SwiGLU)."""

  def __init__(self, config: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=config.mlp_bias, dtype=config.dtype,
              param_dtype=config.param_dtype, rngs=rngs)
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = Dense(d, f, (sharding.EMBED, sharding.MLP), **kw)
    self.up_proj = Dense(d, f, (sharding.EMBED, sharding.MLP), **kw)
    self.down_proj = Dense(f, d, (sharding.MLP, sharding.EMBED), **kw)
    self.act = activation_fn(config.activation)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
