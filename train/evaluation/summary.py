"""The evaluation summary: per-set scores, every aggregate with its definition, the table.

Two families of aggregates, both always written:

* TOFU / open-unlearning (``forget_quality``, the 9-term ``model_utility``) and this
  project's ``forget_efficacy`` and ``ranking_score`` (see :mod:`train.evaluation.metrics`);
  model utility takes every non-forget set present (TOFU's three give its 9 terms; other
  scenarios, e.g. real-world unlearning, bring their own sets) and names them in
  ``model_utility_sets``, with ``model_utility_missing`` for TOFU roles without a set and
  terms not computed;
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
"""TOFU's utility sets: one of each gives its 9-term model utility."""
UTILITY_SET_ROLES: tuple[str, ...] = (*UTILITY_ROLES, "utility")
"""Every role whose sets count in model utility (all but forget)."""
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


def _utility_prefix(role: str, name: str, counts: Mapping[str, int]) -> str:
  """A term's set label: TOFU's role name for its one set of a TOFU role (its keys stay
  ``retain.probability``...), ``role:name`` otherwise (unambiguous)."""
  return role if role in UTILITY_ROLES and counts[role] == 1 else f"{role}:{name}"


def _utility_definition(sets: Mapping[str, str], num_terms: int) -> str:
  """TOFU's definition for its three sets, else one naming the sets present."""
  if sorted(sets.values()) == sorted(UTILITY_ROLES):
    return DEFINITIONS["model_utility"]
  names = ", ".join(f"{name} ({role})" for name, role in sets.items())
  return (
    f"harmonic mean of the {num_terms} {{{names}}} x {{probability, rouge_l_recall, "
    "truth_ratio}} scores of the non-forget sets present (0 if any is 0; TOFU's has 9: "
    "{retain, real_authors, world_facts})"
  )


def _model_utility(results: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
  """Model utility from the non-forget sets present: the harmonic mean of each one's
  probability, ROUGE-L and truth ratio (TOFU's 9 terms with its three sets). ``None``
  without such a set or without ROUGE-L; the sets used and what is missing are named."""
  present = [r for r in results.values() if r.spec.role in UTILITY_SET_ROLES]
  counts = {role: sum(r.spec.role == role for r in present) for role in UTILITY_SET_ROLES}
  missing = [f"{role} (no set)" for role in UTILITY_ROLES if not counts[role]]
  terms: dict[str, float] = {}
  for r in present:
    prefix, scores = _utility_prefix(r.spec.role, r.spec.name, counts), r.summary()
    for metric in UTILITY_METRICS:
      if scores[metric] is None:
        missing.append(f"{prefix}.{metric}")
      else:
        terms[f"{prefix}.{metric}"] = scores[metric]
  utility = None
  if not present:
    notes.append(
      f"model utility needs a set with a role among {list(UTILITY_SET_ROLES)}; "
      f"none of {list(UTILITY_ROLES)} has one"
    )
  elif len(terms) < len(present) * len(UTILITY_METRICS):
    notes.append("model utility needs ROUGE-L (EvalConfig(generate=True))")
  else:
    utility = metrics.model_utility(terms)
  sets = {r.spec.name: r.spec.role for r in present}
  return {
    "model_utility": utility,
    "model_utility_definition": _utility_definition(sets, len(present) * len(UTILITY_METRICS)),
    "model_utility_terms": terms,
    "model_utility_sets": sets,
    "model_utility_missing": missing,
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


def _utility_set_metrics(name: str, scores: Mapping[str, Any]) -> dict[str, float | None]:
  """A ``utility`` set's paper metrics, as world facts' but labelled ``Utility <name>``."""
  label = paper_metrics.PAPER_SET_LABELS["world_facts"]
  values = paper_metrics.paper_set_metrics("world_facts", scores)
  return {f"Utility {name}{key[len(label) :]}": v for key, v in values.items()}


def _add_utility_terms(out: dict[str, Any], extra: Mapping[str, float | None]) -> None:
  """Folds the ``utility`` sets' metrics into the paper's model utility, as the authors'
  ``get_eval_results`` counts every non-forget metric it was given."""
  key = "paper_model_utility"
  out[f"{key}_terms"].update({k: v for k, v in extra.items() if v is not None})
  out[f"{key}_missing"] += [k for k, v in extra.items() if v is None]
  terms = list(out[f"{key}_terms"].values())
  out[key] = metrics.harmonic_mean(terms) if terms else None
  out[f"{key}_definition"] += "; plus the 6 terms of each utility set (Utility <set> ...)"


def paper_fields(results: Mapping[str, Any], paper_models: Any | None) -> dict[str, Any]:
  """``paper_metrics`` (the authors' per-set names; ``None`` where not computed) and the
  paper's four aggregates with their terms, missing terms and definitions; each aggregate
  takes the sets present (``paper_model_utility_sets`` names the non-forget ones)."""
  values: dict[str, float | None] = {}
  extra: dict[str, float | None] = {}
  for r in results.values():
    if r.spec.role in paper_metrics.PAPER_SET_LABELS:
      values.update(paper_metrics.paper_set_metrics(r.spec.role, r.summary()))
    elif r.spec.role == "utility":
      extra.update(_utility_set_metrics(r.spec.name, r.summary()))
  out: dict[str, Any] = {"paper_metrics": {**values, **extra}}
  out.update(paper_metrics.paper_aggregates(values))
  if extra:
    _add_utility_terms(out, extra)
  out["paper_model_utility_sets"] = {
    r.spec.name: r.spec.role for r in results.values() if r.spec.role in UTILITY_SET_ROLES
  }
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
