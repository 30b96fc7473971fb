"""The training step: pure functions of (params, optimizer state, batch, objective).

Two modes, as in the paper:

* alternating: each step serves ONE objective (chosen by the sampler's schedule); its
  gradient goes to the optimizer with ``objective=`` so DualOptim(+) updates that
  objective's state. The objective is a traced int, and the two losses are branches of a
  ``lax.cond``, so one compiled step serves both objectives.
* joint: one weighted loss ``forget_coeff * L_f + retain_coeff * L_r`` per step (the
  paper's Adam baseline).

Gradient accumulation: every batch array has a leading micro-batch axis of size
``grad_accum``; the step scans over it and averages the gradients.

The conflict diagnostics step computes BOTH objectives' gradients at the same parameters
and reports their cosine similarity, over all parameters and per leaf.

What trains and what stays fixed: the step differentiates, updates and returns ``params``
only; ``ref_params`` is read, never written (and never donated). ``TrainStep.join`` forms
the trained model's weights from both: by default the trained weights are ``params`` and
``ref_params`` is a separate reference model; with LoRA, ``params`` are the adapters and
``ref_params`` the frozen base, which is also the reference model (one copy of the
weights). Dropout (LoRA's) draws its masks from the step number, so a resumed run repeats
them.

Non-finite steps: a step whose loss, gradients or update is not finite (NaN/inf) leaves
the parameters and optimizer state unchanged and reports ``skipped = 1`` in its metrics;
the loop counts them and stops after ``training.max_nonfinite_steps`` in a row.

The step functions are pure; :func:`compile_steps` wraps them in ``jax.jit`` with the
run's shardings, donation and compiler options.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualoptax
from train import losses
from train.config import OptimizerConfig
from train.program.optimizer import adam_preconditioner, optimizer_diagnostics_fn
from train.runtime.compiler import step_compiler_options

LogitsFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# ``(weights, input_ids, attention_mask, key) -> logits`` in training mode (dropout from key).
TrainLogitsFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def trained_weights(params: Any, ref_params: Any) -> Any:
  """The default ``TrainStep.join``: the trained weights are ``params`` themselves."""
  del ref_params
  return params


class StepInputs(NamedTuple):
  """One objective's batch: questions with true answers, and the same rows with IDK answers
  and, for LLMU, mismatch rows (forget questions with these rows' answers).

  Arrays have a leading micro-batch axis ``[grad_accum, B, T]``. ``mismatch`` is None when
  the losses do not use it (the step then compiles without it).
  """

  answers: losses.LMBatch
  idk: losses.LMBatch
  mismatch: losses.LMBatch | None = None


def _objective_loss(
  config: losses.LossConfig,
  logits_fn: LogitsFn,
  params: Any,
  ref_params: Any,
  inputs: StepInputs,
  objective: jax.Array,
):
  """``(loss, (nll, tokens))`` of the objective ``objective`` on ``inputs``."""

  def forget():
    loss, m = losses.forget_loss(config, logits_fn, params, ref_params, inputs.answers, inputs.idk)
    nll = m.get("forget/nll", jnp.float32(jnp.nan))
    return loss, (nll, m["forget/tokens"].astype(jnp.float32))

  def retain():
    if config.retain is None:  # forget-only spec: retain steps do nothing
      return jnp.float32(0.0), (jnp.float32(jnp.nan), jnp.float32(0.0))
    loss, m = losses.retain_loss(
      config, logits_fn, params, ref_params, inputs.answers, inputs.idk, inputs.mismatch
    )
    return loss, (m["retain/nll"], m["retain/tokens"].astype(jnp.float32))

  return jax.lax.cond(objective == dualoptax.FORGET, forget, retain)


def _accumulate(grad_fn, micro_batches: Any, params: Any):
  """Mean of ``grad_fn(params, micro_batch, index)`` over the leading axis of
  ``micro_batches`` (``index`` numbers the micro-batch)."""
  num = jax.tree.leaves(micro_batches)[0].shape[0]

  def body(carry, indexed):
    index, micro = indexed
    (loss, aux), grads = grad_fn(params, micro, index)
    acc_grads, acc_loss = carry
    return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss), aux

  # The auxiliary values leave the scan stacked and are summed in micro-batch order below
  # (as a carry would add them): a carry would need their structure before the scan,
  # i.e. a second trace of the whole forward and backward pass.
  zeros = jax.tree.map(jnp.zeros_like, params)
  indexed = (jnp.arange(num, dtype=jnp.int32), micro_batches)
  (grads, loss), stacked = jax.lax.scan(body, (zeros, jnp.float32(0.0)), indexed)
  aux = jax.tree.map(lambda a: functools.reduce(jnp.add, list(a)), stacked)
  scale = 1.0 / num
  return (
    jax.tree.map(lambda g: g * scale, grads),
    loss * scale,
    jax.tree.map(lambda a: a * scale, aux),
  )


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The step functions of one run (pure; jit them with :func:`compile_steps`).

  Attributes:
    logits_fn: Evaluation-mode logits of some weights (the diagnostics', and the training
      steps' when there is no ``train_logits_fn`` or no step number).
    tx: The optimizer of ``params``.
    loss_config: The forget and retain losses.
    join: ``(params, ref_params) -> weights`` of the trained model (see the module doc).
    train_logits_fn: Training-mode logits with a dropout key, or None (no dropout).
    dropout_seed: With the step number, seeds the dropout keys.
    constrained: ``tx`` ends in ``dualoptax.scale_by_lagrange_multiplier`` (primal-dual
      unlearning): steps pass it their losses, the joint step weights the retain loss by
      its multiplier, and the metrics gain the constraint's (:func:`_constraint_metrics`).
  """

  logits_fn: LogitsFn
  tx: optax.GradientTransformation
  loss_config: losses.LossConfig
  join: Callable[[Any, Any], Any] = trained_weights
  train_logits_fn: TrainLogitsFn | None = None
  dropout_seed: int = 0
  constrained: bool = False

  def _update(self, grads, opt_state, params, objective, objective_losses):
    """``tx.update`` on ``objective``, with each objective's loss (NaN: not evaluated) when
    the optimizer keeps a constraint's multiplier."""
    extra = {"objective_losses": objective_losses} if self.constrained else {}
    return self.tx.update(grads, opt_state, params, objective=objective, **extra)

  def _finish(self, params, opt_state, grads, updates, new_state, metrics):
    """:func:`_apply_if_finite`, then the constraint's metrics from the kept state."""
    params, opt_state, metrics = _apply_if_finite(
      params, opt_state, grads, updates, new_state, metrics
    )
    if self.constrained:
      metrics.update(_constraint_metrics(opt_state))
    return params, opt_state, metrics

  def _loss_grad(self, ref_params, objective, step):
    """``value_and_grad`` of ``(params, micro_batch, index) -> (loss, (nll, tokens))`` on
    ``objective`` (a traced int; ``jnp.int32`` constant for the joint step's halves)."""

    def loss(params, micro, index):
      logits_fn = self._logits_fn(step, index)
      weights = self.join(params, ref_params)
      return _objective_loss(self.loss_config, logits_fn, weights, ref_params, micro, objective)

    return jax.value_and_grad(loss, has_aux=True)

  def _logits_fn(self, step, index) -> LogitsFn:
    """The logits the loss of micro-batch ``index`` of step ``step`` uses: training mode
    with a key for each call (distinct dropout masks per forward pass), or ``logits_fn``."""
    if step is None or self.train_logits_fn is None:
      return self.logits_fn
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.dropout_seed), step), index)
    calls = itertools.count()  # counted while tracing: the same keys in every trace

    def logits(weights, input_ids, attention_mask):
      call_key = jax.random.fold_in(key, next(calls))
      return self.train_logits_fn(weights, input_ids, attention_mask, call_key)

    return logits

  def alternating(self, params, opt_state, ref_params, inputs: StepInputs, objective, step=None):
    """One step on ``objective`` (0 forget, 1 retain): ``(params, opt_state, metrics)``.

    ``step`` (the step number) turns dropout on; None leaves it off."""
    grad_fn = self._loss_grad(ref_params, objective, step)
    grads, loss, (nll, tokens) = _accumulate(grad_fn, inputs, params)
    observed = jnp.full([2], jnp.nan, jnp.float32).at[objective].set(loss)
    updates, new_state = self._update(grads, opt_state, params, objective, observed)
    metrics = dict(loss=loss, nll=nll, tokens=tokens)
    return self._finish(params, opt_state, grads, updates, new_state, metrics)

  def joint(self, params, opt_state, ref_params, forget: StepInputs, retain: StepInputs, step=None):
    """One step on ``forget_coeff * L_f + retain_coeff * L_r`` (constrained: the retain
    term times the multiplier ``lambda``, the Lagrangian's primal step)."""
    weight = dualoptax.lagrange_multiplier(opt_state) if self.constrained else 1.0

    def loss_fn(p, micro, index):
      f_micro, r_micro = micro
      weights = self.join(p, ref_params)
      f_loss, (f_nll, f_tokens) = _objective_loss(
        self.loss_config, self._logits_fn(step, index), weights, ref_params, f_micro, jnp.int32(0)
      )
      # The retain half's dropout keys differ from the forget half's (index offset).
      r_logits = self._logits_fn(step, index + _JOINT_OFFSET)
      r_loss, (r_nll, r_tokens) = _objective_loss(
        self.loss_config, r_logits, weights, ref_params, r_micro, jnp.int32(1)
      )
      return f_loss + weight * r_loss, (f_nll, r_nll, f_tokens + r_tokens, f_loss, r_loss)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accumulated = _accumulate(grad_fn, (forget, retain), params)
    grads, loss, (f_nll, r_nll, tokens, f_loss, r_loss) = accumulated
    # Joint steps serve both objectives; RETAIN's learning-rate ratio (1 by convention).
    observed = jnp.stack([f_loss, r_loss])
    updates, new_state = self._update(grads, opt_state, params, dualoptax.RETAIN, observed)
    metrics = dict(
      loss=loss,
      forget_loss=f_loss,  # which half went non-finite, if the step is skipped
      nll=r_nll,
      forget_nll=f_nll,
      tokens=tokens,
    )
    return self._finish(params, opt_state, grads, updates, new_state, metrics)

  def gradient_conflict(
    self, params, ref_params, forget: StepInputs, retain: StepInputs, precondition: Any = None
  ):
    """Cosine between the forget and retain gradients at ``params``: total and per leaf.

    Args:
      params, ref_params: Where to take the gradients (and the reference model's).
      forget, retain: One batch of each objective.
      precondition: Optional ``(g_forget, g_retain) -> scales`` giving per-element
        scales shaped like ``params`` (e.g. Adam's ``1 / (sqrt(v_hat) + eps)`` after
        seeing these gradients). Given, a third value is returned: the total cosine of
        the scaled gradients, i.e. of the two objectives' terms in an update that shares
        that preconditioner.

    Returns:
      ``(total, per_leaf)``, plus the preconditioned total when ``precondition`` is given.
      Dropout is off (evaluation-mode logits).
    """

    def grads_of(inputs, objective):
      return _accumulate(self._loss_grad(ref_params, objective, None), inputs, params)[0]

    g_f = grads_of(forget, jnp.int32(dualoptax.FORGET))
    g_r = grads_of(retain, jnp.int32(dualoptax.RETAIN))
    total, per_leaf = _tree_cosine(g_f, g_r)
    if precondition is None:
      return total, per_leaf
    scale = precondition(g_f, g_r)
    scaled_total, _ = _tree_cosine(
      jax.tree.map(jnp.multiply, g_f, scale), jax.tree.map(jnp.multiply, g_r, scale)
    )
    return total, per_leaf, scaled_total


