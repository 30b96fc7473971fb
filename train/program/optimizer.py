"""The configured optimizer, and the diagnostics it exposes (the paper's Figure-2 cosines)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import dualoptax
from train.config import OptimizerConfig


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """The configured optimizer, with optional clipping and linear warmup."""
  learning_rate: Any = config.learning_rate
  if config.warmup_steps:
    learning_rate = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  common = dict(
    b1=config.b1,
    b2=config.b2,
    eps=config.eps,
    weight_decay=config.weight_decay,
    forget_lr_ratio=config.forget_lr_ratio,
    retain_lr_ratio=config.retain_lr_ratio,
    forget_steps=config.forget_steps,
    retain_steps=config.retain_steps,
  )
  if config.name == "adam":
    tx = dualoptax.adamw(learning_rate, **common)
  elif config.name == "dualoptim":
    tx = dualoptax.dualoptim(learning_rate, state_bits=config.state_bits, **common)
  else:
    tx = dualoptax.dualoptim_plus(
      learning_rate,
      base_b1=config.base_b1,
      base_b2=config.base_b2,
      state_bits=config.state_bits,
      **common,
    )
  if config.clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)
  return tx


def optimizer_diagnostics_fn(
  config: OptimizerConfig, **jit_kwargs: Any
) -> Callable[[Any], dict[str, Any]] | None:
  """A jitted ``opt_state -> {name: scalar}`` of the optimizer's Figure-2 cosines (forget
  vs retain update terms), or None for an optimizer without them.

  One compiled program rather than eager per-leaf operations: on a mesh every eager
  operation is a multi-device launch, and hundreds of them queued behind a sharded step
  can exhaust XLA:CPU's per-device in-flight limit while that step waits in a collective.
  ``jit_kwargs`` go to ``jax.jit`` (e.g. ``out_shardings``). The decays and eps come from
  the optimizer's state (``dualoptax.hyperparameters``), so they match the run's.
  """
  diagnose = {
    "dualoptim_plus": dualoptax.dualoptim_plus_diagnostics,
    "dualoptim": dualoptax.dualoptim_diagnostics,
  }.get(config.name)
  if diagnose is None:
    return None

  def cosines(opt_state):
    _, total = diagnose(opt_state)
    return {
      "update_cosine": total.update_cosine,
      "preconditioned_cosine": total.preconditioned_cosine,
    }

  return jax.jit(cosines, **jit_kwargs)


def adam_preconditioner(opt_state: Any) -> Callable[[Any, Any], Any]:
  """``(g_forget, g_retain) -> 1 / (sqrt(v_hat) + eps)``: the per-element scale of Adam's
  next joint step on these gradients (its ``nu`` after seeing their sum, bias-corrected).

  Adam keeps one state for both objectives, so its forget and retain update terms are the
  two gradients through this one shared preconditioner; their cosine is Adam's point on
  the paper's Figure 2 (the momentum blends them further). Using ``nu`` after the step,
  not before, matters: an element with no gradient so far has ``nu = 0`` and would be
  scaled by ``1/eps``. ``b2`` and ``eps`` come from the state, where the optimizer
  recorded them.
  """
  state = dualoptax.find_state(opt_state, optax.ScaleByAdamState)
  hyperparams = dualoptax.hyperparameters(opt_state, optax.ScaleByAdamState)
  b2, eps = hyperparams["b2"], hyperparams["eps"]
  correction = 1 - b2 ** (state.count + 1).astype(jnp.float32)

  def scale(g_forget, g_retain):
    return jax.tree.map(
      lambda nu, f, r: 1 / (jnp.sqrt((b2 * nu + (1 - b2) * jnp.square(f + r)) / correction) + eps),
      state.nu,
      g_forget,
      g_retain,
    )

  return scale
