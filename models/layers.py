"""Building blocks shared by all families: projections, embeddings, norms, MLPs.

Kernels are stored (in_features, out_features), the JAX convention; the
checkpoint mapping transposes PyTorch `nn.Linear` weights on the way in/out.
Every parameter carries logical axis names (see `models/sharding.py`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """Tanh-approximated GELU that saves only its input for the backward pass.

  Autodiff would store tanh(...) as well and write it out in the forward.
  """
  return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return gelu_tanh(x), x


def _gelu_tanh_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  c = np.sqrt(2 / np.pi).astype(x.dtype)
  t = jnp.tanh(c * (x + 0.044715 * x * x * x))
  dt = (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
  return (g * (0.5 * (1 + t) + 0.5 * x * dt),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  # HF "gelu_new" and "gelu_pytorch_tanh" are the tanh approximation.
  "gelu_new": gelu_tanh,
  "gelu_pytorch_tanh": gelu_tanh,
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


def materialized_transpose(x: jax.Array) -> jax.Array:
  """Swaps the last two axes; on CPU as a real copy XLA may not fold away.

  XLA:CPU sends a dot that contracts the leading (non-minor) axis of both
  operands, as every weight gradient does, to a slow generic kernel, and
  rewrites an explicit transpose next to a dot back into that form. The
  barriers keep the transpose a separate copy (reading the stored operand
  rather than recomputing its producer), so the dot stays a plain row-major
  matmul for XLA:CPU's fast kernels.
  """
  if jax.default_backend() != "cpu":
    return jnp.swapaxes(x, -1, -2)
  barrier = jax.lax.optimization_barrier
  return barrier(jnp.swapaxes(barrier(x), -1, -2))


def dot(a: jax.Array, b: jax.Array, out_dtype: Any = None) -> jax.Array:
  """`a @ b` accumulated in float32, returned in `out_dtype` (default `a`'s dtype).

  For bfloat16 operands the product is never rounded to bfloat16 before the
  cast (and XLA:CPU runs bfloat16 dots with a float32 result about twice as
  fast as with a bfloat16 one); for float32 operands it is a plain matmul.
  """
  out = jnp.matmul(a, b, preferred_element_type=jnp.float32)
  return out.astype(out_dtype or a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, kernel: jax.Array, out_dtype: Any = None) -> jax.Array:
  """`x @ kernel`, with a kernel gradient that avoids XLA:CPU's slow dot form.

  Args:
    x: [..., in].
    kernel: [in, out], same dtype as `x`.
    out_dtype: dtype of the result (default `x`'s); accumulation is float32.
      The incoming gradient is cast to `x`'s dtype before the backward matmuls.

  Returns:
    [..., out].
  """
  return dot(x, kernel, out_dtype)


def _matmul_fwd(
  x: jax.Array, kernel: jax.Array, out_dtype: Any
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return dot(x, kernel, out_dtype), (x, kernel)


def _kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """x^T g over all leading (token) axes: [in, out] from [..., in], [..., out]."""
  x = x.reshape(-1, x.shape[-1])
  g = g.reshape(-1, g.shape[-1])
  # Transpose the narrower of the two [tokens, features] operands.
  if x.shape[1] <= g.shape[1]:
    return dot(materialized_transpose(x), g)
  return materialized_transpose(dot(materialized_transpose(g), x))


def _matmul_bwd(
  out_dtype: Any, residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
  del out_dtype
  x, kernel = residuals
  g = g.astype(x.dtype)
  return dot(g, kernel.T), _kernel_grad(x, g)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_transposed(x: jax.Array, weight: jax.Array, out_dtype: Any = None) -> jax.Array:
  """`x @ weight.T` (tied LM head), with `matmul`'s fast weight gradient.

  Args:
    x: [..., in].
    weight: [out, in], same dtype as `x`.
    out_dtype: dtype of the result, as for `matmul`.

  Returns:
    [..., out].
  """
  return dot(x, weight.T, out_dtype)


def _matmul_transposed_fwd(
  x: jax.Array, weight: jax.Array, out_dtype: Any
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return dot(x, weight.T, out_dtype), (x, weight)


def _matmul_transposed_bwd(
  out_dtype: Any, residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
  del out_dtype
  x, weight = residuals
  g = g.astype(x.dtype)
  return dot(g, weight), materialized_transpose(_kernel_grad(x, g))


matmul_transposed.defvjp(_matmul_transposed_fwd, _matmul_transposed_bwd)


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

  def __call__(self, x: jax.Array, out_dtype: Any = None) -> jax.Array:
    """`x @ kernel + bias` computed in `self.dtype` with float32 accumulation.

    Args:
      x: [..., in_features].
      out_dtype: dtype of the result (default `self.dtype`), e.g. float32
        logits from a bfloat16 model.
    """
    x = x.astype(self.dtype)
    y = matmul(x, self.kernel[...].astype(self.dtype), out_dtype or self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    if self.lora is not None:
      y = y + self.lora(x).astype(y.dtype)
    return y


def dense_group(x: jax.Array, denses: Sequence[Dense]) -> list[jax.Array]:
  """Applies several `Dense` projections of the same input as one matmul.

  The kernels are concatenated along their output axis at compute time, so
  parameters, checkpoints and sharding annotations stay per projection. One
  wide matmul keeps the CPU's matmul kernels busier than several narrow ones,
  and the backward pass gets one input-gradient matmul instead of one each.

  Args:
    x: [..., in_features], shared by every projection.
    denses: Projections with the same `in_features` and compute dtype.

  Returns:
    One output per projection, as `dense(x)` would give.
  """
  if len(denses) == 1:
    return [denses[0](x)]
  dtype = denses[0].dtype
  x = x.astype(dtype)
  kernel = jnp.concatenate([d.kernel[...].astype(dtype) for d in denses], axis=1)
  y = matmul(x, kernel)
  with_bias = [d.bias is not None for d in denses]
  if all(with_bias):
    y = y + jnp.concatenate([d.bias[...].astype(dtype) for d in denses])
  ends = list(itertools.accumulate(d.out_features for d in denses))
  outputs = jnp.split(y, ends[:-1], axis=-1)
  for i, d in enumerate(denses):
    if d.bias is not None and not all(with_bias):
      outputs[i] = outputs[i] + d.bias[...].astype(dtype)
    if d.lora is not None:
      outputs[i] = outputs[i] + d.lora(x).astype(dtype)
  return outputs


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

  def attend(self, x: jax.Array, out_dtype: Any = None) -> jax.Array:
    """Projects `x` onto the embedding rows (tied LM head), result in `out_dtype`."""
    weight = self.embedding[...].astype(self.dtype)
    return matmul_transposed(x.astype(self.dtype), weight, out_dtype or self.dtype)


def _layer_norm_fwd(
  x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(var + eps)
  normed = (x - mean) * rstd
  return normed * scale + bias, (normed, rstd, scale)


def _layer_norm_bwd(
  eps: float, residuals: tuple[jax.Array, jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  del eps
  normed, rstd, scale = residuals
  batch_axes = tuple(range(g.ndim - 1))
  g_normed = g * scale
  # d/dx of (x - mean) * rstd, in the closed form torch's kernel also uses.
  dx = rstd * (
    g_normed
    - g_normed.mean(-1, keepdims=True)
    - normed * (g_normed * normed).mean(-1, keepdims=True)
  )
  return dx, (g * normed).sum(batch_axes), g.sum(batch_axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """float32 LayerNorm over the last axis with a hand-written backward pass.

  Autodiff of the forward yields a long chain of small elementwise ops that
  XLA:CPU fuses into (and recomputes in) every consumer of the residual
  gradient; the closed-form gradient is a few fused passes.
  """
  return _layer_norm_fwd(x, scale, bias, eps)[0]


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class _ScaledNorm(nnx.Module):
  """What both norms hold: `eps`, the compute dtype and a per-feature scale (ones)."""

  def __init__(
    self,
    features: int,
    eps: float,
    *,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
    axes: AxisNames = (sharding.EMBED,),
  ):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones, (features,), param_dtype, axes)


class LayerNorm(_ScaledNorm):
  """LayerNorm with scale and bias, statistics in float32 (like torch)."""

  def __init__(self, features: int, eps: float, **kwargs: Any):
    super().__init__(features, eps, **kwargs)
    axes = kwargs.get("axes", (sharding.EMBED,))
    param_dtype, rngs = kwargs["param_dtype"], kwargs["rngs"]
    self.bias = param(rngs, nnx.initializers.zeros, (features,), param_dtype, axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = _layer_norm(
      x.astype(jnp.float32),
      self.scale[...].astype(jnp.float32),
      self.bias[...].astype(jnp.float32),
      self.eps,
    )
    return y.astype(self.dtype)


class RMSNorm(_ScaledNorm):
  """Llama RMSNorm: normalise in float32, cast, then multiply by the scale."""

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


def make_norm(config: Any, rngs: nnx.Rngs) -> LayerNorm | RMSNorm:
  """The residual-stream norm chosen by `config.norm_type`."""
  cls = RMSNorm if config.norm_type == "rmsnorm" else LayerNorm
  return cls(
    config.hidden_size,
    config.norm_eps,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    rngs=rngs,
  )


class DenseMLP(nnx.Module):
  """Two-layer MLP `down(act(up(x)))` (Phi fc1/fc2, GPT-2 c_fc/c_proj)."""

  def __init__(self, config: Any, rngs: nnx.Rngs):
    kw = dict(
      use_bias=config.mlp_bias, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
    )
    d, f = config.hidden_size, config.intermediate_size
    self.up_proj = Dense(d, f, (sharding.EMBED, sharding.MLP), **kw)
    self.down_proj = Dense(f, d, (sharding.MLP, sharding.EMBED), **kw)
    self.act = activation_fn(config.activation)

  def input_projections(self) -> tuple[Dense, ...]:
    """The projections applied to the MLP input (fusable with others on it)."""
    return (self.up_proj,)

  def __call__(self, x: jax.Array, projected: Sequence[jax.Array] | None = None) -> jax.Array:
    """MLP of `x`; `projected` is `input_projections()` of x if already computed."""
    (up,) = projected if projected is not None else dense_group(x, self.input_projections())
    return self.down_proj(self.act(up))


class GatedMLP(nnx.Module):
  """Gated MLP `down(act(gate(x)) * up(x))` (Llama SwiGLU)."""

  def __init__(self, config: Any, rngs: nnx.Rngs):
    kw = dict(
      use_bias=config.mlp_bias, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
    )
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = Dense(d, f, (sharding.EMBED, sharding.MLP), **kw)
    self.up_proj = Dense(d, f, (sharding.EMBED, sharding.MLP), **kw)
    self.down_proj = Dense(f, d, (sharding.MLP, sharding.EMBED), **kw)
    self.act = activation_fn(config.activation)

  def input_projections(self) -> tuple[Dense, ...]:
    """The projections applied to the MLP input (fusable with others on it)."""
    return (self.gate_proj, self.up_proj)

  def __call__(self, x: jax.Array, projected: Sequence[jax.Array] | None = None) -> jax.Array:
    """MLP of `x`; `projected` is `input_projections()` of x if already computed."""
    gate, up = projected if projected is not None else dense_group(x, self.input_projections())
    return self.down_proj(self.act(gate) * up)
