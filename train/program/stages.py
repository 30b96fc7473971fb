"""The unlearning program's stages: optimizer, fine-tuning, unlearning, evaluation.

Each stage is a function of a :class:`~train.config.RunConfig` and plain values, so the CLI
(`train/run.py`), the default experiment (`train/experiment.py`) and tests compose them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import dualoptax
from train import data as data_lib
from train import losses
from train.config import OptimizerConfig, RunConfig
from train.evaluation import EvalConfig, evaluate, tofu_eval_sets
from train.program import step as step_lib
from train.program.modeling import FunctionalModel, ScoringAdapter
from train.runtime import distributed
from train.runtime import sharding as sharding_lib
from train.runtime.checkpointing import RunCheckpointer
from train.runtime.compiler import step_compiler_options
from train.runtime.tensorboard import ScalarWriter


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """The configured optimizer, with optional clipping and linear warmup."""
  learning_rate: Any = config.learning_rate
  if config.warmup_steps:
    learning_rate = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  schedule = dict(
    forget_lr_ratio=config.forget_lr_ratio,
    retain_lr_ratio=config.retain_lr_ratio,
    forget_steps=config.forget_steps,
    retain_steps=config.retain_steps,
  )
  if config.name == "adam":
    tx = dualoptax.adamw(
      learning_rate,
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      **schedule,
    )
  elif config.name == "dualoptim":
    tx = dualoptax.dualoptim(
      learning_rate,
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      state_bits=config.state_bits,
      **schedule,
    )
  else:
    tx = dualoptax.dualoptim_plus(
      learning_rate,
      b1=config.b1,
      b2=config.b2,
      base_b1=config.base_b1,
      base_b2=config.base_b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      state_bits=config.state_bits,
      **schedule,
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
  ``jit_kwargs`` go to ``jax.jit`` (e.g. ``out_shardings``).
  """
  if config.name == "dualoptim_plus":
    diagnose = functools.partial(
      dualoptax.dualoptim_plus_diagnostics,
      b1=config.b1,
      b2=config.b2,
      base_b1=config.base_b1,
      base_b2=config.base_b2,
      eps=config.eps,
    )
  elif config.name == "dualoptim":
    diagnose = functools.partial(
      dualoptax.dualoptim_diagnostics, b1=config.b1, b2=config.b2, eps=config.eps
    )
  else:
    return None

  def cosines(opt_state):
    _, total = diagnose(opt_state)
    return {
      "update_cosine": total.update_cosine,
      "preconditioned_cosine": total.preconditioned_cosine,
    }

  return jax.jit(cosines, **jit_kwargs)


def adam_preconditioner(config: OptimizerConfig, opt_state: Any) -> Callable[[Any, Any], Any]:
  """``(g_forget, g_retain) -> 1 / (sqrt(v_hat) + eps)``: the per-element scale of Adam's
  next joint step on these gradients (its ``nu`` after seeing their sum, bias-corrected).

  Adam keeps one state for both objectives, so its forget and retain update terms are the
  two gradients through this one shared preconditioner; their cosine is Adam's point on
  the paper's Figure 2 (the momentum blends them further). Using ``nu`` after the step,
  not before, matters: an element with no gradient so far has ``nu = 0`` and would be
  scaled by ``1/eps``.
  """
  state = dualoptax.find_state(opt_state, optax.ScaleByAdamState)
  b2 = config.b2
  correction = 1 - b2 ** (state.count + 1).astype(jnp.float32)

  def scale(g_forget, g_retain):
    return jax.tree.map(
      lambda nu, f, r: (
        1 / (jnp.sqrt((b2 * nu + (1 - b2) * jnp.square(f + r)) / correction) + config.eps)
      ),
      state.nu,
      g_forget,
      g_retain,
    )

  return scale


def make_streams(
  config: RunConfig,
  splits: data_lib.TofuSplits,
  tokenizer: Any,
  loss_config: losses.LossConfig,
  batch_size: int | None = None,
):
  """Forget and retain batch streams with the IDK answers the losses need."""
  tokenization = data_lib.TokenizationConfig(
    template=config.data.template, max_length=config.data.max_length, pad_to_max_length=True
  )
  batching = data_lib.BatchingConfig(batch_size or config.data.batch_size, seed=config.data.seed)
  # Each process collates only its rows of every global batch (all of them in one process).
  rows = distributed.host_rows(batching.batch_size)
  idk = tuple(splits.idk_answers)
  forget = data_lib.QADataset(splits.forget, tokenizer, tokenization, idk_answers=idk)
  retain = data_lib.QADataset(splits.retain, tokenizer, tokenization, idk_answers=idk)
  return (
    data_lib.BatchStream(
      forget,
      batching,
      stream_id=data_lib.FORGET,
      rows=rows,
      with_idk=losses.needs_idk_batch(loss_config, "forget") and bool(idk),
    ),
    data_lib.BatchStream(
      retain,
      batching,
      stream_id=data_lib.RETAIN,
      rows=rows,
      with_idk=losses.needs_idk_batch(loss_config, "retain") and bool(idk),
    ),
  )


def finetune(
  model: FunctionalModel,
  params: Any,
  stream: data_lib.BatchStream,
  steps: int,
  learning_rate: float,
  desc: str = "finetune",
) -> Any:
  """Plain NLL training on one stream (makes the target model and the retain oracle)."""
  tx = optax.adamw(
    optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(steps // 10, 1), steps, learning_rate * 0.1
    ),
    weight_decay=0.0,
  )
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(
      lambda p: losses.gd_loss(model.logits(p, batch.input_ids, batch.attention_mask), batch)
    )(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  progress = tqdm(range(steps), desc=desc, leave=False, mininterval=1.0)
  for _ in progress:
    qa = next(stream)
    batch = losses.LMBatch(
      jnp.asarray(qa.answers.input_ids),
      jnp.asarray(qa.answers.attention_mask),
      jnp.asarray(qa.answers.labels),
    )
    params, opt_state, loss = train_step(params, opt_state, batch)
    progress.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
  return params


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


def evaluate_params(
  config: RunConfig,
  model: FunctionalModel,
  params: Any,
  tokenizer: Any,
  data_dir: str,
  out_dir: pathlib.Path,
  retain_reference: str | None = None,
) -> dict[str, Any]:
  """Evaluates ``params`` on the TOFU-format sets of ``data_dir``; writes the JSON files."""
  scoring = ScoringAdapter(model, params, tokenizer.eos_token_id, tokenizer.pad_token_id)
  eval_sets = tofu_eval_sets(
    data_dir, forget_split=config.data.forget_split, task_id=config.data.task_id
  )
  result = evaluate(
    scoring,
    tokenizer,
    eval_sets,
    template=config.data.template,
    config=EvalConfig(
      batch_size=config.eval.batch_size,
      max_new_tokens=config.eval.max_new_tokens,
      max_length=config.data.max_length + config.eval.max_new_tokens,
      max_items=config.eval.max_items,
      show_progress=False,
    ),
    retain_reference=retain_reference,
  )
  out_dir.mkdir(parents=True, exist_ok=True)
  result.write(out_dir)
  return json.loads((out_dir / "tofu_eval_summary.json").read_text())
