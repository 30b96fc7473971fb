"""The core of an unlearning run: the optimizer, the pure training step, the bridge to the
model, and the program's stages (fine-tuning, unlearning, evaluation)."""

from train.program.evaluate import evaluate_params
from train.program.finetune import finetune
from train.program.optimizer import adam_preconditioner, make_optimizer, optimizer_diagnostics_fn
from train.program.streams import load_splits, make_streams, prepare_data
from train.program.unlearn import UnlearnResult, unlearn

__all__ = [
  "UnlearnResult",
  "adam_preconditioner",
  "evaluate_params",
  "finetune",
  "load_splits",
  "make_optimizer",
  "make_streams",
  "optimizer_diagnostics_fn",
  "prepare_data",
  "unlearn",
]
