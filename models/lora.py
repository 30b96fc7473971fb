"""Low-rank adapters (LoRA) on chosen projections, and the helpers to train only them.

`apply_lora` puts a `LoRAAdapter` into the `lora` slot of every targeted
`Dense`; the adapter adds `dropout(x) @ a @ b * alpha / rank` to the
projection (a bounded adapter, below, a sine of `a @ b` instead; dropout on the
adapter's input, as in the LoRA paper's code, with a mask of its own per adapter).
`b` starts at zero, so a fresh adapter leaves the model's output unchanged.
Adapter weights are `LoRAParam`s (a subclass of `nnx.Param`) and live under a
path component named "lora", which is how the optax helpers find them in any
parameter tree (nnx State, pure dict, ...). Merging and export fold in each
adapter's `delta_kernel()`, so they use the same update as the forward pass.

Dropout masks come from one of two places (see `LoRAAdapter`): the adapter's
own RNG stream (NNX style: each call of a `model.train()` model draws new
masks), or masks set for one forward pass by `draw_dropout_masks`, which draws
every adapter's mask from one key in one random-bits call. Functional training
uses the latter: per-adapter draws cost XLA:CPU a threefry loop (or a Philox
expansion) per adapter and call, which made a 420-adapter unlearning step
compile 5-7x slower than without dropout; one draw costs about one adapter's.

Bounded adapters (`LoRAConfig.bounded_targets`, `BoundedLoRAAdapter`): gradient
difference (ascent on the forget set, descent on the retain set) with plain adapters can
diverge, because ascent grows the MLP adapters without bound (Garg et al. 2025, "Stable
Forgetting: Bounded Parameter-Efficient Unlearning", arXiv 2509.24166). A bounded adapter
with frequency w passes the low-rank product through an elementwise sine (the
sine-activated low-rank form of Ji et al. 2025):

    dW = (alpha / rank) * sin(w * a @ b) / w

  - near init it is the plain adapter: sin(w z) / w = z - w^2 z^3 / 6 + ..., so for small
    a @ b, dW = (alpha / rank) a @ b to first order, with the same gradients (cos(w z) ~ 1);
    `b = 0` still gives dW = 0;
  - however large a and b grow, every |dW_ij| <= alpha / (rank * w), so the adapter's
    output on any input x is bounded: |(x @ dW)_j| <= alpha / (rank * w) * ||x||_1.

The bounded forward pass materialises dW as (in, out), whose logical sharding axes are the
base kernel's (those of `a`'s rows and `b`'s columns), and multiplies `dropout(x)` by it:
an (in x out) matmul per token, as costly as the base projection's, where a plain adapter
costs (in + out) x rank.

Projection names shared by all families: q_proj, k_proj, v_proj, o_proj (attention),
up_proj, down_proj (every MLP), gate_proj (gated MLPs), lm_head (untied heads).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import sharding
from models.layers import Dense, matmul, param


class LoRAParam(nnx.Param):
  """A LoRA adapter weight; `nnx.Optimizer(model, tx, wrt=LoRAParam)` trains only these."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which projections get adapters, and their shape.

  Attributes:
    rank: Bottleneck width r.
    alpha: Scale numerator; the update is multiplied by alpha / rank.
    dropout: Dropout rate on the adapter input (active in `model.train()` mode).
    targets: Projection names to adapt (see module docstring).
    bounded_targets: Those of `targets` whose adapters are bounded (`BoundedLoRAAdapter`):
      for bounded unlearning, the MLP projections.
    frequency: The bounded adapters' frequency w (> 0); their entries stay within
      alpha / (rank * w).

  Raises:
    ValueError: If `frequency` is not positive, or `bounded_targets` names a projection
      not in `targets` (it would get no adapter, bounded or not).
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q_proj", "v_proj")
  bounded_targets: tuple[str, ...] = ()
  frequency: float = 100.0

  def __post_init__(self):
    if not self.frequency > 0:
      raise ValueError(f"LoRAConfig.frequency must be > 0, got {self.frequency!r}")
    stray = [t for t in self.bounded_targets if t not in self.targets]
    if stray:
      raise ValueError(
        f"LoRAConfig.bounded_targets {stray} are not among targets {list(self.targets)}"
      )


_BIT_VALUES = np.left_shift(np.uint8(1), np.arange(8, dtype=np.uint8))


class LoRADropoutMask(nnx.Variable):
  """An adapter's dropout keep-mask set by `draw_dropout_masks`: its input's shape with the
  last axis packed 8 bits to a byte (`jnp.packbits(keep, axis=-1, bitorder="little")`)."""


