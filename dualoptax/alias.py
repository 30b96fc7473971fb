"""Ready-made optimizers: chains of the transforms in :mod:`dualoptax.transform`.

Every alias shares one interface: ``learning_rate`` (float or optax schedule), betas,
``eps``, ``weight_decay`` (decoupled, scaled by the same per-objective learning rate) and
the alternating schedule ``forget_steps`` / ``retain_steps`` with ``forget_lr_ratio`` /
``retain_lr_ratio``. The ``multi_objective_*`` forms take one entry per objective for K
objectives; the forget/retain forms are their K = 2 case with FORGET = 0, RETAIN = 1.

Each is an ``optax.chain``: direction, weight decay, per-objective learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optax

from dualoptax import _checks, _numerics, objectives, transform
from dualoptax._moments import Precision

ScalarOrSchedule = transform.ScalarOrSchedule
MaskOrFn = Any | Callable[[optax.Params], Any] | None


def _decoupled_weight_decay(weight_decay: float, mask: MaskOrFn) -> optax.GradientTransformation:
  _checks.check_non_negative("weight_decay", weight_decay)
  return optax.add_decayed_weights(weight_decay, mask)


def _check_forget_retain(forget_lr_ratio, retain_lr_ratio, forget_steps, retain_steps):
  """Checks the forget/retain arguments under the names the caller used."""
  _checks.check_non_negative("forget_lr_ratio", forget_lr_ratio)
  _checks.check_non_negative("retain_lr_ratio", retain_lr_ratio)
  objectives.check_step_count("forget_steps", forget_steps)
  objectives.check_step_count("retain_steps", retain_steps)
  if all(_numerics.is_concrete_number(v) for v in (forget_steps, retain_steps)) and (
    forget_steps == 0 and retain_steps == 0
  ):
    raise ValueError(
      "forget_steps and retain_steps must not both be 0, got forget_steps=0, retain_steps=0"
    )


def _checked_ratios(objective_steps, objective_lr_ratios):
  """Validates the K-objective schedule and ratios; returns the ratios (default all 1)."""
  objectives.validate_objective_steps(objective_steps, "objective_steps")
  if objective_lr_ratios is None:
    objective_lr_ratios = (1.0,) * len(objective_steps)
  _checks.check_same_length(
    "objective_lr_ratios",
    objective_lr_ratios,
    len(objective_steps),
    "the length of objective_steps",
  )
  for i, ratio in enumerate(objective_lr_ratios):
    _checks.check_non_negative(f"objective_lr_ratios[{i}]", ratio)
  return objective_lr_ratios


def _lr_chain(
  direction: optax.GradientTransformation,
  learning_rate: ScalarOrSchedule,
  weight_decay: float,
  weight_decay_mask: MaskOrFn,
  objective_lr_ratios: Sequence[float],
  objective_steps: Sequence[int],
) -> optax.GradientTransformationExtraArgs:
  return optax.chain(
    direction,
    _decoupled_weight_decay(weight_decay, weight_decay_mask),
    transform.scale_by_objective_learning_rate(learning_rate, objective_lr_ratios, objective_steps),
  )


def multi_objective_dualoptim_plus(
  learning_rate: ScalarOrSchedule,
  objective_steps: Sequence[int],
  objective_lr_ratios: Sequence[float] | None = None,
  b1: float = 0.9,
  b2: float = 0.95,
  base_b1: float = 0.9,
  base_b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  weight_decay_mask: MaskOrFn = None,
  state_dtype: Any = None,
  state_bits: int = 32,
  min_8bit_size: int = 4096,
  block_size: int = 256,
  keep_fp32: MaskOrFn = None,
  quantize_base: bool = True,
  quantize_deltas: bool = True,
  update_in_chunks: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim+ for K objectives: one shared base state plus one delta per objective.

  Args:
    learning_rate: a float or an optax schedule of the total step count.
    objective_steps: steps per objective in one cycle of the alternating schedule.
    objective_lr_ratios: learning-rate multiplier per objective (default all 1).
    b1: decay of the delta first moments.
    b2: decay of the delta second moments.
    base_b1: decay of the base first moment.
    base_b2: decay of the base second moment.
    eps: added to the square root, after bias correction.
    weight_decay: decoupled weight decay, scaled by the per-objective learning rate.
    weight_decay_mask: optional mask (or function of params) choosing decayed leaves.
    state_dtype: dtype of the unquantized moments (None: float32).
    state_bits: 32 for float32 moments, 8 for block-wise quantized moments.
    min_8bit_size: with 8-bit states, leaves smaller than this keep float32 moments.
    block_size: with 8-bit states, values per quantization block.
    keep_fp32: with 8-bit states, a tree of bools like the params (or a function of the
      params returning one) marking leaves that keep float32 moments, e.g. embeddings.
    quantize_base: with 8-bit states, whether the base moments are quantized.
    quantize_deltas: with 8-bit states, whether the delta moments are quantized.
    update_in_chunks: with 8-bit states, rewrite each leaf by a loop over cache-sized
      chunks (True; fastest on one CPU device) or with whole-array operations (False;
      partitions cleanly when states are sharded over devices). None picks chunks on a
      single-device CPU backend. Both give the same bits on the same devices; see
      :class:`Precision`.

  Returns:
    An optax transformation; ``update`` accepts ``objective=`` (int or int32 array).
  """
  objective_lr_ratios = _checked_ratios(objective_steps, objective_lr_ratios)
  return _lr_chain(
    transform.scale_by_dualoptim_plus(
      b1,
      b2,
      base_b1,
      base_b2,
      eps,
      objective_steps,
      Precision(
        state_bits,
        min_8bit_size,
        block_size,
        keep_fp32,
        state_dtype,
        update_in_chunks=update_in_chunks,
      ),
      quantize_base=quantize_base,
      quantize_deltas=quantize_deltas,
    ),
    learning_rate,
    weight_decay,
    weight_decay_mask,
    objective_lr_ratios,
    objective_steps,
  )


