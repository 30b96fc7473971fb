"""The unlearning stage: the configured optimizer and losses on the mesh, with checkpoints,
exact resumption, metric logs and conflict diagnostics."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import dualoptax
from train import data as data_lib
from train import losses
from train.config import RunConfig
from train.program import step as step_lib
from train.program.modeling import FunctionalModel
from train.program.optimizer import adam_preconditioner, make_optimizer, optimizer_diagnostics_fn
from train.runtime import distributed
from train.runtime import sharding as sharding_lib
from train.runtime.checkpointing import RunCheckpointer
from train.runtime.compiler import step_compiler_options
from train.runtime.tensorboard import ScalarWriter


@dataclasses.dataclass
class UnlearnResult:
  params: Any
  opt_state: Any
  history: list[dict[str, Any]]
  seconds: float
  state_bytes: int


def unlearn(
  config: RunConfig,
  model: FunctionalModel,
  params: Any,
  ref_params: Any,
  forget_stream: data_lib.BatchStream,
  retain_stream: data_lib.BatchStream,
  run_dir: pathlib.Path,
  resume: bool = True,
) -> UnlearnResult:
  """Unlearns with the configured optimizer and losses; checkpoints and resumes exactly.

  Writes ``metrics.jsonl`` (one line per logged step) and checkpoints under ``run_dir``.
  """
  opt_config, train_config = config.optimizer, config.training
  loss_config = config.loss.build()
  tx = make_optimizer(opt_config)
  # The step donates params and state: work on a copy so the caller's (often the target,
  # also the reference model) stay alive.
  params = jax.tree.map(jnp.copy, params)
  opt_state = tx.init(params)
  steps = step_lib.TrainStep(model.logits, tx, loss_config)
  alternating = train_config.mode == "alternating"
  sampler_cls = data_lib.AlternatingSampler if alternating else data_lib.JointSampler
  sampler_kwargs = (
    dict(forget_steps=opt_config.forget_steps, retain_steps=opt_config.retain_steps)
    if alternating
    else {}
  )
  sampler = sampler_cls(forget_stream, retain_stream, **sampler_kwargs)
  # Place everything on the mesh by the logical-axis rules; compile once with those layouts.
  mesh = sharding_lib.make_mesh(config.mesh)
  param_sh = sharding_lib.param_shardings(params, mesh)
  state_sh = sharding_lib.state_shardings(opt_state, params, param_sh, mesh)
  batch_sh = sharding_lib.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params, opt_state = jax.device_put(params, param_sh), jax.device_put(opt_state, state_sh)
  ref_params = jax.device_put(ref_params, param_sh)
  checkpointer = RunCheckpointer(run_dir / "checkpoints", train_config.keep_checkpoints)
  start = 0
  if resume and checkpointer.latest_step() is not None:
    # Restoring into the placed state reads each host's shards straight into place.
    start, state, meta = checkpointer.restore({"params": params, "opt_state": opt_state})
    params, opt_state = state["params"], state["opt_state"]
    sampler.restore(data_lib.SamplerState.from_dict(meta["sampler"]))
  inputs_sh = step_lib.StepInputs(*(losses.LMBatch(batch_sh, batch_sh, batch_sh),) * 2)
  batch_args = (inputs_sh, replicated) if alternating else (inputs_sh, inputs_sh)
  train_fn = jax.jit(
    steps.alternating if alternating else steps.joint,
    donate_argnums=(0, 1),
    in_shardings=(param_sh, state_sh, param_sh, *batch_args),
    out_shardings=(param_sh, state_sh, replicated),
    compiler_options=step_compiler_options(),
  )
  adam = opt_config.name == "adam"  # Adam's update terms: both gradients through its one nu

  def conflict(params, ref_params, forget, retain, opt_state):
    precondition = adam_preconditioner(opt_config, opt_state) if adam else None
    return steps.gradient_conflict(params, ref_params, forget, retain, precondition)

  conflict_fn = jax.jit(
    conflict,
    in_shardings=(param_sh, param_sh, inputs_sh, inputs_sh, state_sh),
    out_shardings=replicated,
  )
  diagnostics_fn = optimizer_diagnostics_fn(opt_config, out_shardings=replicated)

  def inputs(qa_batches):  # this host's rows -> one global array per field, on the mesh
    return sharding_lib.place_batch(step_lib.step_inputs(qa_batches), batch_sh)

  primary = distributed.is_primary()  # one process writes the run's logs
  metrics_path = run_dir / "metrics.jsonl"
  if primary and metrics_path.exists():  # drop what a killed run logged after its last checkpoint
    kept = [
      line
      for line in metrics_path.read_text().splitlines()
      if line and json.loads(line)["step"] <= start
    ]
    metrics_path.write_text("".join(line + "\n" for line in kept))
  history: list[dict[str, Any]] = []
  tensorboard = ScalarWriter(run_dir / "tensorboard") if primary else None
  began = time.perf_counter()
  progress = tqdm(
    range(start, train_config.steps),
    desc=f"unlearn ({opt_config.name})",
    leave=False,
    mininterval=1.0,
    disable=not primary,
  )
  extra = train_config.grad_accum - 1  # micro-batches beyond the sampler's one per step
  for step in progress:
    if alternating:
      objective, qa = next(sampler)
      stream = forget_stream if objective == data_lib.FORGET else retain_stream
      micro = [qa] + [next(stream) for _ in range(extra)]
      params, opt_state, metrics = train_fn(
        params,
        opt_state,
        ref_params,
        inputs(micro),
        jax.device_put(np.int32(objective), replicated),
      )
    else:
      objective = -1
      forget_qa, retain_qa = next(sampler)
      forget_micro = [forget_qa] + [next(forget_stream) for _ in range(extra)]
      retain_micro = [retain_qa] + [next(retain_stream) for _ in range(extra)]
      params, opt_state, metrics = train_fn(
        params, opt_state, ref_params, inputs(forget_micro), inputs(retain_micro)
      )
    record = {
      "step": step + 1,
      "objective": int(objective),
      **{k: float(v) for k, v in metrics.items()},
    }
    if (step + 1) % train_config.diagnostics_every == 0:
      f_batch = forget_stream.batch_at(forget_stream.position)
      r_batch = retain_stream.batch_at(retain_stream.position)
      cosine, per_leaf, *adam_cosine = conflict_fn(
        params, ref_params, inputs([f_batch]), inputs([r_batch]), opt_state
      )
      record["gradient_cosine"] = float(cosine)
      if adam_cosine:
        record["update_cosine"] = float(adam_cosine[0])
      if diagnostics_fn is not None:
        record.update({k: float(v) for k, v in diagnostics_fn(opt_state).items()})
      record["gradient_cosine_per_leaf"] = {
        jax.tree_util.keystr(path): float(value)
        for path, value in jax.tree_util.tree_flatten_with_path(per_leaf)[0]
      }
    history.append(record)
    if primary:
      with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
      tensorboard.scalars(
        step + 1, {k: v for k, v in record.items() if isinstance(v, float) and k != "step"}
      )
    progress.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
    if (step + 1) % train_config.checkpoint_every == 0 or step + 1 == train_config.steps:
      checkpointer.save(
        step + 1,
        {"params": params, "opt_state": opt_state},
        {"sampler": sampler.state.to_dict(), "optimizer": opt_config.name},
      )
  checkpointer.close()
  if tensorboard is not None:
    tensorboard.close()
  jax.block_until_ready(params)
  return UnlearnResult(
    params, opt_state, history, time.perf_counter() - began, dualoptax.state_nbytes(opt_state)
  )