class LoRAAdapter(nnx.Module):
  """The low-rank update of one projection: `dropout(x) @ a @ b * scaling`.

  Dropout acts in training mode only (`model.train()`, or `nnx.view(model,
  deterministic=False)`) and scales kept inputs by `1 / (1 - rate)`. Its mask is
  `dropout_mask` when set (by `draw_dropout_masks`, for inputs of its shape),
  else drawn from the adapter's own stream (`dropout.rngs`, advanced each call).

  Attributes:
    a, b: The (in, rank) and (rank, out) factors (`LoRAParam`s).
    scaling: alpha / rank.
    dropout: The `nnx.Dropout` holding the rate, the mode and the RNG stream.
    dropout_mask: None, or a `LoRADropoutMask`.
  """

  def __init__(
    self, base: Dense, config: LoRAConfig, rngs: nnx.Rngs, b_init: Any = nnx.initializers.zeros
  ):
    in_axis, out_axis = base.axes
    dtype = base.kernel.get_value().dtype
    # `a` random (Kaiming-uniform-like, as in the LoRA paper's code), `b` zero.
    a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    self.a = param(
      rngs,
      a_init,
      (base.in_features, config.rank),
      dtype,
      (in_axis, sharding.LORA_RANK),
      kind=LoRAParam,
    )
    self.b = param(
      rngs,
      b_init,
      (config.rank, base.out_features),
      dtype,
      (sharding.LORA_RANK, out_axis),
      kind=LoRAParam,
    )
    self.scaling = config.alpha / config.rank
    self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
    self.dropout_mask = nnx.data(None)

  @property
  def drops(self) -> bool:
    """Whether a call drops inputs (training mode and a nonzero rate)."""
    return not self.dropout.deterministic and self.dropout.rate > 0.0

  def __call__(self, x: jax.Array) -> jax.Array:
    a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
    return (self._drop(x) @ a) @ b * self.scaling

  def _drop(self, x: jax.Array) -> jax.Array:
    """`x` after the adapter's input dropout (`dropout_mask`, else its own stream)."""
    if self.drops and self.dropout_mask is not None:
      return jnp.where(self._keep(x.shape), x / (1.0 - self.dropout.rate), jnp.zeros_like(x))
    return self.dropout(x)

  def _keep(self, shape: tuple[int, ...]) -> jax.Array:
    """`dropout_mask` unpacked to a bool array of `shape`."""
    packed = self.dropout_mask.get_value()
    bits = (packed[..., None] & _BIT_VALUES) != 0  # [..., bytes, 8], little-endian
    return bits.reshape(*packed.shape[:-1], -1)[..., : shape[-1]]

  def delta_kernel(self) -> jax.Array:
    """The (in, out) float32 update this adapter adds to the base kernel."""
    a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    return a @ b * self.scaling


class BoundedLoRAAdapter(LoRAAdapter):
  """A LoRA adapter whose update is bounded: `dropout(x) @ dW`, with

      dW = scaling * sin(frequency * a @ b) / frequency      (elementwise sine)

  To first order in `a @ b` this is the plain adapter (sin(w z) / w = z + O(w^2 z^3):
  same init, same gradients near it), but |dW_ij| <= scaling / frequency for any `a`, `b`,
  so each output entry |(x @ dW)_j| = |sum_i x_i dW_ij| <= scaling / frequency * ||x||_1:
  gradient ascent cannot blow it up (see the module docstring). The sine is taken in
  float32, then dW is cast to the compute dtype. Dropout is the plain adapter's.

  Attributes:
    frequency: w in the formula (`LoRAConfig.frequency`).
  """

  def __init__(
    self, base: Dense, config: LoRAConfig, rngs: nnx.Rngs, b_init: Any = nnx.initializers.zeros
  ):
    super().__init__(base, config, rngs, b_init=b_init)
    self.frequency = config.frequency

  def __call__(self, x: jax.Array) -> jax.Array:
    # `matmul`: the fast kernel gradient on CPU; dW trains (through a and b), unlike a base
    # kernel.
    return matmul(self._drop(x), self.delta_kernel().astype(x.dtype))

  def delta_kernel(self) -> jax.Array:
    """The (in, out) float32 update `scaling * sin(frequency * a @ b) / frequency`."""
    a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    return jnp.sin(self.frequency * (a @ b)) * (self.scaling / self.frequency)


def _projections(model: nnx.Module) -> list[tuple[tuple[Any, ...], Dense]]:
  return [
    (path, node)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, Dense) and "lora" not in path
  ]


