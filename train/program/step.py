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

The step functions are pure; :func:`compile_steps` wraps them in ``jax.jit`` with the
run's shardings, donation and compiler options.
"""

from __future__ import annotations

import dataclasses
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


class StepInputs(NamedTuple):
  """One objective's batch: questions with true answers, and the same rows with IDK answers.

  Arrays have a leading micro-batch axis ``[grad_accum, B, T]``.
  """

  answers: losses.LMBatch
  idk: losses.LMBatch


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
    loss, m = losses.retain_loss(config, logits_fn, params, ref_params, inputs.answers, inputs.idk)
    return loss, (m["retain/nll"], m["retain/tokens"].astype(jnp.float32))

  return jax.lax.cond(objective == dualoptax.FORGET, forget, retain)


def _accumulate(grad_fn, micro_batches: Any, params: Any):
  """Mean of ``grad_fn(params, micro_batch)`` over the leading axis of ``micro_batches``."""
  num = jax.tree.leaves(micro_batches)[0].shape[0]

  def body(carry, micro):
    (loss, aux), grads = grad_fn(params, micro)
    acc_grads, acc_loss, acc_aux = carry
    return (
      jax.tree.map(jnp.add, acc_grads, grads),
      acc_loss + loss,
      jax.tree.map(jnp.add, acc_aux, aux),
    ), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  first = jax.tree.map(lambda x: x[0], micro_batches)
  aux_zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first)[0][1])
  (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.float32(0.0), aux_zeros), micro_batches)
  scale = 1.0 / num
  return (
    jax.tree.map(lambda g: g * scale, grads),
    loss * scale,
    jax.tree.map(lambda a: a * scale, aux),
  )


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """The step functions of one run (pure; jit them with :func:`compile_steps`)."""

  logits_fn: LogitsFn
  tx: optax.GradientTransformation
  loss_config: losses.LossConfig

  def alternating(self, params, opt_state, ref_params, inputs: StepInputs, objective):
    """One step on ``objective`` (0 forget, 1 retain): ``(params, opt_state, metrics)``."""
    grad_fn = jax.value_and_grad(
      lambda p, micro: _objective_loss(
        self.loss_config, self.logits_fn, p, ref_params, micro, objective
      ),
      has_aux=True,
    )
    grads, loss, (nll, tokens) = _accumulate(grad_fn, inputs, params)
    updates, opt_state = self.tx.update(grads, opt_state, params, objective=objective)
    params = optax.apply_updates(params, updates)
    metrics = dict(loss=loss, nll=nll, tokens=tokens, grad_norm=optax.tree.norm(grads))
    return params, opt_state, metrics

  def joint(self, params, opt_state, ref_params, forget: StepInputs, retain: StepInputs):
    """One step on ``forget_coeff * L_f + retain_coeff * L_r``."""

    def loss_fn(p, micro):
      f_micro, r_micro = micro
      f_loss, (f_nll, f_tokens) = _objective_loss(
        self.loss_config, self.logits_fn, p, ref_params, f_micro, jnp.int32(0)
      )
      r_loss, (r_nll, r_tokens) = _objective_loss(
        self.loss_config, self.logits_fn, p, ref_params, r_micro, jnp.int32(1)
      )
      return f_loss + r_loss, (f_nll, r_nll, f_tokens + r_tokens)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    grads, loss, (f_nll, r_nll, tokens) = _accumulate(grad_fn, (forget, retain), params)
    # Joint steps serve both objectives; RETAIN's learning-rate ratio (1 by convention).
    updates, opt_state = self.tx.update(grads, opt_state, params, objective=dualoptax.RETAIN)
    params = optax.apply_updates(params, updates)
    metrics = dict(
      loss=loss, nll=r_nll, forget_nll=f_nll, tokens=tokens, grad_norm=optax.tree.norm(grads)
    )
    return params, opt_state, metrics

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
    """

    def grads_of(inputs, objective):
      grad_fn = jax.value_and_grad(
        lambda p, micro: _objective_loss(
          self.loss_config, self.logits_fn, p, ref_params, micro, objective
        ),
        has_aux=True,
      )
      return _accumulate(grad_fn, inputs, params)[0]

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


def step_inputs(qa_batches: list[Any]) -> StepInputs:
  """Stacks ``grad_accum`` micro-batches from ``train.data`` into :class:`StepInputs`."""

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
  return StepInputs(answers=lm(answers), idk=lm(idk))


class StepShardings(NamedTuple):
  """Where a step's arguments and results live on the mesh.

  Attributes:
    params: The parameters' shardings (a tree like them; also the reference model's).
    opt_state: The optimizer state's shardings (a tree like it).
    batch: The sharding of every ``[grad_accum, B, T]`` batch array.
    replicated: A replicated sharding (scalars: the objective, metrics, cosines).
  """

  params: Any
  opt_state: Any
  batch: jax.sharding.Sharding
  replicated: jax.sharding.Sharding

  def inputs(self) -> StepInputs:
    """The shardings of one objective's :class:`StepInputs`."""
    lm = losses.LMBatch(self.batch, self.batch, self.batch)
    return StepInputs(answers=lm, idk=lm)


class CompiledSteps(NamedTuple):
  """A run's jitted programs (each compiles on its first call).

  Attributes:
    train: ``(params, opt_state, ref_params, *batch) -> (params, opt_state, metrics)``,
      donating ``params`` and ``opt_state``; ``batch`` is ``(inputs, objective)`` in the
      alternating mode and ``(forget_inputs, retain_inputs)`` in the joint one.
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
  inputs, replicated = shardings.inputs(), shardings.replicated
  batch = (inputs, replicated) if alternating else (inputs, inputs)
  train = jax.jit(
    steps.alternating if alternating else steps.joint,
    donate_argnums=(0, 1),
    in_shardings=(shardings.params, shardings.opt_state, shardings.params, *batch),
    out_shardings=(shardings.params, shardings.opt_state, replicated),
    compiler_options=step_compiler_options(),
  )
  adam = optimizer.name == "adam"  # Adam's update terms: both gradients through its one nu

  def conflict(params, ref_params, forget, retain, opt_state):
    precondition = adam_preconditioner(opt_state) if adam else None
    return steps.gradient_conflict(params, ref_params, forget, retain, precondition)

  conflict_fn = jax.jit(
    conflict,
    in_shardings=(shardings.params, shardings.params, inputs, inputs, shardings.opt_state),
    out_shardings=replicated,
  )
  diagnostics = optimizer_diagnostics_fn(optimizer, out_shardings=replicated)
  return CompiledSteps(train, conflict_fn, diagnostics)
