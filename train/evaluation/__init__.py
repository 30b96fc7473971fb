"""TOFU evaluation for any model and any TOFU-format data.

* :mod:`~train.data.prompting`: prompt templates (presets or the tokenizer's chat template),
  answer tokenization and masking.
* :mod:`~train.evaluation.scoring`: the model interface and batched, jitted scoring and
  greedy generation.
* :mod:`~train.evaluation.metrics`: the metric definitions as plain functions.
* :mod:`~train.evaluation.evaluator`: :func:`evaluate`, the outputs and the Markdown table.
"""

from train.data.prompting import (
  CHAT_TEMPLATE_NAME,
  PROMPT_TEMPLATES,
  ChatTemplate,
  EncodedAnswer,
  PromptEncoder,
  PromptTemplate,
  Template,
  encode_answer,
  encode_prompt,
  get_prompt_template,
)
from train.evaluation.evaluator import (
  ITEMS_FILE,
  ROLES,
  SUMMARY_FILE,
  TABLE_FILE,
  EvalConfig,
  EvalSetSpec,
  EvaluationResult,
  GenerationScorer,
  SetResult,
  evaluate,
  evaluate_set,
  load_forget_truth_ratios,
  markdown_table,
  summarize,
  tofu_eval_sets,
)
from train.evaluation.metrics import (
  forget_efficacy,
  forget_quality,
  forget_truth_ratio_score,
  harmonic_mean,
  model_utility,
  normalized_probability,
  probability,
  ranking_score,
  rouge_l_recall,
  truth_preference_score,
  truth_ratio,
)
from train.evaluation.scoring import (
  FunctionModel,
  ScoringModel,
  as_scoring_model,
  generate_greedy,
  masked_mean_nll,
  score_answers,
)