def dualoptim_plus(
  learning_rate: ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.95,
  base_b1: float = 0.9,
  base_b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  forget_lr_ratio: float = 1.0,
  retain_lr_ratio: float = 1.0,
  forget_steps: int = 1,
  retain_steps: int = 1,
  weight_decay_mask: MaskOrFn = None,
  state_dtype: Any = None,
  state_bits: int = 32,
  min_8bit_size: int = 4096,
  block_size: int = 256,
  keep_fp32: MaskOrFn = None,
  quantize_base: bool = True,
  quantize_deltas: bool = True,
  update_in_chunks: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim+ (arXiv 2605.21539) for unlearning: forget and retain objectives.

  A shared BASE Adam state takes in every gradient; each objective's DELTA state keeps
  only what the base does not explain. When the forget and retain gradients agree the
  objectives share momentum through the base; when they conflict the deltas keep them
  apart. Defaults follow the paper's scripts (betas 0.9/0.95 for deltas and base).

  Steps alternate ``forget_steps`` forget steps then ``retain_steps`` retain steps; pass
  ``objective=dualoptax.FORGET`` or ``RETAIN`` to ``update`` to choose explicitly.

  Args:
    learning_rate: a float or an optax schedule of the total step count.
    b1: decay of the delta first moments.
    b2: decay of the delta second moments.
    base_b1: decay of the base first moment.
    base_b2: decay of the base second moment.
    eps: added to the square root, after bias correction.
    weight_decay: decoupled weight decay, scaled by the per-objective learning rate.
    forget_lr_ratio: forget learning rate = ``learning_rate * forget_lr_ratio``.
    retain_lr_ratio: retain learning rate = ``learning_rate * retain_lr_ratio``.
    forget_steps: forget steps per cycle of the schedule (the paper's TOFU runs: 1).
    retain_steps: retain steps per cycle of the schedule (the paper's TOFU runs: 5).
    weight_decay_mask: optional mask (or function of params) choosing decayed leaves.
    state_dtype: dtype of the unquantized moments (None: float32).
    state_bits: 32 for float32 moments, 8 for block-wise quantized moments.
    min_8bit_size: with 8-bit states, leaves smaller than this keep float32 moments.
    block_size: with 8-bit states, values per quantization block.
    keep_fp32: with 8-bit states, a tree of bools like the params (or a function of the
      params returning one) marking leaves that keep float32 moments, e.g. embeddings.
    quantize_base: with 8-bit states, whether the base moments are quantized.
    quantize_deltas: with 8-bit states, whether the delta moments are quantized.
    update_in_chunks: with 8-bit states, rewrite each leaf by a loop over cache-sized
      chunks (True; fastest on one CPU device) or with whole-array operations (False;
      partitions cleanly when states are sharded over devices). None picks chunks on a
      single-device CPU backend. Both give the same bits on the same devices; see
      :class:`Precision`.

  Returns:
    An optax transformation; ``update`` accepts ``objective=``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import dualoptax
    >>> params = {'w': jnp.ones((2, 3))}
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  dualoptax.dualoptim_plus(1e-3, forget_steps=1, retain_steps=5))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)  # step 0 serves FORGET
    >>> params = optax.apply_updates(params, updates)
  """
  _check_forget_retain(forget_lr_ratio, retain_lr_ratio, forget_steps, retain_steps)
  return multi_objective_dualoptim_plus(
    learning_rate,
    (forget_steps, retain_steps),
    (forget_lr_ratio, retain_lr_ratio),
    b1=b1,
    b2=b2,
    base_b1=base_b1,
    base_b2=base_b2,
    eps=eps,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    state_dtype=state_dtype,
    state_bits=state_bits,
    min_8bit_size=min_8bit_size,
    block_size=block_size,
    keep_fp32=keep_fp32,
    quantize_base=quantize_base,
    quantize_deltas=quantize_deltas,
    update_in_chunks=update_in_chunks,
  )


def multi_objective_dualoptim(
  learning_rate: ScalarOrSchedule,
  objective_steps: Sequence[int],
  objective_lr_ratios: Sequence[float] | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  weight_decay_mask: MaskOrFn = None,
  state_dtype: Any = None,
  state_bits: int = 32,
  min_8bit_size: int = 4096,
  block_size: int = 256,
  keep_fp32: MaskOrFn = None,
  update_in_chunks: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim for K objectives: separate Adam moments and counters per objective.

  Args: as :func:`multi_objective_dualoptim_plus`, without the base decays.

  Returns:
    An optax transformation; ``update`` accepts ``objective=``.
  """
  objective_lr_ratios = _checked_ratios(objective_steps, objective_lr_ratios)
  return _lr_chain(
    transform.scale_by_dualoptim(
      b1,
      b2,
      eps,
      objective_steps,
      Precision(
        state_bits,
        min_8bit_size,
        block_size,
        keep_fp32,
        state_dtype,
        update_in_chunks=update_in_chunks,
      ),
    ),
    learning_rate,
    weight_decay,
    weight_decay_mask,
    objective_lr_ratios,
    objective_steps,
  )


def dualoptim(
  learning_rate: ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  forget_lr_ratio: float = 1.0,
  retain_lr_ratio: float = 1.0,
  forget_steps: int = 1,
  retain_steps: int = 1,
  weight_decay_mask: MaskOrFn = None,
  state_dtype: Any = None,
  state_bits: int = 32,
  min_8bit_size: int = 4096,
  block_size: int = 256,
  keep_fp32: MaskOrFn = None,
  update_in_chunks: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim (NeurIPS 2025): an independent AdamW state per objective.

  Args: as :func:`dualoptim_plus`, without the base decays.

  Returns:
    An optax transformation; ``update`` accepts ``objective=``.
  """
  _check_forget_retain(forget_lr_ratio, retain_lr_ratio, forget_steps, retain_steps)
  return multi_objective_dualoptim(
    learning_rate,
    (forget_steps, retain_steps),
    (forget_lr_ratio, retain_lr_ratio),
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    state_dtype=state_dtype,
    state_bits=state_bits,
    min_8bit_size=min_8bit_size,
    block_size=block_size,
    keep_fp32=keep_fp32,
    update_in_chunks=update_in_chunks,
  )


def adamw(
  learning_rate: ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 1e-4,
  forget_lr_ratio: float = 1.0,
  retain_lr_ratio: float = 1.0,
  forget_steps: int = 1,
  retain_steps: int = 1,
  weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW baseline with the dualoptax interface: ONE Adam state for all objectives.

  The direction is ``optax.scale_by_adam``; only the learning rate depends on the
  objective (through the ratios). With ratios of 1 it equals ``optax.adamw``. For the
  paper's joint baseline, give it the gradient of the weighted sum of both losses.

  Args: as :func:`dualoptim` (``weight_decay`` defaults to optax.adamw's 1e-4).

  Returns:
    An optax transformation; ``update`` accepts ``objective=``.
  """
  _checks.check_decay("b1", b1)
  _checks.check_decay("b2", b2)
  _checks.check_non_negative("eps", eps)
  _check_forget_retain(forget_lr_ratio, retain_lr_ratio, forget_steps, retain_steps)
  return _lr_chain(
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    learning_rate,
    weight_decay,
    weight_decay_mask,
    (forget_lr_ratio, retain_lr_ratio),
    (forget_steps, retain_steps),
  )


def adam(
  learning_rate: ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  forget_lr_ratio: float = 1.0,
  retain_lr_ratio: float = 1.0,
  forget_steps: int = 1,
  retain_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """Adam baseline (no weight decay) with the dualoptax interface; see :func:`adamw`."""
  return adamw(
    learning_rate,
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=0.0,
    forget_lr_ratio=forget_lr_ratio,
    retain_lr_ratio=retain_lr_ratio,
    forget_steps=forget_steps,
    retain_steps=retain_steps,
  )