def _apply_if_finite(params, opt_state, grads, updates, new_state, metrics):
  """``(params, opt_state, metrics)`` after the step, or unchanged if it is not finite;
  the metrics gain ``grad_norm`` and ``max_update`` (:func:`_largest_entry`).

  A step is finite when its loss, gradient norm and largest update entry are: the last two
  are reductions logged anyway (a NaN or inf anywhere in the gradients or updates reaches
  them), so the check costs no extra pass or all-reduce. A skipped step
  keeps the parameters and optimizer state bit for bit (``jnp.where`` per leaf, which
  keeps the donated buffers' layout) and reports ``skipped = 1``.

  ``optax.apply_if_finite`` is not used: it checks only the gradients (not the loss or
  what the optimizer made of them), adds its own state (changing the checkpoint layout)
  and applies the update anyway after its error budget.
  """
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), max_update=_largest_entry(updates))
  finite = jnp.isfinite(metrics["loss"])
  finite &= jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(metrics["max_update"])
  keep = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(keep, optax.apply_updates(params, updates), params)
  opt_state = jax.tree.map(keep, new_state, opt_state)
  return params, opt_state, {**metrics, "skipped": 1.0 - finite.astype(jnp.float32)}


def _constraint_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """``multiplier`` (lambda after the step's dual update), ``bound``, ``slack`` (bound minus
  the last retain loss: negative while the constraint is violated) and the last loss seen of
  each objective (``last_forget_loss``, ``last_retain_loss``: both, every step)."""
  state = dualoptax.constraint_metrics(opt_state)
  last = state.pop("last_losses")
  return {
    **state,
    "last_forget_loss": last[dualoptax.FORGET],
    "last_retain_loss": last[dualoptax.RETAIN],
  }


