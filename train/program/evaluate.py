"""The evaluation stage: TOFU metrics and the DualOptim+ paper's terms of a set of
parameters, written as JSON."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from train.config import RunConfig
from train.data.prompting import PromptEncoder
from train.data.splits import find_idk_file, load_idk_answers
from train.evaluation import EvalConfig, PaperModels, evaluate, tofu_eval_sets
from train.program.modeling import FunctionalModel, ScoringAdapter


def paper_models(config: RunConfig, data_dir: str) -> PaperModels:
  """The paper's optional models: the sentence encoder of ``eval.embedding_model`` (none
  when null) and the IDK answers found next to the data (none when absent), drawn per item
  with a fixed seed so every run of a comparison meets the same ones. No NLI model exists
  here, so the entailment terms are always named missing."""
  encoder = name = None
  if config.eval.embedding_model is not None:
    from models.bert import load_sentence_encoder  # noqa: PLC0415 (only when configured)

    encoder = load_sentence_encoder(config.eval.embedding_model)
    name = os.path.basename(os.path.normpath(config.eval.embedding_model))
  idk_path = find_idk_file(data_dir)
  idk = () if idk_path is None else load_idk_answers(idk_path)
  return PaperModels(
    sentence_encoder=encoder, sentence_encoder_name=name, idk_answers=idk, idk_source=idk_path
  )


def eval_config(config: RunConfig) -> EvalConfig:
  """The evaluator's settings of a run (``config.eval``), without progress bars."""
  return EvalConfig(
    batch_size=config.eval.batch_size,
    max_new_tokens=config.eval.max_new_tokens,
    max_length=config.eval.max_length,
    max_items=config.eval.max_items,
    show_progress=False,
    answer_boundary=config.eval.answer_boundary,
  )


def evaluate_params(
  config: RunConfig,
  model: FunctionalModel,
  params: Any,
  tokenizer: Any,
  data_dir: str,
  out_dir: pathlib.Path,
  retain_reference: str | None = None,
  paper: PaperModels | None = None,
) -> dict[str, Any]:
  """Evaluates ``params`` on the TOFU-format sets of ``data_dir``; writes the JSON files.

  ``retain_reference`` (forget quality's reference file) defaults to
  ``config.eval.retain_reference``. ``paper`` (:func:`paper_models`) may be passed to reuse
  a loaded sentence encoder across evaluations; ``None`` loads it here.
  """
  if retain_reference is None:
    retain_reference = config.eval.retain_reference
  # A chat template's turn ends with its own token (Phi-3's <|end|> is not its EOS).
  encoder = PromptEncoder.create(config.data.template, tokenizer, config.eval.answer_boundary)
  scoring = ScoringAdapter(model, params, encoder.stop_token_ids, tokenizer.pad_token_id)
  eval_sets = tofu_eval_sets(
    data_dir, forget_split=config.data.forget_split, task_id=config.data.task_id
  )
  result = evaluate(
    scoring,
    tokenizer,
    eval_sets,
    template=config.data.template,
    config=eval_config(config),
    retain_reference=retain_reference,
    paper=paper if paper is not None else paper_models(config, data_dir),
  )
  out_dir.mkdir(parents=True, exist_ok=True)
  result.write(out_dir)
  return json.loads((out_dir / "tofu_eval_summary.json").read_text())
