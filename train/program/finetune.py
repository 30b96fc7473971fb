"""Plain NLL fine-tuning on one stream: makes the target model and the retain oracle."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from train import data as data_lib
from train import losses
from train.program.modeling import FunctionalModel


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
