"""The core of an unlearning run: the optimizer, the pure training step, the bridge to the
model, and the program's stages (fine-tuning, unlearning, evaluation)."""

from train.program.stages import (
  UnlearnResult,
  adam_preconditioner,
  evaluate_params,
  finetune,
  make_optimizer,
  make_streams,
  optimizer_diagnostics_fn,
  unlearn,
)

__all__ = [
  "UnlearnResult",
  "adam_preconditioner",
  "evaluate_params",
  "finetune",
  "make_optimizer",
  "make_streams",
  "optimizer_diagnostics_fn",
  "unlearn",
]
