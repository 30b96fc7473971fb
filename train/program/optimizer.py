"""The configured optimizer, its learning-rate schedule, and the diagnostics it exposes (the
paper's Figure-2 cosines).

The schedule and the parameter groups follow the DualOptim+ authors' trainer (Hugging Face's
``Trainer`` under their ``forget.py``): linear warmup from 0 over one epoch (their
``warmup_steps = steps_per_epoch``), then linear decay to 0 at the last step
(``get_linear_schedule_with_warmup``); no weight decay on biases and norm weights
(``Trainer.get_decay_parameter_names``); with 8-bit states, embedding tables keep float32
states (their bitsandbytes override for ``nn.Embedding``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualoptax
from train.config import ConstraintSection, OptimizerConfig, RunConfig

# Hugging Face's names of parameters without weight decay (biases, LayerNorm / RMSNorm), as
# this project's models name them (``attn_norm``, ``final_norm``, ``lm_head_bias``, ...).
_NO_DECAY = re.compile(r"bias|norm")
# Embedding tables: ``embed`` (tokens) and ``pos_embed`` (GPT-2's positions).
_EMBEDDING = re.compile(r"embed")


def _path_flags(pattern: re.Pattern[str], params: Any, match: bool) -> Any:
  """A tree of bools like ``params``: whether each leaf's path matches ``pattern`` (or not)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: bool(pattern.search(jax.tree_util.keystr(path).lower())) == match, params
  )


def embedding_leaves(params: Any) -> Any:
  """True on embedding tables (paths containing ``embed``): their states stay float32."""
  return _path_flags(_EMBEDDING, params, True)


def decayed_leaves(params: Any) -> Any:
  """True on the weights that decay: every leaf but biases and norm weights."""
  return _path_flags(_NO_DECAY, params, False)


def steps_per_epoch(config: RunConfig, num_forget: int, num_retain: int) -> int:
  """Optimizer steps per epoch, as the authors' ``forget.py`` counts them.

  With ``B = data.batch_size * training.grad_accum`` rows per step: in the alternating mode
  ``(1 + F_r / F_f) * ceil(|forget| / B)`` when the forget set runs out first
  (``ceil(|forget| / F_f) <= ceil(|retain| / F_r)``), else ``(1 + F_f / F_r) *
  ceil(|retain| / B)``; in the joint mode ``ceil(|forget| / B)`` (their joint data set has
  one row per forget item). ``F_f, F_r`` are ``optimizer.forget_steps, retain_steps``; a
  schedule with one of them 0 counts the other stream's batches only.
  """
  rows = config.data.batch_size * config.training.grad_accum
  if config.training.mode == "joint":
    return math.ceil(num_forget / rows)
  f, r = config.optimizer.forget_steps, config.optimizer.retain_steps
  if f == 0 or r == 0:
    return math.ceil((num_forget if r == 0 else num_retain) / rows)
  if math.ceil(num_forget / f) <= math.ceil(num_retain / r):
    return int((1 + r / f) * math.ceil(num_forget / rows))
  return int((1 + f / r) * math.ceil(num_retain / rows))


def resolved_warmup_steps(config: OptimizerConfig, steps_per_epoch: int | None = None) -> int:
  """``config.warmup_steps``, or when null one epoch (none if an epoch is a single step,
  as the authors'; none if ``steps_per_epoch`` is unknown)."""
  if config.warmup_steps is not None:
    return config.warmup_steps
  return steps_per_epoch if steps_per_epoch is not None and steps_per_epoch > 1 else 0


def _factor(count: Any, warmup: int, total: int | None, xp: Any) -> Any:
  """The schedule's multiplier of the peak learning rate at ``count`` (0-based updates),
  Hugging Face's ``lr_lambda``: ``count / warmup`` while warming up, then ``(total - count)
  / (total - warmup)`` floored at 0 (``total`` None: 1)."""
  count = xp.asarray(count, xp.float32)
  rising = count / max(warmup, 1)
  after = 1.0 if total is None else xp.maximum(0.0, (total - count) / max(total - warmup, 1))
  return xp.where(count < warmup, rising, after)


