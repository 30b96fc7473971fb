"""Ready-made optimizers: chains of the transforms in :mod:`dualoptax.transform`.

Every alias is an ``optax.chain`` of a direction, decoupled weight decay and the
per-objective learning rate. ``learning_rate`` (and the multi-objective forms' schedule
``objective_steps, objective_lr_ratios``) are positional; everything else is a keyword.
Moments are stored as a :class:`MomentStorage` says (``state_bits=8`` is short for
``storage=MomentStorage(state_bits=8)``). The ``multi_objective_*`` forms take one entry
per objective for K objectives; the forget/retain forms are their K = 2 case with
FORGET = 0, RETAIN = 1. Each alias records its decays and eps (and DualOptim+'s
``denominator_floor`` when set) in its state (at zero bytes) for
:func:`dualoptax.hyperparameters` and the diagnostics.

Keywords are named as in optax where they mean the same: ``b1, b2, eps, weight_decay,
mask`` everywhere, and ``eps_root, mu_dtype, nesterov`` for :func:`adamw` and
:func:`adam`, whose direction is ``optax.scale_by_adam``. The DualOptim aliases have no
``eps_root`` or ``nesterov``, and no ``mu_dtype``: optax's sets the first moment's dtype
alone, while ``storage=MomentStorage(dtype=...)`` sets every moment's. ``None`` is not a
value for a learning rate, eps, ratio or weight decay (``ValueError`` at construction).

A state holds several ``count`` fields (the direction's and the learning-rate scaler's;
``optax.adamw`` with a schedule also has two), so ``optax.tree.get(state, "count")``
raises ``KeyError``; name the state instead:
``optax.tree.get(state, "ScaleByDualOptimPlusState").count`` or
``dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState).count``. (Renaming a
field would change the layout of saved checkpoints.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optax

from dualoptax import _checks, _numerics, _record, objectives, transform
from dualoptax._moments import MomentStorage

ScalarOrSchedule = transform.ScalarOrSchedule
MaskOrFn = Any | Callable[[optax.Params], Any] | None

# Argument descriptions shared by the aliases' docstrings (see `_shared_args`).
_ARGS = {
  "plus_decays": """\
    b1: decay of the delta first moments ``D``.
    b2: decay of the delta second moments ``E``.
    base_b1: decay of the base first moment ``B``.
    base_b2: decay of the base second moment ``V``.
    eps: added to the square root, after bias correction.""",
  "plus_floor": """\
    denominator_floor: None (the paper's denominator, the default) or ``f`` in (0, 1]:
      the denominator becomes ``sqrt(max(|Eh_o + Vh|, f Vh)) + eps``, so an element whose
      delta cancels its base second moment cannot blow up (an update entry is at most
      ``|Dh_o + Bh| / sqrt(f Vh)``); relative to ``Vh``, so it does not depend on the
      gradients' scale. See :func:`dualoptax.scale_by_dualoptim_plus` and
      :func:`dualoptax.dualoptim_plus_conditioning`.""",
  "adam_decays": """\
    b1: decay of the first moments.
    b2: decay of the second moments.
    eps: added to the square root, after bias correction.""",
  "adam_options": """\
    eps_root: added to the second moment inside the square root (as ``optax.adam``).
    mu_dtype: dtype of the first moment (None: that of the params), as in optax.""",
  "weight_decay": """\
    weight_decay: decoupled weight decay, scaled by the per-objective learning rate.
    mask: optional tree of bools like the params (or a prefix of it, or a function of
      the params returning one), True where weight decay applies; as in ``optax.adamw``.""",
  "forget_retain": """\
    forget_lr_ratio: forget learning rate = ``learning_rate * forget_lr_ratio``.
    retain_lr_ratio: retain learning rate = ``learning_rate * retain_lr_ratio``.
    forget_steps: forget steps per cycle of the schedule (the paper's TOFU runs: 1).
    retain_steps: retain steps per cycle of the schedule (the paper's TOFU runs: 5).""",
  "objectives": """\
    objective_steps: steps per objective in one cycle of the alternating schedule; its
      length is the number of objectives K.
    objective_lr_ratios: learning-rate multiplier per objective (default all 1).""",
  "storage": """\
    storage: how the moments are stored (None: float32): their dtype, or block-wise
      8-bit codes for large leaves; see :class:`MomentStorage`.
    state_bits: shorthand for ``storage.state_bits``: 8 for 8-bit moments with the
      other storage options at their defaults (if ``storage`` is given too, the two
      must agree).""",
}


def _shared_args(fn: Callable) -> Callable:
  """Fills the ``{name}`` placeholders of ``fn``'s docstring from ``_ARGS``."""
  for name, text in _ARGS.items():
    if fn.__doc__:  # None under python -OO
      fn.__doc__ = fn.__doc__.replace("    {" + name + "}", text)
  return fn


def _storage(storage: MomentStorage | None, state_bits: Any) -> MomentStorage:
  """``storage`` (default float32) with the ``state_bits`` shorthand applied."""
  if storage is None:
    return MomentStorage() if state_bits is None else MomentStorage(state_bits=state_bits)
  if state_bits is not None and _numerics.is_concrete_number(state_bits):
    if float(state_bits) != storage.state_bits:
      raise ValueError(
        f"state_bits={state_bits!r} disagrees with storage.state_bits={storage.state_bits!r}; "
        "give one of them"
      )
  return storage


def _decoupled_weight_decay(
  weight_decay: Any, mask: MaskOrFn, hyperparams: _record.HyperparameterRecord
) -> optax.GradientTransformation:
  """``optax.add_decayed_weights`` carrying the alias's hyperparameter record."""
  _checks.check_non_negative("weight_decay", weight_decay)
  decay = optax.add_decayed_weights(weight_decay)
  if callable(weight_decay):  # A schedule keeps a step count: the record goes beside it.
    decay = optax.chain(decay, _record.attach(optax.identity(), hyperparams))
  else:  # Its state is empty: the record takes its place (see `_record`).
    decay = _record.attach(decay, hyperparams)
  return decay if mask is None else optax.masked(decay, mask)


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
  hyperparams: _record.HyperparameterRecord,
  learning_rate: ScalarOrSchedule,
  weight_decay: Any,
  mask: MaskOrFn,
  objective_lr_ratios: Sequence[float],
  objective_steps: Sequence[int],
) -> optax.GradientTransformationExtraArgs:
  return optax.chain(
    direction,
    _decoupled_weight_decay(weight_decay, mask, hyperparams),
    transform.scale_by_objective_learning_rate(learning_rate, objective_lr_ratios, objective_steps),
  )


@_shared_args
def multi_objective_dualoptim_plus(
  learning_rate: ScalarOrSchedule,
  objective_steps: Sequence[int],
  objective_lr_ratios: Sequence[float] | None = None,
  *,
  b1: float = 0.9,
  b2: float = 0.95,
  base_b1: float = 0.9,
  base_b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: MaskOrFn = None,
  storage: MomentStorage | None = None,
  state_bits: int | None = None,
  denominator_floor: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim+ for K objectives: one shared base state plus one delta per objective.

  The step of :func:`dualoptim_plus` (see :func:`dualoptax.scale_by_dualoptim_plus` for
  the maths), with any number of objectives ``0 .. K-1``.

  Args:
    learning_rate: a float or an optax schedule of the total step count.
    {objectives}
    {plus_decays}
    {weight_decay}
    {storage}
    {plus_floor}

  Returns:
    An optax transformation; ``update`` accepts ``objective=`` (int or int32 array).

  Example:
    >>> import jax.numpy as jnp, dualoptax
    >>> tx = dualoptax.multi_objective_dualoptim_plus(1e-3, (1, 2, 2))  # K = 3
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones(3)}, state, params, objective=2)
  """
  objective_lr_ratios = _checked_ratios(objective_steps, objective_lr_ratios)
  direction = transform.scale_by_dualoptim_plus(
    b1,
    b2,
    base_b1,
    base_b2,
    eps,
    objective_steps=objective_steps,
    storage=_storage(storage, state_bits),
    denominator_floor=denominator_floor,
  )
  # Recorded only when set: an unguarded state keeps the record (and tree) it always had.
  floor = {} if denominator_floor is None else {"denominator_floor": denominator_floor}
  hyperparams = _record.make(
    transform.ScaleByDualOptimPlusState,
    b1=b1,
    b2=b2,
    base_b1=base_b1,
    base_b2=base_b2,
    eps=eps,
    **floor,
  )
  return _lr_chain(
    direction, hyperparams, learning_rate, weight_decay, mask, objective_lr_ratios, objective_steps
  )


@_shared_args
def dualoptim_plus(
  learning_rate: ScalarOrSchedule,
  *,
  b1: float = 0.9,
  b2: float = 0.95,
  base_b1: float = 0.9,
  base_b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: MaskOrFn = None,
  forget_lr_ratio: float = 1.0,
  retain_lr_ratio: float = 1.0,
  forget_steps: int = 1,
  retain_steps: int = 1,
  storage: MomentStorage | None = None,
  state_bits: int | None = None,
  denominator_floor: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DualOptim+ (arXiv 2605.21539) for unlearning: forget and retain objectives.

  A shared BASE Adam state ``B, V`` takes in every gradient; each objective's DELTA
  state ``D_o, E_o`` keeps only what the base does not explain. When the forget and
  retain gradients agree the objectives share momentum through the base; when they
  conflict the deltas keep them apart. A step on objective ``o`` with gradient ``g``
  (``t`` counts all steps, ``t_o`` those of ``o``; hats are bias-corrected, the base as of
  the previous step)::

      D_o = b1 D_o + (1 - b1) (g - Bh);   E_o = b2 E_o + (1 - b2) (g^2 - Vh)
      u   = (Dh_o + Bh) / (sqrt(|Eh_o + Vh|) + eps)
      p   = p - lr_o (u + weight_decay p),   lr_o = learning_rate * {forget,retain}_lr_ratio
      B   = base_b1 B + (1 - base_b1) g;     V = base_b2 V + (1 - base_b2) g^2

  Steps alternate ``forget_steps`` forget steps then ``retain_steps`` retain steps; pass
  ``objective=dualoptax.FORGET`` or ``RETAIN`` to ``update`` to choose explicitly.
  Defaults follow the paper's scripts (betas 0.9/0.95 for deltas and base).

  Args:
    learning_rate: a float or an optax schedule of the total step count.
    {plus_decays}
    {weight_decay}
    {forget_retain}
    {storage}
    {plus_floor}

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
    objective_lr_ratios=(forget_lr_ratio, retain_lr_ratio),
    b1=b1,
    b2=b2,
    base_b1=base_b1,
    base_b2=base_b2,
    eps=eps,
    weight_decay=weight_decay,
    mask=mask,
    storage=storage,
    state_bits=state_bits,
    denominator_floor=denominator_floor,
  )


@_shared_args
def multi_objective_dualoptim(
  learning_rate: ScalarOrSchedule,
  objective_steps: Sequence[int],
  objective_lr_ratios: Sequence[float] | None = None,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: MaskOrFn = None,
  storage: MomentStorage | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim for K objectives: separate Adam moments and counters per objective.

  The step of :func:`dualoptim` with any number of objectives ``0 .. K-1``.

  Args:
    learning_rate: a float or an optax schedule of the total step count.
    {objectives}
    {adam_decays}
    {weight_decay}
    {storage}

  Returns:
    An optax transformation; ``update`` accepts ``objective=``.
  """
  objective_lr_ratios = _checked_ratios(objective_steps, objective_lr_ratios)
  direction = transform.scale_by_dualoptim(
    b1, b2, eps, objective_steps=objective_steps, storage=_storage(storage, state_bits)
  )
  hyperparams = _record.make(transform.ScaleByDualOptimState, b1=b1, b2=b2, eps=eps)
  return _lr_chain(
    direction, hyperparams, learning_rate, weight_decay, mask, objective_lr_ratios, objective_steps
  )