# Micro-batch indices of a joint step's retain half start here (distinct dropout keys).
_JOINT_OFFSET = 1 << 16


def _largest_entry(updates: Any) -> jax.Array:
  """The largest ``|update|`` entry of a step: with the logged learning rate, how far one
  element moved in units of it (DualOptim+'s denominator can collapse at an objective's
  first step, where the state before it cannot show it)."""
  return optax.tree.max(jax.tree.map(jnp.abs, updates))


def _tree_cosine(a: Any, b: Any) -> tuple[jax.Array, Any]:
  """Cosine of two trees taken as flat vectors, and per leaf."""
  dot = jax.tree.map(lambda x, y: jnp.vdot(x, y).real, a, b)
  sq_a = jax.tree.map(lambda x: jnp.vdot(x, x).real, a)
  sq_b = jax.tree.map(lambda x: jnp.vdot(x, x).real, b)
  tiny = jnp.finfo(jnp.float32).tiny
  per_leaf = jax.tree.map(lambda d, x, y: d / jnp.maximum(jnp.sqrt(x * y), tiny), dot, sq_a, sq_b)
  total = sum(jax.tree.leaves(dot)) / jnp.maximum(
    jnp.sqrt(sum(jax.tree.leaves(sq_a)) * sum(jax.tree.leaves(sq_b))), tiny
  )
  return total, per_leaf