def learning_rate_schedule(
  config: OptimizerConfig, *, total_steps: int | None = None, steps_per_epoch: int | None = None
) -> float | Callable[[Any], Any]:
  """The learning rate of every update: a number when it is constant, else an optax schedule
  of the update count (the optimizer's total step count, both objectives).

  Args:
    config: ``learning_rate``, ``warmup_steps`` (null: one epoch) and ``schedule``
      (``linear``: decay to 0 at ``total_steps``; ``constant``).
    total_steps: The run's steps (``training.steps``); None: no decay (for checks of the
      hyperparameters, such as ``OptimizerConfig.validate``).
    steps_per_epoch: From :func:`steps_per_epoch`; None: a null ``warmup_steps`` means none.
  """
  warmup = resolved_warmup_steps(config, steps_per_epoch)
  total = total_steps if config.schedule == "linear" else None
  peak = config.learning_rate
  if warmup == 0 and total is None:
    return peak
  return lambda count: peak * _factor(count, warmup, total, jnp)


def learning_rate_at(
  config: OptimizerConfig, step: int, *, total_steps: int | None, steps_per_epoch: int | None
) -> float:
  """The base learning rate of update ``step`` (0-based) under :func:`learning_rate_schedule`,
  computed on the host (numpy), e.g. for the metrics log."""
  warmup = resolved_warmup_steps(config, steps_per_epoch)
  total = total_steps if config.schedule == "linear" else None
  return float(config.learning_rate * _factor(step, warmup, total, np))


def make_optimizer(
  config: OptimizerConfig,
  *,
  total_steps: int | None = None,
  steps_per_epoch: int | None = None,
  objectives: tuple[tuple[int, ...], tuple[float, ...]] | None = None,
) -> optax.GradientTransformation:
  """The configured optimizer: clipping, then dualoptax's optimizer with the learning rate of
  :func:`learning_rate_schedule` (same arguments), weight decay on :func:`decayed_leaves`
  and, for 8-bit states with ``keep_fp32_embeddings``, float32 states on
  :func:`embedding_leaves`.

  ``objectives`` = ``(steps per objective, lr ratio per objective)`` builds the K-objective
  DualOptim / DualOptim+ (multi-task learning) instead of the forget / retain pair of
  ``config``; Adam then has a single objective (the caller sums the losses)."""
  learning_rate = learning_rate_schedule(
    config, total_steps=total_steps, steps_per_epoch=steps_per_epoch
  )
  common = dict(
    b1=config.b1,
    b2=config.b2,
    eps=config.eps,
    weight_decay=config.weight_decay,
    mask=decayed_leaves,
  )
  pair = dict(
    forget_lr_ratio=config.forget_lr_ratio,
    retain_lr_ratio=config.retain_lr_ratio,
    forget_steps=config.forget_steps,
    retain_steps=config.retain_steps,
  )
  if config.name == "adam":
    tx = dualoptax.adamw(learning_rate, **common, **({} if objectives else pair))
  else:
    storage = dualoptax.MomentStorage(
      state_bits=config.state_bits,
      keep_fp32=embedding_leaves if config.keep_fp32_embeddings else None,
    )
    plus = {}
    if config.name == "dualoptim_plus":
      plus = dict(base_b1=config.base_b1, base_b2=config.base_b2)
      if config.denominator_floor is not None:
        plus["denominator_floor"] = config.denominator_floor
    if objectives is None:
      alias = dualoptax.dualoptim if config.name == "dualoptim" else dualoptax.dualoptim_plus
      tx = alias(learning_rate, storage=storage, **plus, **common, **pair)
    else:
      alias = (
        dualoptax.multi_objective_dualoptim
        if config.name == "dualoptim"
        else dualoptax.multi_objective_dualoptim_plus
      )
      tx = alias(learning_rate, *objectives, storage=storage, **plus, **common)
  if config.clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), tx)
  return tx


