"""Low-rank adapters (LoRA) on chosen projections, and the helpers to train only them.

`apply_lora` puts a `LoRAAdapter` into the `lora` slot of every targeted
`Dense`; the adapter adds `dropout(x) @ a @ b * alpha / rank` to the
projection. `b` starts at zero, so a fresh adapter leaves the model's output
unchanged. Adapter weights are `LoRAParam`s (a subclass of `nnx.Param`) and
live under a path component named "lora", which is how the optax helpers find
them in any parameter tree (nnx State, pure dict, ...).

Projection names shared by all families: q_proj, k_proj, v_proj, o_proj (attention),
up_proj, down_proj (every MLP), gate_proj (gated MLPs), lm_head (untied heads).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import sharding
from models.layers import Dense, param


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
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q_proj", "v_proj")


class LoRAAdapter(nnx.Module):
  """The low-rank update of one projection: `dropout(x) @ a @ b * scaling`."""

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

  def __call__(self, x: jax.Array) -> jax.Array:
    a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
    return (self.dropout(x) @ a) @ b * self.scaling

  def delta_kernel(self) -> jax.Array:
    """The (in, out) float32 update this adapter adds to the base kernel."""
    a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    return a @ b * self.scaling


def _projections(model: nnx.Module) -> list[tuple[tuple[Any, ...], Dense]]:
  return [
    (path, node)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, Dense) and "lora" not in path
  ]


def apply_lora(
  model: nnx.Module, config: LoRAConfig, rngs: nnx.Rngs, **adapter_kwargs: Any
) -> nnx.Module:
  """Adds adapters in place to every projection named in `config.targets`.

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
  for _, dense in targets:
    dense.lora = LoRAAdapter(dense, config, rngs, **adapter_kwargs)
  return model


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
