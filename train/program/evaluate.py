"""The evaluation stage: TOFU metrics of a set of parameters, written as JSON."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from train.config import RunConfig
from train.data.prompting import PromptEncoder
from train.evaluation import EvalConfig, evaluate, tofu_eval_sets
from train.program.modeling import FunctionalModel, ScoringAdapter


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
  # A chat template's turn ends with its own token (Phi-3's <|end|> is not its EOS).
  stop_ids = PromptEncoder.create(config.data.template, tokenizer).stop_token_ids
  scoring = ScoringAdapter(model, params, stop_ids, tokenizer.pad_token_id)
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
