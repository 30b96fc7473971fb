"""The evaluation summary: per-set scores, every aggregate with its definition, the table.

Two families of aggregates, both always written:

* TOFU / open-unlearning (``forget_quality``, the 9-term ``model_utility``) and this
  project's ``forget_efficacy`` and ``ranking_score`` (see :mod:`train.evaluation.metrics`);
* the DualOptim+ paper's, as its authors' ``get_eval_results`` computes them
  (``paper_metrics`` under their names and ``paper_model_utility``,
  ``paper_model_utility_retain``, ``paper_untargeted_forget_efficacy``,
  ``paper_targeted_forget_efficacy``; see :mod:`train.evaluation.paper_metrics`).

Every aggregate ``key`` has ``key_definition``; the paper's also ``key_terms`` and
``key_missing`` (terms that could not be computed here, e.g. entailment without an NLI
model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from train.evaluation import metrics, paper_metrics, reference

SUMMARY_FORMAT = "dualoptax.tofu_eval_summary/2"
UTILITY_ROLES: tuple[str, ...] = ("retain", "real_authors", "world_facts")
UTILITY_METRICS: tuple[str, ...] = ("probability", "rouge_l_recall", "truth_ratio")
PAPER_ONLY_FORGET_TERMS: tuple[str, ...] = ("cosine_similarity", "entailment_score")
"""Terms of the paper's forget efficacy that ``forget_efficacy`` leaves out unless they are
plugged in as forget-efficacy terms (``paper_untargeted_forget_efficacy`` has them)."""

DEFINITIONS = {
  "forget_quality": "p-value of the two-sample KS test between the forget-set truth ratios "
  "R = p(perturbed)/p(paraphrased) of this model and of a retain-only model (TOFU)",
  "model_utility": "harmonic mean of the 9 {retain, real_authors, world_facts} x "
  "{probability, rouge_l_recall, truth_ratio} scores (TOFU / open-unlearning; 0 if any is 0)",
  "forget_efficacy": "1 - mean of forget.probability, forget.rouge_l_recall and "
  "1 - forget.truth_ratio (1 - mean min(R, 1/R)), plus any plugged-in forget-efficacy term",
  "ranking_score": "(forget_efficacy + model_utility) / 2",
}

PROTOCOL_NOTES = (
  "truth ratio R = exp(-mean_j nll(perturbed_j)) / exp(-nll(paraphrased)) per item, nll the "
  "mean over scored answer tokens (+ end token); real authors / world facts use the true "
  "answer instead of the paraphrase, as the authors' base_answer_key",
  "scored sequences are cut to eval.max_length tokens, then the end token is appended "
  "(open-unlearning); the authors' TOFU code caps at generation.max_length (256 for "
  "phi-1.5) and then loses the end token",
  "generation: greedy, eval.max_new_tokens new tokens, stopped at EOS / end of turn, "
  "batches sorted by prompt length (the authors: batches of 100 in file order, "
  "max_length=256 counting the left-padded prompt); generations are decoded without "
  "stripping (as the authors) for ROUGE, token entropy, cosine and entailment",
  "IDK answers: one per forget item from a seeded generator (the authors draw from torch's "
  "global generator without a fixed seed)",
  "the authors' phi-1.5 prompt is '<|user|>\\n{question}<|end|>\\n<|assistant|>\\n' (our "
  "'phi3-chat' preset), and their labels start at len(tokenize(prompt)) (the "
  "'open-unlearning' boundary), which equals 'answer' there since the prompt ends in a "
  "newline",
  "cosine similarity: sentence encoder as recorded in paper_models (the authors: "
  "paraphrase-MiniLM-L6-v2); entailment needs an NLI model (the authors: "
  "deberta-v3-base-tasksource-nli) and is missing without one",
)


def _only_set_of_role(results: Mapping[str, Any], role: str, notes: list[str]) -> Any | None:
  matches = [r for r in results.values() if r.spec.role == role]
  if len(matches) != 1:
    notes.append(f"{len(matches)} sets with role {role!r} (need exactly 1)")
    return None
  return matches[0]


def _reference_ratios(
  retain_reference: str | os.PathLike[str] | np.ndarray,
  answer_boundary: str | None,
  template: dict[str, Any] | None,
  tokenizer: dict[str, Any] | None,
  notes: list[str],
) -> tuple[str, np.ndarray, str | None]:
  """The reference's name, its truth ratios and its convention, checked against ours."""
  if not isinstance(retain_reference, (str, os.PathLike)):
    notes.append("forget quality against an array: its answer boundary and template are unknown")
    return "array", np.asarray(retain_reference, np.float64), None
  name = os.fspath(retain_reference)
  ref = reference.load_forget_reference(name)
  reference.check_reference(
    ref, name, answer_boundary=answer_boundary, template=template, tokenizer=tokenizer
  )
  if ref.template is None:
    notes.append(f"forget-quality reference {name} records no template (not checked)")
  if ref.tokenizer is not None and tokenizer is not None and ref.tokenizer != tokenizer:
    notes.append(f"forget-quality reference tokenizer {ref.tokenizer} recorded as {tokenizer}")
  return name, ref.ratios, ref.answer_boundary