@_shared_args
def dualoptim(
  learning_rate: ScalarOrSchedule,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: MaskOrFn = None,
  forget_lr_ratio: float = 1.0,
  retain_lr_ratio: float = 1.0,
  forget_steps: int = 1,
  retain_steps: int = 1,
  storage: MomentStorage | None = None,
  state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """DualOptim (NeurIPS 2025): an independent AdamW state per objective.

  Each objective ``o`` keeps its own moments ``m_o, v_o`` and step count ``t_o``; a step
  on ``o`` updates only those::

      m_o = b1 m_o + (1 - b1) g;   v_o = b2 v_o + (1 - b2) g^2
      u   = (m_o / (1 - b1^t_o)) / (sqrt(v_o / (1 - b2^t_o)) + eps)
      p   = p - lr_o (u + weight_decay p)

  Args:
    learning_rate: a float or an optax schedule of the total step count.
    {adam_decays}
    {weight_decay}
    {forget_retain}
    {storage}

  Returns:
    An optax transformation; ``update`` accepts ``objective=``.

  Example:
    >>> import jax.numpy as jnp, dualoptax
    >>> tx = dualoptax.dualoptim(1e-3, retain_steps=5, state_bits=8)
    >>> params = {'w': jnp.ones((64, 64))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((64, 64))}, state, params)
  """
  _check_forget_retain(forget_lr_ratio, retain_lr_ratio, forget_steps, retain_steps)
  return multi_objective_dualoptim(
    learning_rate,
    (forget_steps, retain_steps),
    objective_lr_ratios=(forget_lr_ratio, retain_lr_ratio),
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=weight_decay,
    mask=mask,
    storage=storage,
    state_bits=state_bits,
  )


@_shared_args
def adamw(
  learning_rate: ScalarOrSchedule,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any | None = None,
  weight_decay: float = 1e-4,
  mask: MaskOrFn = None,
  nesterov: bool = False,
  forget_lr_ratio: float = 1.0,
  retain_lr_ratio: float = 1.0,
  forget_steps: int = 1,
  retain_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """AdamW baseline with the dualoptax interface: ONE Adam state for all objectives.

  The direction is ``optax.scale_by_adam``; only the learning rate depends on the
  objective (through the ratios). With ratios of 1 it equals ``optax.adamw`` with the
  same keywords, bit for bit. For the paper's joint baseline, give it the gradient of
  the weighted sum of both losses.

  Args:
    learning_rate: a float or an optax schedule of the total step count.
    {adam_decays}
    {adam_options}
    {weight_decay}
    nesterov: whether to use Nesterov momentum (as ``optax.adamw``).
    {forget_retain}

  Returns:
    An optax transformation; ``update`` accepts ``objective=``.
  """
  _checks.check_decay("b1", b1)
  _checks.check_decay("b2", b2)
  _checks.check_non_negative("eps", eps)
  _checks.check_non_negative("eps_root", eps_root)
  if not isinstance(nesterov, bool):
    raise ValueError(f"nesterov must be True or False, got nesterov={nesterov!r}")
  _check_forget_retain(forget_lr_ratio, retain_lr_ratio, forget_steps, retain_steps)
  direction = optax.scale_by_adam(
    b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov
  )
  return _lr_chain(
    direction,
    _record.make(optax.ScaleByAdamState, b1=b1, b2=b2, eps=eps, eps_root=eps_root),
    learning_rate,
    weight_decay,
    mask,
    (forget_lr_ratio, retain_lr_ratio),
    (forget_steps, retain_steps),
  )


def adam(
  learning_rate: ScalarOrSchedule,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any | None = None,
  nesterov: bool = False,
  forget_lr_ratio: float = 1.0,
  retain_lr_ratio: float = 1.0,
  forget_steps: int = 1,
  retain_steps: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """Adam baseline (no weight decay) with the dualoptax interface; see :func:`adamw`.

  Equals ``optax.adam`` with the same keywords when the ratios are 1.
  """
  return adamw(
    learning_rate,
    b1=b1,
    b2=b2,
    eps=eps,
    eps_root=eps_root,
    mu_dtype=mu_dtype,
    nesterov=nesterov,
    weight_decay=0.0,
    forget_lr_ratio=forget_lr_ratio,
    retain_lr_ratio=retain_lr_ratio,
    forget_steps=forget_steps,
    retain_steps=retain_steps,
  )