def step_inputs(qa_batches: list[Any], mismatch: bool = False) -> StepInputs:
  """Stacks ``grad_accum`` micro-batches from ``train.data`` into :class:`StepInputs`.

  A batch without IDK (mismatch) rows fills that field with its true answers, so every
  step has one structure; ``mismatch=False`` leaves ``mismatch`` None.
  """

  # Host (numpy) arrays: the caller places them on its mesh in one transfer; stacking on
  # a device would dispatch small programs that a sharded step then has to reshard.
  def lm(batches):
    return losses.LMBatch(
      input_ids=np.stack([b.input_ids for b in batches]),
      attention_mask=np.stack([b.attention_mask for b in batches]),
      labels=np.stack([b.labels for b in batches]),
    )

  answers = [b.answers for b in qa_batches]
  idk = [b.idk if b.idk is not None else b.answers for b in qa_batches]
  if not mismatch:
    return StepInputs(answers=lm(answers), idk=lm(idk))
  rows = [b.mismatch if b.mismatch is not None else b.answers for b in qa_batches]
  return StepInputs(answers=lm(answers), idk=lm(idk), mismatch=lm(rows))


class StepShardings(NamedTuple):
  """Where a step's arguments and results live on the mesh.

  Attributes:
    params: The trained parameters' shardings (a tree like them).
    opt_state: The optimizer state's shardings (a tree like it).
    batch: The sharding of every ``[grad_accum, B, T]`` batch array.
    replicated: A replicated sharding (scalars: the objective, step, metrics, cosines).
    ref_params: The fixed weights' shardings (the reference model's, or LoRA's frozen
      base); None: the same as ``params``.
  """

  params: Any
  opt_state: Any
  batch: jax.sharding.Sharding
  replicated: jax.sharding.Sharding
  ref_params: Any = None

  def inputs(self, mismatch: bool = False) -> StepInputs:
    """The shardings of one objective's :class:`StepInputs` (with mismatch rows or not)."""
    lm = losses.LMBatch(self.batch, self.batch, self.batch)
    return StepInputs(answers=lm, idk=lm, mismatch=lm if mismatch else None)

  def fixed(self) -> Any:
    """The shardings of the step's ``ref_params``."""
    return self.params if self.ref_params is None else self.ref_params


