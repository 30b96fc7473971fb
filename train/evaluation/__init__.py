"""TOFU evaluation for any model and any TOFU-format data, with the DualOptim+ paper's terms.

* :mod:`~train.data.prompting`: prompt templates (presets or the tokenizer's chat template),
  answer tokenization, masking and the answer-boundary conventions.
* :mod:`~train.evaluation.scoring`: the model interface and batched, jitted scoring and
  greedy generation.
* :mod:`~train.evaluation.metrics`: the TOFU metric definitions as plain functions.
* :mod:`~train.evaluation.paper_metrics`: the paper's token entropy, cosine similarity,
  entailment and IDK terms and its aggregates (the authors' ``get_eval_results``).
* :mod:`~train.evaluation.reference`: the retain model's truth ratios for forget quality,
  refused when measured with another convention or template.
* :mod:`~train.evaluation.summary`: the summary JSON (every aggregate with its definition)
  and the Markdown table.
* :mod:`~train.evaluation.evaluator`: :func:`evaluate` and the per-item outputs.
"""

from train.data.prompting import (
  ANSWER_BOUNDARIES,
  CHAT_TEMPLATE_NAME,
  PROMPT_TEMPLATES,
  ChatTemplate,
  EncodedAnswer,
  PromptEncoder,
  PromptTemplate,
  Template,
  describe_tokenizer,
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
from train.evaluation.paper_metrics import (
  CosineSimilarity,
  EntailmentModel,
  PaperItemValues,
  PaperModels,
  SentenceEncoder,
  cosine_similarities,
  entailment_labels,
  entailment_score,
  paper_aggregates,
  paper_set_metrics,
  token_entropy,
)
from train.evaluation.reference import (
  ForgetReference,
  load_forget_reference,
  load_forget_truth_ratios,
)
from train.evaluation.scoring import (
  FunctionModel,
  ScoringModel,
  as_scoring_model,
  generate_greedy,
  masked_mean_nll,
  score_answers,
)
from train.evaluation.summary import markdown_table, summarize