def apply_lora(
  model: nnx.Module, config: LoRAConfig, rngs: nnx.Rngs, **adapter_kwargs: Any
) -> nnx.Module:
  """Adds adapters in place to every projection named in `config.targets`: a
  `BoundedLoRAAdapter` to those also in `config.bounded_targets`, else a `LoRAAdapter`.

  Args:
    model: A `CausalLM` (or any module built from `Dense`).
    config: Adapter settings.
    rngs: Randomness for `a` and for dropout.
    **adapter_kwargs: Passed to `LoRAAdapter` (e.g. `b_init` in tests).

  Returns:
    `model`, for chaining.

  Raises:
    ValueError: If no projection matches `config.targets`.
  """
  targets = [(p, d) for p, d in _projections(model) if p[-1] in config.targets]
  if not targets:
    names = sorted({p[-1] for p, _ in _projections(model)})
    raise ValueError(f"No projection matches LoRA targets {config.targets}; available: {names}")
  for path, dense in targets:
    kind = BoundedLoRAAdapter if path[-1] in config.bounded_targets else LoRAAdapter
    dense.lora = kind(dense, config, rngs, **adapter_kwargs)
  return model


def draw_dropout_masks(model: nnx.Module, key: jax.Array, batch_shape: tuple[int, ...]) -> None:
  """Sets the dropout mask of every dropping adapter of `model`, in place, all drawn at once.

  For the forward passes of `model` on inputs of `batch_shape` (e.g. [batch, seq]) until
  the masks are changed; deterministic for a given `key` and model structure. One
  `jax.random.bits` call with an `rbg` key (XLA's RngBitGenerator, no threefry loop)
  gives the bits of all masks, [*batch_shape, sum of the adapters' input widths]; each
  adapter keeps a slice of its own (independent masks) where `bits < (1 - rate) * 2**32`.
  The masks are stored 8 to a byte: a rematerialized model holds them through the whole
  forward and backward pass.

  Args:
    model: A model with adapters, in training mode (adapters that do not drop are left
      alone, so an evaluation-mode model draws nothing).
    key: A PRNG key (any implementation).
    batch_shape: The leading dimensions of the adapters' inputs.
  """
  adapters = [node for _, node in nnx.iter_graph(model) if isinstance(node, LoRAAdapter)]
  adapters = [adapter for adapter in adapters if adapter.drops]
  if not adapters:
    return
  # Each adapter's columns padded to whole bytes.
  widths = [-(-adapter.a.shape[0] // 8) * 8 for adapter in adapters]
  # Keep where bits < (1 - rate) * 2**32 (exact to 2**-32): one threshold per column, or
  # one for all when the rates agree.
  thresholds = [min(round((1.0 - a.dropout.rate) * 2.0**32), 2**32 - 1) for a in adapters]
  if len(set(thresholds)) == 1:
    threshold = np.uint32(thresholds[0])
  else:
    threshold = np.repeat(np.asarray(thresholds, np.uint32), widths)
  rbg_key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  keep = jax.random.bits(rbg_key, (*batch_shape, sum(widths)), jnp.uint32) < threshold
  packed = jnp.packbits(keep, axis=-1, bitorder="little")
  # Keeps XLA from fusing the bit generator into the slices below, one copy per adapter
  # (it does so with unpacked bool masks: a 420-adapter step then compiles in 39 s, not 27).
  packed = jax.lax.optimization_barrier(packed)
  starts = np.cumsum([0, *widths]) // 8
  for adapter, start, end in zip(adapters, starts[:-1], starts[1:]):
    adapter.dropout_mask = LoRADropoutMask(packed[..., start:end])


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel and removes it, in place."""
  for _, dense in _projections(model):
    if dense.lora is not None:
      dense.kernel.set_value(dense.effective_kernel())
      dense.lora = None
  return model


def _is_lora_path(path: tuple[Any, ...]) -> bool:
  keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
  return "lora" in keys


def lora_mask(params: Any) -> Any:
  """Tree of bools, True at LoRA weights: the mask for `optax.masked`.

  Works on an `nnx.State` (Variables as leaves) or a pure dict of arrays.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: _is_lora_path(path), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )


def lora_labels(params: Any, trainable: str = "lora", frozen: str = "frozen") -> Any:
  """Tree of labels for `optax.multi_transform`: `trainable` at LoRA weights, else `frozen`.

  Example::

      tx = optax.multi_transform(
          {"lora": optax.adamw(1e-4), "frozen": optax.set_to_zero()}, lora_labels)
  """
  return jax.tree.map(lambda m: trainable if m else frozen, lora_mask(params))