def forget_quality_fields(
  forget: Any | None,
  retain_reference: str | os.PathLike[str] | np.ndarray | None,
  notes: list[str],
  *,
  answer_boundary: str | None = None,
  template: dict[str, Any] | None = None,
  tokenizer: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The summary's forget-quality fields (``None`` without a forget set or a reference).

  Raises:
    ValueError: The reference file was measured with another answer boundary or template.
  """
  quality = name = num_reference = boundary = None
  if retain_reference is None:
    notes.append("forget quality needs a retain model's per-item file (retain_reference)")
  elif forget is not None:
    name, ratios, boundary = _reference_ratios(
      retain_reference, answer_boundary, template, tokenizer, notes
    )
    num_reference = int(ratios.size)
    quality = metrics.forget_quality(forget.truth_ratio, ratios)
    if ratios.size != forget.truth_ratio.size:
      notes.append(
        f"forget quality compares {forget.truth_ratio.size} items with {ratios.size} "
        "reference items"
      )
  return {
    "forget_quality": quality,
    "forget_quality_definition": DEFINITIONS["forget_quality"],
    "forget_quality_reference": name,
    "forget_quality_reference_answer_boundary": boundary,
    "forget_quality_num_reference_items": num_reference,
  }


def _model_utility(results: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
  """TOFU's model utility: the harmonic mean of every utility set's metrics (``None``
  unless each utility role has one set and ROUGE-L was computed)."""
  terms: dict[str, float] = {}
  utility = None
  utility_sets = [_only_set_of_role(results, role, notes) for role in UTILITY_ROLES]
  if all(s is not None for s in utility_sets):
    for s in utility_sets:
      scores = s.summary()
      for metric in UTILITY_METRICS:
        if scores[metric] is not None:
          terms[f"{s.spec.role}.{metric}"] = scores[metric]
    if len(terms) == len(UTILITY_ROLES) * len(UTILITY_METRICS):
      utility = metrics.model_utility(terms)
    else:
      notes.append("model utility needs ROUGE-L (EvalConfig(generate=True))")
  return {
    "model_utility": utility,
    "model_utility_definition": DEFINITIONS["model_utility"],
    "model_utility_terms": terms,
  }


def _forget_efficacy(forget: Any | None) -> dict[str, Any]:
  """This project's forget efficacy (``None`` without a forget set)."""
  terms: dict[str, float] = {}
  efficacy = None
  if forget is not None:
    scores = forget.summary()
    terms["forget.probability"] = scores["probability"]
    if scores["rouge_l_recall"] is not None:
      terms["forget.rouge_l_recall"] = scores["rouge_l_recall"]
    terms["1 - forget.truth_ratio"] = 1.0 - scores["truth_ratio"]
    terms.update({f"forget.{name}": scores[name] for name in forget.extra})
    efficacy = metrics.forget_efficacy(terms)
  return {
    "forget_efficacy": efficacy,
    "forget_efficacy_definition": DEFINITIONS["forget_efficacy"],
    "forget_efficacy_terms": terms,
    "forget_efficacy_terms_not_used": [
      t for t in PAPER_ONLY_FORGET_TERMS if forget is None or t not in forget.extra
    ],
  }


def paper_fields(results: Mapping[str, Any], paper_models: Any | None) -> dict[str, Any]:
  """``paper_metrics`` (the authors' per-set names; ``None`` where not computed) and the
  paper's four aggregates with their terms, missing terms and definitions."""
  values: dict[str, float | None] = {}
  for r in results.values():
    if r.spec.role in paper_metrics.PAPER_SET_LABELS:
      values.update(paper_metrics.paper_set_metrics(r.spec.role, r.summary()))
  out: dict[str, Any] = {"paper_metrics": values}
  out.update(paper_metrics.paper_aggregates(values))
  out["paper_models"] = (paper_models or paper_metrics.PaperModels()).describe()
  return out


def summarize(
  results: Mapping[str, Any],
  *,
  retain_reference: str | os.PathLike[str] | np.ndarray | None = None,
  config: dict[str, Any] | None = None,
  template: dict[str, Any] | None = None,
  tokenizer: dict[str, Any] | None = None,
  answer_boundary: str | None = None,
  paper_models: Any | None = None,
) -> dict[str, Any]:
  """The summary JSON object: per-set scores and both families of aggregates.

  Args:
    results: :class:`~train.evaluation.evaluator.SetResult` by set name.
    retain_reference: For forget quality (a per-item file, or truth ratios).
    config, template, tokenizer: Recorded as given (JSON objects).
    answer_boundary: The convention (recorded; a reference file must match it).
    paper_models: The :class:`~train.evaluation.paper_metrics.PaperModels` used.
  """
  notes: list[str] = []
  summary: dict[str, Any] = {
    "format": SUMMARY_FORMAT,
    "answer_boundary": answer_boundary,
    "template": template,
    "tokenizer": tokenizer,
    "sets": {name: r.summary() for name, r in results.items()},
  }
  forget = _only_set_of_role(results, "forget", notes)
  summary.update(
    forget_quality_fields(
      forget,
      retain_reference,
      notes,
      answer_boundary=answer_boundary,
      template=template,
      tokenizer=tokenizer,
    )
  )
  summary.update(_model_utility(results, notes))
  summary.update(_forget_efficacy(forget))
  efficacy, utility = summary["forget_efficacy"], summary["model_utility"]
  summary["ranking_score"] = (
    None if efficacy is None or utility is None else metrics.ranking_score(efficacy, utility)
  )
  summary["ranking_score_definition"] = DEFINITIONS["ranking_score"]
  summary.update(paper_fields(results, paper_models))
  summary["protocol_notes"] = list(PROTOCOL_NOTES)
  summary["notes"] = notes
  summary["config"] = config
  return summary


def _fmt(x: float | None) -> str:
  return "–" if x is None else f"{x:.4f}"


def _set_rows(summary: Mapping[str, Any]) -> list[str]:
  lines = [
    "| set | items | probability | ROUGE-L recall | truth ratio | token entropy | cosine "
    "| entailment |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, s in summary["sets"].items():
    lines.append(
      f"| {name} ({s['truth_ratio_definition']}) | {s['num_items']} | {_fmt(s['probability'])} "
      f"| {_fmt(s['rouge_l_recall'])} | {_fmt(s['truth_ratio'])} "
      f"| {_fmt(s.get('token_entropy'))} | {_fmt(s.get('cosine_similarity'))} "
      f"| {_fmt(s.get('entailment_score'))} |"
    )
  return lines


def _paper_rows(summary: Mapping[str, Any]) -> list[str]:
  lines = []
  for key, label in (
    ("paper_model_utility", "Model Utility"),
    ("paper_model_utility_retain", "Model Utility Retain"),
    ("paper_untargeted_forget_efficacy", "Untargeted Forget Efficacy"),
    ("paper_targeted_forget_efficacy", "Targeted Forget Efficacy"),
  ):
    if key not in summary:
      continue
    missing = summary[f"{key}_missing"]
    used = f"{len(summary[f'{key}_terms'])} terms" + (
      f"; missing: {', '.join(missing)}" if missing else ""
    )
    lines.append(
      f"| paper {label}: {summary[f'{key}_definition']} ({used}) | {_fmt(summary[key])} |"
    )
  return lines


def markdown_table(summary: Mapping[str, Any]) -> str:
  """A Markdown report of a summary (:attr:`EvaluationResult.summary` or its saved JSON)."""
  efficacy_terms = ", ".join(summary["forget_efficacy_terms"]) or "none"
  lines = [
    *_set_rows(summary),
    "",
    "| aggregate | value |",
    "|---|---:|",
    f"| forget quality (KS p-value vs retain model) | {_fmt(summary['forget_quality'])} |",
    f"| model utility (harmonic mean of {len(summary['model_utility_terms'])}) | "
    f"{_fmt(summary['model_utility'])} |",
    f"| forget efficacy (1 − mean of: {efficacy_terms}) | {_fmt(summary['forget_efficacy'])} |",
    f"| (forget efficacy + model utility) / 2 | {_fmt(summary['ranking_score'])} |",
    *_paper_rows(summary),
  ]
  if summary.get("answer_boundary"):
    lines += ["", f"Answer boundary: {summary['answer_boundary']}."]
  if summary.get("notes"):
    lines += ["", *[f"- {note}" for note in summary["notes"]]]
  return "\n".join(lines) + "\n"