class CompiledSteps(NamedTuple):
  """A run's jitted programs (each compiles on its first call).

  Attributes:
    train: ``(params, opt_state, ref_params, *batch, step) -> (params, opt_state,
      metrics)``, donating ``params`` and ``opt_state``; ``batch`` is ``(inputs,
      objective)`` in the alternating mode and ``(forget_inputs, retain_inputs)`` in the
      joint one; ``step`` (an int32, the step number) seeds dropout.
    conflict: ``(params, ref_params, forget, retain, opt_state) -> (cosine, per_leaf)``
      (:meth:`TrainStep.gradient_conflict`), plus Adam's update cosine for Adam.
    diagnostics: ``opt_state -> {name: cosine}``, the optimizer's own update cosines, or
      None for an optimizer without them.
  """

  train: Callable[..., tuple[Any, Any, dict[str, jax.Array]]]
  conflict: Callable[..., tuple[Any, ...]]
  diagnostics: Callable[[Any], dict[str, jax.Array]] | None


def compile_steps(
  steps: TrainStep, shardings: StepShardings, optimizer: OptimizerConfig, *, alternating: bool
) -> CompiledSteps:
  """Wraps ``steps`` in ``jax.jit`` with ``shardings``: one program per function.

  Args:
    steps: The run's step functions (``steps.tx`` is the optimizer ``optimizer`` describes).
    shardings: Where the arguments live; results are laid out the same way.
    optimizer: The optimizer's config: its name picks the conflict diagnostic (Adam's
      reads its preconditioner from its state) and DualOptim(+)'s own update cosines.
    alternating: Compile :meth:`TrainStep.alternating` (else :meth:`TrainStep.joint`).

  Returns:
    The jitted train step (with the XLA:CPU options of :mod:`train.runtime.compiler`),
    conflict diagnostic and optimizer diagnostics.
  """
  inputs = shardings.inputs(mismatch=losses.needs_mismatch_batch(steps.loss_config))
  replicated, fixed = shardings.replicated, shardings.fixed()
  batch = (inputs, replicated) if alternating else (inputs, inputs)
  train = jax.jit(
    steps.alternating if alternating else steps.joint,
    # The fixed weights (ref_params) are read only: never donated, so a caller's stay valid.
    donate_argnums=(0, 1),
    in_shardings=(shardings.params, shardings.opt_state, fixed, *batch, replicated),
    out_shardings=(shardings.params, shardings.opt_state, replicated),
    compiler_options=step_compiler_options(),
  )
  adam = optimizer.name == "adam"  # Adam's update terms: both gradients through its one nu

  def conflict(params, ref_params, forget, retain, opt_state):
    precondition = adam_preconditioner(opt_state) if adam else None
    return steps.gradient_conflict(params, ref_params, forget, retain, precondition)

  conflict_fn = jax.jit(
    conflict,
    in_shardings=(shardings.params, fixed, inputs, inputs, shardings.opt_state),
    out_shardings=replicated,
  )
  diagnostics = optimizer_diagnostics_fn(optimizer, out_shardings=replicated)
  return CompiledSteps(train, conflict_fn, diagnostics)
