"""The TOFU metrics and the DualOptim+ aggregates, as plain functions of per-item numbers.

Definitions follow open-unlearning (locuslab) and, for the aggregates, the DualOptim /
"closer look at machine unlearning" authors' evaluation code. ℓ̄ is the mean NLL of an
answer's tokens given the question and p̃ = exp(−ℓ̄).

* probability: p̃(answer) on forget / retain sets; on real-authors / world-facts sets the
  normalized p̃(a) / (p̃(a) + Σ_j p̃(perturbed_j)).
* ROUGE-L recall of the greedy generation against the answer (``rouge_score``, stemmer).
* truth ratio per item: R = exp(−mean_j ℓ̄(perturbed_j)) / exp(−ℓ̄(base)), where the base is
  the paraphrased answer (forget / retain) or the true answer (real authors / world facts).
  Set score: mean min(R, 1/R) on the forget set (1 = the model cannot tell true from false,
  like a model that never saw the data), mean max(0, 1 − R) elsewhere (1 = prefers truth).
* forget quality: p-value of the two-sample KS test between the forget-set R values of the
  evaluated model and of a retain-only model.
* model utility: harmonic mean of the nine {retain, real authors, world facts} ×
  {probability, ROUGE-L, truth ratio} scores (0 if any is 0).
* forget efficacy: 1 − mean of the forget-set "knowledge" scores: probability, ROUGE-L,
  and 1 − (forget truth-ratio score), plus any pluggable extra terms. ``1 − min(R, 1/R)`` is
  how the authors' code turns the forget truth ratio into a knowledge score (high = the
  model still prefers the true answer or shows it strongly). The paper's untargeted forget
  efficacy adds embedding cosine similarity and NLI entailment
  (:mod:`train.evaluation.paper_metrics`, which also has the paper's 18-term model utility).
* ranking score: (forget efficacy + model utility) / 2.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import scipy.stats
from rouge_score import rouge_scorer


def probability(nll: np.ndarray) -> np.ndarray:
  """p̃ = exp(−ℓ̄) per item."""
  return np.exp(-np.asarray(nll, np.float64))


def normalized_probability(nll_answer: np.ndarray, nll_perturbed: np.ndarray) -> np.ndarray:
  """p̃(a) / (p̃(a) + Σ_j p̃(perturbed_j)) per item.

  Args:
    nll_answer: ``[N]`` mean NLL of the true answers.
    nll_perturbed: ``[N, K]`` mean NLL of the perturbed answers.
  """
  nll_answer = np.asarray(nll_answer, np.float64)
  nll_perturbed = np.asarray(nll_perturbed, np.float64)
  # Divide through by p̃(a): 1 / (1 + Σ_j exp(ℓ̄(a) − ℓ̄_j)), stable for small probabilities.
  return 1.0 / (1.0 + np.sum(np.exp(nll_answer[:, None] - nll_perturbed), axis=-1))


def truth_ratio(nll_base: np.ndarray, nll_perturbed: np.ndarray) -> np.ndarray:
  """R = exp(−mean_j ℓ̄(perturbed_j)) / exp(−ℓ̄(base)) per item.

  Args:
    nll_base: ``[N]`` mean NLL of the paraphrased (or true) answers.
    nll_perturbed: ``[N, K]`` mean NLL of the perturbed answers.
  """
  nll_perturbed = np.asarray(nll_perturbed, np.float64)
  return np.exp(np.asarray(nll_base, np.float64) - nll_perturbed.mean(axis=-1))


def forget_truth_ratio_score(ratios: np.ndarray) -> float:
  """mean min(R, 1/R): 1 when true and false answers are equally likely."""
  log_r = np.log(np.asarray(ratios, np.float64))
  return float(np.mean(np.exp(-np.abs(log_r))))


def truth_preference_score(ratios: np.ndarray) -> float:
  """mean max(0, 1 − R): the truth-ratio score of retain / real-authors / world-facts sets."""
  return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, np.float64))))


@functools.cache
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(generations: Sequence[str], references: Sequence[str]) -> np.ndarray:
  """ROUGE-L recall (stemmed) of each generation against its reference answer."""
  if len(generations) != len(references):
    raise ValueError(f"{len(generations)} generations but {len(references)} references")
  scorer = _rouge_l_scorer()
  return np.array(
    [scorer.score(ref, gen)["rougeL"].recall for gen, ref in zip(generations, references)],
    np.float64,
  )


def forget_quality(truth_ratios: np.ndarray, retain_model_truth_ratios: np.ndarray) -> float:
  """p-value of the two-sample KS test between two models' forget-set truth ratios (R).

  Raises:
    ValueError: Either sample is empty or holds a non-finite value.
  """
  a = np.asarray(truth_ratios, np.float64)
  b = np.asarray(retain_model_truth_ratios, np.float64)
  for name, x in (("truth_ratios", a), ("retain_model_truth_ratios", b)):
    if x.size == 0 or not np.all(np.isfinite(x)):
      raise ValueError(
        f"{name} must be a non-empty finite array, got {x.size} values "
        f"({int(np.sum(~np.isfinite(x)))} non-finite)"
      )
  return float(scipy.stats.ks_2samp(a, b).pvalue)


def harmonic_mean(values: Sequence[float]) -> float:
  """Harmonic mean of non-negative values; 0 if any value is 0.

  Raises:
    ValueError: No value, or a negative or non-finite one.
  """
  x = np.asarray(values, np.float64)
  if x.size == 0 or np.any(x < 0) or not np.all(np.isfinite(x)):
    raise ValueError(f"harmonic mean needs non-negative finite values, got {x.tolist()}")
  if np.any(x == 0):
    return 0.0
  return float(x.size / np.sum(1.0 / x))


def model_utility(scores: dict[str, float]) -> float:
  """Harmonic mean of the nine utility scores, given by name (e.g. ``"retain.probability"``)."""
  return harmonic_mean(list(scores.values()))


def forget_efficacy(knowledge_scores: dict[str, float]) -> float:
  """1 − mean of the forget-set knowledge scores (each in [0, 1], high = still known)."""
  if not knowledge_scores:
    raise ValueError("forget efficacy needs at least one forget-set score")
  return 1.0 - float(np.mean(list(knowledge_scores.values())))


def ranking_score(forget_efficacy_value: float, model_utility_value: float) -> float:
  """(forget efficacy + model utility) / 2."""
  return (forget_efficacy_value + model_utility_value) / 2.0