def run_optimizer(
  config: RunConfig, *, total_steps: int | None = None, steps_per_epoch: int | None = None
) -> optax.GradientTransformation:
  """An unlearning run's optimizer: :func:`make_optimizer` of ``config.optimizer``, followed
  by the retain constraint's multiplier when ``config.constraint`` is enabled."""
  tx = make_optimizer(config.optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  if not config.constraint.enabled:
    return tx
  return with_constraint(tx, config.constraint, joint=config.training.mode == "joint")


def with_constraint(
  tx: optax.GradientTransformation, section: ConstraintSection, *, joint: bool
) -> optax.GradientTransformationExtraArgs:
  """``tx`` followed by the retain constraint's Lagrange multiplier
  (``dualoptax.scale_by_lagrange_multiplier``): it scales the retain steps' updates
  (alternating) or only tracks ``lambda``, which the joint step puts on the retain loss."""
  multiplier = dualoptax.scale_by_lagrange_multiplier(
    **section.transform_kwargs(), scale_updates=not joint
  )
  return optax.chain(tx, multiplier)


def restart_learning_rate_schedule(opt_state: Any) -> Any:
  """``opt_state`` with its learning-rate schedule back at step 0 (warmup, then decay,
  again) and everything else kept: the moments, DualOptim+'s base and deltas and their
  bias-correction counts. Continual unlearning carries a state into the next task this way;
  restarting the bias-correction counts instead would divide warm moments by
  ``1 - b^1``."""

  def restart(state: Any) -> Any:
    if isinstance(state, dualoptax.ScaleByObjectiveLearningRateState):
      return state._replace(count=jnp.zeros_like(state.count))
    return state

  is_schedule = lambda x: isinstance(x, dualoptax.ScaleByObjectiveLearningRateState)  # noqa: E731
  return jax.tree.map(restart, opt_state, is_leaf=is_schedule)


def optimizer_diagnostics_fn(
  config: OptimizerConfig, **jit_kwargs: Any
) -> Callable[[Any], dict[str, Any]] | None:
  """A jitted ``opt_state -> {name: scalar}`` of the optimizer's Figure-2 cosines (forget
  vs retain update terms) and, for DualOptim+, its conditioning (:func:`_conditioning`), or
  None for an optimizer without them.

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

  def diagnostics(opt_state):
    _, total = diagnose(opt_state)
    out = {
      "update_cosine": total.update_cosine,
      "preconditioned_cosine": total.preconditioned_cosine,
    }
    if config.name == "dualoptim_plus":
      out.update(_conditioning(opt_state))
    return out

  return jax.jit(diagnostics, **jit_kwargs)


def _conditioning(opt_state: Any) -> dict[str, Any]:
  """DualOptim+'s ill-conditioning, per objective (``dualoptim_plus_conditioning``): the
  fraction of elements whose ``|Eh + Vh|`` is below 1% of ``Vh`` (the delta cancels the
  base, so ``sqrt(|Eh + Vh|)`` divides by almost nothing), the fraction a
  ``denominator_floor`` acts on, and the largest entry of the next update in units of the
  objective's learning rate, with the run's floor and by the paper's formula."""
  _, total = dualoptax.dualoptim_plus_conditioning(opt_state)
  out = {}
  for objective, name in ((dualoptax.FORGET, "forget"), (dualoptax.RETAIN, "retain")):
    out[f"{name}_cancelled_fraction"] = total.cancelled_fraction[objective]
    out[f"{name}_floored_fraction"] = total.floored_fraction[objective]
    out[f"{name}_max_update"] = total.max_update[objective]
    out[f"{name}_max_unguarded_update"] = total.max_unguarded_update[objective]
  return out


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
