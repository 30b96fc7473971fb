"""The unlearning stage: the configured optimizer and losses on the mesh, with checkpoints,
exact resumption, metric logs and conflict diagnostics.

:func:`unlearn` is the loop; each of its pieces is a function or class of its own here:
placing the state on the mesh (:func:`place_on_mesh`), the compiled steps
(:func:`train.program.step.compile_steps`), the batches of each step (:class:`StepBatches`),
resuming (:func:`restore`), the diagnostics record (:func:`diagnostics_record`) and the
metric logs (:class:`train.runtime.metrics.MetricsLogger`).

With ``model.lora.enabled`` only LoRA adapters train (:func:`trained_part`): the jitted step
takes the adapters (donated, updated) and the frozen base weights (read only, not donated,
not copied), which also run as the reference model. The optimizer is built over the
adapters alone, so its state has moments for them only, and checkpoints hold the adapters
and that state (plus the step and the sampler's position; dropout keys derive from the
step). Masking the optimizer instead (``mask=``) would still differentiate every weight,
pass the base's raw gradients through unmasked leaves, clip by the whole model's gradient
norm and donate and checkpoint the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import dualoptax
from train import data as data_lib
from train import losses
from train.config import ConfigError, MeshConfig, OptimizerConfig, RunConfig, TrainingConfig
from train.program import optimizer as optimizer_lib
from train.program import step as step_lib
from train.program.modeling import FunctionalModel, join_adapters, lora_config
from train.runtime import distributed
from train.runtime import sharding as sharding_lib
from train.runtime.checkpointing import RunCheckpointer
from train.runtime.metrics import MetricsLogger


@dataclasses.dataclass
class UnlearnResult:
  """What an unlearning run gives back.

  Attributes:
    model: The model ``params`` belong to (with LoRA: the adapted model).
    params: The unlearned weights (with LoRA: ``AdaptedParams``, the unchanged base and the
      trained adapters; ``save_model`` merges them).
    opt_state: The optimizer state (over the trained weights only).
    history: The logged metrics, one dict per step.
    seconds: Wall time of the steps.
    state_bytes: Bytes of ``opt_state``.
  """

  model: FunctionalModel
  params: Any
  opt_state: Any
  history: list[dict[str, Any]]
  seconds: float
  state_bytes: int


class TrainedPart(NamedTuple):
  """What a run trains and what it only reads.

  Attributes:
    model: The model trained (with LoRA: ``model`` with adapters).
    params: The weights the optimizer updates (all of them, or the adapters).
    fixed: The weights the step reads only: the reference model (without LoRA) or the
      frozen base, which is also the reference (with LoRA).
    join: ``(params, fixed) -> weights`` of the trained model (``TrainStep.join``).
  """

  model: FunctionalModel
  params: Any
  fixed: Any
  join: Any


def trained_part(
  config: RunConfig, model: FunctionalModel, params: Any, ref_params: Any
) -> TrainedPart:
  """Splits a run's weights into what trains and what stays fixed (see the module doc).

  Raises:
    ValueError: With LoRA, if ``ref_params`` is another model than ``params`` (the reference
      is the base model itself).
    ConfigError: If no projection of the model is among ``model.lora.targets``.
  """
  if not config.model.lora.enabled:
    # The step donates params: work on a copy, so the caller's (often the target, also the
    # reference model) stay alive.
    return TrainedPart(model, jax.tree.map(jnp.copy, params), ref_params, step_lib.trained_weights)
  if ref_params is not None and ref_params is not params:
    raise ValueError("with model.lora the reference model is the base model: pass params")
  try:
    lora = lora_config(config.model.lora)
    adapted, weights = model.with_lora(params, lora, seed=config.training.seed)
  except ValueError as e:  # no projection of this model is among the targets
    raise ConfigError(f"model.lora.targets: {e}") from e
  return TrainedPart(adapted, weights.adapters, weights.base, join_adapters)


def unlearn(
  config: RunConfig,
  model: FunctionalModel,
  params: Any,
  ref_params: Any,
  forget_stream: data_lib.BatchStream,
  retain_stream: data_lib.BatchStream,
  run_dir: pathlib.Path,
  resume: bool = True,
  opt_state: Any | None = None,
) -> UnlearnResult:
  """Unlearns with the configured optimizer and losses; checkpoints and resumes exactly.

  Writes ``metrics.jsonl`` (one line per logged step: :func:`step_record`, plus the
  diagnostics every ``training.diagnostics_every`` steps), TensorBoard scalars under
  ``tensorboard/`` and checkpoints under ``run_dir``. The learning rate follows
  :func:`train.program.optimizer.learning_rate_schedule` over ``training.steps`` with the
  streams' epoch length (:func:`schedule_args`). With ``config.model.lora`` enabled,
  ``params`` stay frozen (adapters train) and ``ref_params`` must be ``params`` or None.
  ``opt_state`` starts the optimizer from a carried state (continual unlearning) instead of
  a fresh one; a checkpoint in ``run_dir`` still takes precedence.
  """
  opt_config, train_config = config.optimizer, config.training
  schedule = schedule_args(config, forget_stream, retain_stream)
  tx = optimizer_lib.run_optimizer(config, **schedule)
  part = trained_part(config, model, params, ref_params)
  opt_state = tx.init(part.params) if opt_state is None else opt_state
  placed = place_on_mesh(config.mesh, part.params, part.fixed, opt_state)
  shardings, params, fixed, opt_state = placed
  compiled = step_lib.compile_steps(
    make_train_step(part, tx, config),
    shardings,
    opt_config,
    alternating=train_config.mode == "alternating",
  )
  batches = StepBatches(
    make_sampler(config, forget_stream, retain_stream),
    shardings,
    train_config,
    mismatch=losses.needs_mismatch_batch(config.loss.build()),
  )
  checkpointer = RunCheckpointer(run_dir / "checkpoints", train_config.keep_checkpoints)
  start = 0
  with _closing_on_error(checkpointer):
    if resume:
      start, params, opt_state = restore(checkpointer, params, opt_state, batches.sampler)
  logger = MetricsLogger(run_dir, start_step=start, write=distributed.is_primary())
  guard = NonFiniteGuard(train_config.max_nonfinite_steps, checkpointer)
  began = time.perf_counter()
  progress = _progress(start, train_config.steps, opt_config.name)
  with _closing_on_error(checkpointer, logger):
    for step in progress:
      objective, batch = batches.next()
      number = jax.device_put(np.int32(step), shardings.replicated)
      params, opt_state, metrics = compiled.train(params, opt_state, fixed, *batch, number)
      record = guard.check(step_record(opt_config, schedule, step, objective, metrics))
      if (step + 1) % train_config.diagnostics_every == 0:
        record.update(diagnostics_record(compiled, batches, params, fixed, opt_state))
      logger.log(record)
      guard.stop_if_exhausted()
      progress.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
      if (step + 1) % train_config.checkpoint_every == 0 or step + 1 == train_config.steps:
        meta = {"sampler": batches.sampler.state.to_dict(), "optimizer": opt_config.name}
        checkpointer.save(step + 1, {"params": params, "opt_state": opt_state}, meta)
    checkpointer.close()
    logger.close()
  jax.block_until_ready(params)
  seconds, state_bytes = time.perf_counter() - began, dualoptax.state_nbytes(opt_state)
  weights = part.join(params, fixed)
  return UnlearnResult(part.model, weights, opt_state, logger.history, seconds, state_bytes)


def schedule_args(
  config: RunConfig, forget_stream: data_lib.BatchStream, retain_stream: data_lib.BatchStream
) -> dict[str, int]:
  """The learning-rate schedule's ``total_steps`` (``training.steps``) and
  ``steps_per_epoch`` (of these streams' data sets; see
  :func:`train.program.optimizer.steps_per_epoch`), as keyword arguments."""
  per_epoch = optimizer_lib.steps_per_epoch(
    config, len(forget_stream.dataset), len(retain_stream.dataset)
  )
  return {"total_steps": config.training.steps, "steps_per_epoch": per_epoch}


def step_record(
  config: OptimizerConfig,
  schedule: dict[str, int],
  step: int,
  objective: int,
  metrics: dict[str, Any],
) -> dict[str, Any]:
  """The log line of update ``step`` (0-based): its number from 1, its objective (-1:
  joint), the learning rate it applied and the step's metrics.

  The learning rate is the schedule's value times the objective's ratio (a joint step's is
  the retain ratio: :meth:`train.program.step.TrainStep.joint` passes RETAIN).
  """
  ratio = config.forget_lr_ratio if objective == data_lib.FORGET else config.retain_lr_ratio
  return {
    "step": step + 1,
    "objective": objective,
    "learning_rate": ratio * optimizer_lib.learning_rate_at(config, step, **schedule),
    **{k: float(v) for k, v in metrics.items()},
  }


def make_train_step(part: TrainedPart, tx: Any, config: RunConfig) -> step_lib.TrainStep:
  """The step functions of ``part``: with LoRA, training-mode logits (adapter dropout)."""
  dropout = config.model.lora.enabled and config.model.lora.dropout > 0
  return step_lib.TrainStep(
    part.model.logits,
    tx,
    config.loss.build(),
    join=part.join,
    train_logits_fn=part.model.train_logits if dropout else None,
    dropout_seed=config.training.seed,
    constrained=config.constraint.enabled,
  )


def place_on_mesh(
  mesh_config: MeshConfig, params: Any, ref_params: Any, opt_state: Any
) -> tuple[step_lib.StepShardings, Any, Any, Any]:
  """Lays out a run's arrays on the configured mesh by the logical-axis rules.

  Args:
    mesh_config: The mesh sizes.
    params: The trained weights.
    ref_params: The fixed weights (the reference model, or LoRA's frozen base).
    opt_state: The optimizer state of ``params``.

  Returns:
    ``(shardings, params, ref_params, opt_state)``: the step's shardings (see
    :mod:`train.runtime.sharding`) and the arrays placed by them.
  """
  mesh = sharding_lib.make_mesh(mesh_config)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  param_sh = sharding_lib.param_shardings(params, mesh)
  # No reference model (None): any sharding will do for an empty tree.
  ref_sh = replicated if ref_params is None else sharding_lib.param_shardings(ref_params, mesh)
  shardings = step_lib.StepShardings(
    params=param_sh,
    opt_state=sharding_lib.state_shardings(opt_state, params, param_sh, mesh),
    batch=sharding_lib.batch_sharding(mesh),
    replicated=replicated,
    ref_params=ref_sh,
  )
  return (
    shardings,
    jax.device_put(params, param_sh),
    jax.device_put(ref_params, ref_sh),
    jax.device_put(opt_state, shardings.opt_state),
  )


def make_sampler(
  config: RunConfig, forget_stream: data_lib.BatchStream, retain_stream: data_lib.BatchStream
) -> data_lib.AlternatingSampler | data_lib.JointSampler:
  """The sampler of ``config.training.mode``: the optimizer's forget/retain schedule
  (alternating) or one batch of each per step (joint)."""
  if config.training.mode == "alternating":
    return data_lib.AlternatingSampler(
      forget_stream,
      retain_stream,
      forget_steps=config.optimizer.forget_steps,
      retain_steps=config.optimizer.retain_steps,
    )
  return data_lib.JointSampler(forget_stream, retain_stream)


class StepBatches:
  """The batch arguments of each step, placed on the mesh.

  A step takes ``grad_accum`` micro-batches of each objective it serves: the sampler's
  batch, then the next ones of the same stream.

  Args:
    sampler: Which objective each step serves, and its first micro-batch.
    shardings: Where batches go (``batch``) and the objective (``replicated``).
    training: ``grad_accum`` and ``mode`` (the sampler's kind).
    mismatch: The steps take mismatch rows (LLMU; see :func:`train.program.step.step_inputs`).
  """

  def __init__(
    self,
    sampler: data_lib.AlternatingSampler | data_lib.JointSampler,
    shardings: step_lib.StepShardings,
    training: TrainingConfig,
    mismatch: bool = False,
  ):
    self.sampler = sampler
    self.mismatch = mismatch
    self.alternating = training.mode == "alternating"
    self._extra = training.grad_accum - 1  # micro-batches beyond the sampler's one per step
    self._shardings = shardings

  def place(self, qa_batches: list[data_lib.QABatch]) -> step_lib.StepInputs:
    """This host's rows of the micro-batches -> one global array per field, on the mesh."""
    inputs = step_lib.step_inputs(qa_batches, mismatch=self.mismatch)
    return sharding_lib.place_batch(inputs, self._shardings.batch)

  def next(self) -> tuple[int, tuple[Any, ...]]:
    """``(objective, batch)``: the step's objective (-1 for a joint step) and the arguments
    that follow the reference parameters in the compiled train step."""
    forget, retain = self.sampler.forget, self.sampler.retain
    if self.alternating:
      objective, qa = next(self.sampler)
      stream = forget if objective == data_lib.FORGET else retain
      micro = [qa] + [next(stream) for _ in range(self._extra)]
      placed = jax.device_put(np.int32(objective), self._shardings.replicated)
      return int(objective), (self.place(micro), placed)
    forget_qa, retain_qa = next(self.sampler)
    forget_micro = [forget_qa] + [next(forget) for _ in range(self._extra)]
    retain_micro = [retain_qa] + [next(retain) for _ in range(self._extra)]
    return -1, (self.place(forget_micro), self.place(retain_micro))

  def peek(self) -> tuple[step_lib.StepInputs, step_lib.StepInputs]:
    """The next forget and retain batches (one micro-batch each), without taking them."""
    forget, retain = self.sampler.forget, self.sampler.retain
    return (
      self.place([forget.batch_at(forget.position)]),
      self.place([retain.batch_at(retain.position)]),
    )


def restore(
  checkpointer: RunCheckpointer, params: Any, opt_state: Any, sampler: Any
) -> tuple[int, Any, Any]:
  """Restores the newest good checkpoint into the placed ``params`` and ``opt_state`` (each
  host reads its shards straight into place) and moves ``sampler`` to where it was.

  Broken newer checkpoints are reported and set aside
  (:meth:`RunCheckpointer.restore_latest_good`).

  Returns:
    ``(step, params, opt_state)``: ``(0, params, opt_state)`` if there is no checkpoint.

  Raises:
    train.runtime.checkpointing.CheckpointError: if checkpoints exist but none restores.
  """
  restored = checkpointer.restore_latest_good(
    {"params": params, "opt_state": opt_state},
    check=lambda meta: data_lib.SamplerState.from_dict(meta["sampler"]),
  )
  if restored is None:
    return 0, params, opt_state
  step, state, meta = restored
  sampler.restore(data_lib.SamplerState.from_dict(meta["sampler"]))
  return step, state["params"], state["opt_state"]


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss, gradient or update; the message is
  one line naming the steps, the objective and the checkpoint kept."""


class NonFiniteGuard:
  """Counts the steps the train step skipped as non-finite (``skipped`` in its metrics).

  Each record gains ``nonfinite_steps`` (the run's total so far); each skipped step prints
  a one-line warning, and ``limit`` consecutive ones stop the run (:meth:`stop_if_exhausted`
  raises :class:`NonFiniteError`). The parameters then are those before the first of them,
  and the checkpoints are untouched.
  """

  def __init__(self, limit: int, checkpointer: RunCheckpointer):
    self.limit, self.total, self.checkpointer = limit, 0, checkpointer
    self.streak: list[tuple[int, str]] = []  # (step number, what went non-finite)

  def check(self, record: dict[str, Any]) -> dict[str, Any]:
    if record.get("skipped", 0.0) > 0:
      self.total += 1
      self.streak.append((record["step"], _nonfinite_part(record)))
      if distributed.is_primary():
        tqdm.write(
          f"warning: step {record['step']}: the {self.streak[-1][1]} is not finite; step "
          "skipped (parameters and optimizer state unchanged)",
          file=sys.stderr,
        )
    else:
      self.streak.clear()
    record["nonfinite_steps"] = self.total
    return record

  def stop_if_exhausted(self) -> None:
    if len(self.streak) < self.limit:
      return
    (first, what), last = self.streak[0], self.streak[-1][0]
    kept = self.checkpointer.latest_step()
    where = f"step {kept} in {self.checkpointer.directory}" if kept else "none"
    raise NonFiniteError(
      f"steps {first}-{last}: {len(self.streak)} non-finite steps in a row "
      f"(training.max_nonfinite_steps={self.limit}), first the {what} at step {first}; "
      f"stopped with the parameters of step {first - 1}; last checkpoint kept: {where}"
    )


def _nonfinite_part(record: dict[str, Any]) -> str:
  """Which value of a skipped step was not finite: the forget or retain loss, or (finite
  losses) that objective's gradients or update."""
  objective = record["objective"]
  finite_loss = math.isfinite(record["loss"])
  if objective == -1:  # joint: the forget half, or else the retain half
    if finite_loss:
      return "gradient or update of the joint loss"
    return "forget loss" if not math.isfinite(record["forget_loss"]) else "retain loss"
  name = "forget" if objective == data_lib.FORGET else "retain"
  return f"{name} loss" if not finite_loss else f"{name} gradient or update"


@contextlib.contextmanager
def _closing_on_error(*closables: RunCheckpointer | MetricsLogger):
  """On an error in the loop, closes the checkpointer and logs before it propagates (an
  unclosed orbax manager's threads otherwise die with "Event loop is closed" tracebacks
  at exit); errors while closing are dropped, the loop's own is the one to report."""
  try:
    yield
  except BaseException:
    for closable in closables:
      try:
        closable.close()
      except Exception:  # noqa: BLE001,S110
        pass
    raise


def diagnostics_record(
  compiled: step_lib.CompiledSteps,
  batches: StepBatches,
  params: Any,
  ref_params: Any,
  opt_state: Any,
) -> dict[str, Any]:
  """The conflict diagnostics at ``params`` on the next forget and retain batches.

  Returns:
    ``gradient_cosine`` (forget vs retain gradient), Adam's ``update_cosine`` (the two
    gradients through its shared preconditioner), the optimizer's own cosines (DualOptim
    and DualOptim+), and ``gradient_cosine_per_leaf`` (by parameter path).
  """
  forget, retain = batches.peek()
  cosine, per_leaf, *adam_cosine = compiled.conflict(params, ref_params, forget, retain, opt_state)
  record: dict[str, Any] = {"gradient_cosine": float(cosine)}
  if adam_cosine:
    record["update_cosine"] = float(adam_cosine[0])
  if compiled.diagnostics is not None:
    record.update({k: float(v) for k, v in compiled.diagnostics(opt_state).items()})
  record["gradient_cosine_per_leaf"] = {
    jax.tree_util.keystr(path): float(value)
    for path, value in jax.tree_util.tree_flatten_with_path(per_leaf)[0]
  }
  return record


def _progress(start: int, steps: int, name: str) -> tqdm:
  """The loop's progress bar over steps ``start .. steps - 1`` (on the primary process)."""
  return tqdm(
    range(start, steps),
    desc=f"unlearn ({name})",
    leave=False,
    mininterval=1.0,
    disable=not distributed.is_primary(),
  )
