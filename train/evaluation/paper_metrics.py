"""The DualOptim+ paper's evaluation terms and aggregates, as its authors' code computes them.

The definitions follow ``metrics/metrics.py`` of the authors' repository (CityU-MLO
DualOptimPlus: ``compute_token_entropy``, ``eval_cosine_similarity``,
``get_entailment_results`` and ``get_eval_results``):

* token entropy of a generation: the tokens of ``tokenizer.tokenize(text)`` (the evaluated
  model's tokenizer), their unigram frequencies ``p``, ``−Σ p log2 p / log2(#tokens)``; 0
  for at most one token. Low values mean repetitive (degenerate) text.
* cosine similarity: ``max(0, cos(embed(generation), embed(reference)))`` with a sentence
  encoder (the authors: paraphrase-MiniLM-L6-v2). The reference is the true answer on the
  forget / retain sets and the long-form ``original_answer`` on real authors / world facts.
* entailment: an NLI model's label for (premise, hypothesis) pairs; premise = generation and
  hypothesis = reference on the forget set, the reverse elsewhere; the label is ``"none"``
  where the generation's ROUGE-L recall against the true answer is below 0.1. The score is
  the fraction of ``"entailment"`` labels. No NLI model ships here, so it is pluggable
  (:class:`EntailmentModel`) and absent by default.
* IDK (targeted unlearning): forget-set generations against a refusal answer drawn per item
  from the IDK answers: IDK ROUGE-L recall and IDK entailment (premise = generation).
* per set (Retain, Real Authors, Real World = world facts, Forget) six metrics: ROUGE,
  Probability (normalized over the options on real authors / world facts), Truth Ratio
  (forget: ``1 − mean min(R, 1/R)``; others: ``mean max(0, 1 − R)``), Token Entropy, Cosine
  Similarity, Entailment Score; on the forget set also IDK Token Entropy (= Token Entropy)
  and IDK Entailment Score.
* Model Utility: harmonic mean of the 18 non-forget metrics; Model Utility Retain: of the 6
  retain metrics; Untargeted Forget Efficacy: 1 − mean of the 5 forget metrics other than
  token entropy; Targeted Forget Efficacy: harmonic mean of forget (IDK) token entropy and
  forget IDK entailment score.

Each aggregate here is computed from the terms that are available and names the missing
ones (e.g. entailment without an NLI model), so a partial evaluation says what it lacks.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from train.evaluation import metrics

PAPER_SET_LABELS: dict[str, str] = {
  "retain": "Retain",
  "real_authors": "Real Authors",
  "world_facts": "Real World",
  "forget": "Forget",
}
"""The authors' name of each role's set (their ``eval_task_dict``)."""
PAPER_SET_METRICS: tuple[str, ...] = (
  "ROUGE",
  "Probability",
  "Truth Ratio",
  "Token Entropy",
  "Cosine Similarity",
  "Entailment Score",
)
FORGET_IDK_METRICS: tuple[str, ...] = ("IDK Token Entropy", "IDK Entailment Score")
ENTAILMENT = "entailment"
NO_ENTAILMENT_LABEL = "none"
ROUGE_FLOOR = 0.1
"""Below this ROUGE-L recall a generation is taken as factually wrong (label ``"none"``)."""
AUTHORS_SENTENCE_ENCODER = "paraphrase-MiniLM-L6-v2"
AUTHORS_NLI_MODEL = "deberta-v3-base-tasksource-nli"


def token_entropy(tokenizer: Any, text: str, normalize: bool = True) -> float:
  """The unigram entropy (bits) of ``tokenizer.tokenize(text)`` over log2(#tokens).

  0 when the text has at most one token; ``normalize=False`` gives the entropy in bits.
  """
  tokens = tokenizer.tokenize(text)
  if len(tokens) <= 1:
    return 0.0
  counts = np.array(list(collections.Counter(tokens).values()), np.float64)
  p = counts / counts.sum()
  entropy = float(-np.sum(p * np.log2(p)))
  return entropy / math.log2(len(tokens)) if normalize else entropy


def token_entropies(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
  """:func:`token_entropy` (normalized) of each text."""
  return np.array([token_entropy(tokenizer, t) for t in texts], np.float64)


class SentenceEncoder(Protocol):
  """A sentence encoder: ``encode(texts) -> [len(texts), dim]`` embeddings (e.g.
  ``models.bert.load_sentence_encoder``'s all-MiniLM-L6-v2)."""

  def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def cosine_similarities(
  encoder: SentenceEncoder, generations: Sequence[str], references: Sequence[str]
) -> np.ndarray:
  """``max(0, cos(embed(generation), embed(reference)))`` per pair.

  Embeddings are L2-normalized here (an encoder need not do it); a zero embedding gives 0.
  """
  if len(generations) != len(references):
    raise ValueError(f"{len(generations)} generations but {len(references)} references")
  if not generations:
    return np.zeros(0, np.float64)
  embedded = np.asarray(encoder.encode([*generations, *references]), np.float64)
  if embedded.ndim != 2 or embedded.shape[0] != 2 * len(generations):
    raise ValueError(
      f"encoder.encode returned shape {embedded.shape} for {2 * len(generations)} texts"
    )
  norms = np.linalg.norm(embedded, axis=1, keepdims=True)
  unit = embedded / np.where(norms == 0, 1.0, norms)
  n = len(generations)
  return np.clip(np.sum(unit[:n] * unit[n:], axis=1), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class CosineSimilarity:
  """The paper's cosine similarity as a pluggable generation term
  (:class:`~train.evaluation.evaluator.GenerationScorer`): generation against the answer."""

  encoder: SentenceEncoder
  name: str = "cosine_similarity"

  def __call__(
    self, generations: Sequence[str], answers: Sequence[str], questions: Sequence[str]
  ) -> np.ndarray:
    del questions
    return cosine_similarities(self.encoder, generations, answers)


class EntailmentModel(Protocol):
  """An NLI classifier: one label (``"entailment"``, ``"neutral"``, ``"contradiction"``)
  per (premise, hypothesis) pair, like the authors' text-classification pipeline called on
  ``{"text": premise, "text_pair": hypothesis}``."""

  def __call__(self, premises: Sequence[str], hypotheses: Sequence[str]) -> Sequence[str]: ...


def entailment_labels(
  nli: EntailmentModel,
  generations: Sequence[str],
  references: Sequence[str],
  rouge_recalls: Sequence[float],
  *,
  generation_is_premise: bool,
) -> tuple[str, ...]:
  """The NLI label of each generation / reference pair, ``"none"`` where the generation's
  ROUGE-L recall is below :data:`ROUGE_FLOOR`.

  Args:
    generation_is_premise: The forget set's direction (does the generation entail the
      answer?); ``False`` asks whether the reference entails the generation.
  """
  if not len(generations) == len(references) == len(rouge_recalls):
    raise ValueError(
      f"{len(generations)} generations, {len(references)} references and "
      f"{len(rouge_recalls)} ROUGE values"
    )
  pairs = (generations, references) if generation_is_premise else (references, generations)
  labels = [str(label) for label in nli(list(pairs[0]), list(pairs[1]))]
  if len(labels) != len(generations):
    raise ValueError(f"the NLI model returned {len(labels)} labels for {len(generations)} pairs")
  return tuple(
    NO_ENTAILMENT_LABEL if rouge < ROUGE_FLOOR else label
    for label, rouge in zip(labels, rouge_recalls)
  )


def entailment_score(labels: Sequence[str]) -> float:
  """The fraction of ``"entailment"`` labels."""
  if not labels:
    raise ValueError("entailment score of no label")
  return sum(label == ENTAILMENT for label in labels) / len(labels)


def idk_choices(num_items: int, num_answers: int, seed: int) -> np.ndarray:
  """Which IDK answer each item is compared with: uniform draws from a seeded generator (the
  authors draw from torch's global generator, which their loop reseeds irregularly)."""
  if num_answers < 1:
    raise ValueError("no IDK answer to choose from")
  return np.random.default_rng(seed).integers(0, num_answers, size=num_items)


@dataclasses.dataclass(frozen=True)
class PaperModels:
  """What the paper's model-based terms need; each absent one leaves its terms missing.

  Attributes:
    sentence_encoder: For the cosine similarity (``None``: not computed).
    sentence_encoder_name: Recorded in the summary (the authors used
      :data:`AUTHORS_SENTENCE_ENCODER`).
    nli: For the entailment scores (``None``: not computed).
    nli_name: Recorded in the summary (the authors used :data:`AUTHORS_NLI_MODEL`).
    idk_answers: Refusal answers for the forget set's IDK ROUGE / entailment.
    idk_source: Where they come from (recorded).
    idk_seed: Seed of :func:`idk_choices`.
  """

  sentence_encoder: SentenceEncoder | None = None
  sentence_encoder_name: str | None = None
  nli: EntailmentModel | None = None
  nli_name: str | None = None
  idk_answers: tuple[str, ...] = ()
  idk_source: str | None = None
  idk_seed: int = 0

  def describe(self) -> dict[str, Any]:
    """The models used, as JSON, with what the authors used for comparison."""
    return {
      "token_entropy_tokenizer": "the evaluated model's tokenizer (tokenizer.tokenize)",
      "sentence_encoder": None if self.sentence_encoder is None else self.sentence_encoder_name,
      "sentence_encoder_of_the_authors": AUTHORS_SENTENCE_ENCODER,
      "nli_model": None if self.nli is None else self.nli_name,
      "nli_model_of_the_authors": AUTHORS_NLI_MODEL,
      "idk_answers": self.idk_source if self.idk_answers else None,
      "num_idk_answers": len(self.idk_answers),
      "idk_seed": self.idk_seed,
    }


@dataclasses.dataclass(frozen=True)
class PaperItemValues:
  """One set's per-item values of the paper's generation terms (``None``: not computed).

  Attributes:
    token_entropy: Normalized token entropy of each generation.
    reference: Which answer the cosine similarity and entailment compare with
      (``"answer"`` or ``"original_answer"``).
    cosine_similarity: Clipped cosine of generation and reference.
    entailment_labels: NLI labels (``"none"`` below the ROUGE floor).
    idk_answers: The refusal answer of each item (forget set only).
    idk_rouge_l_recall: ROUGE-L recall of each generation against its refusal answer.
    idk_entailment_labels: NLI labels of generation (premise) vs refusal answer.
  """

  token_entropy: np.ndarray
  reference: str
  cosine_similarity: np.ndarray | None = None
  entailment_labels: tuple[str, ...] | None = None
  idk_answers: tuple[str, ...] | None = None
  idk_rouge_l_recall: np.ndarray | None = None
  idk_entailment_labels: tuple[str, ...] | None = None

  def summary(self, role: str) -> dict[str, Any]:
    """Set means (the forget set always has the IDK keys, ``None`` when not computed)."""
    out: dict[str, Any] = {
      "token_entropy": float(np.mean(self.token_entropy)),
      "cosine_similarity": _mean(self.cosine_similarity),
      "entailment_score": _score(self.entailment_labels),
      "paper_reference_answer": self.reference,
    }
    if role == "forget":
      out["idk_rouge_l_recall"] = _mean(self.idk_rouge_l_recall)
      out["idk_entailment_score"] = _score(self.idk_entailment_labels)
    return out

  def item_json(self, k: int) -> dict[str, Any]:
    """Item ``k``'s values (keys of terms not computed are left out)."""
    row: dict[str, Any] = {"token_entropy": float(self.token_entropy[k])}
    for key, values in (
      ("cosine_similarity", self.cosine_similarity),
      ("entailment_label", self.entailment_labels),
      ("idk_answer", self.idk_answers),
      ("idk_rouge_l_recall", self.idk_rouge_l_recall),
      ("idk_entailment_label", self.idk_entailment_labels),
    ):
      if values is not None:
        value = values[k]
        row[key] = float(value) if isinstance(value, (float, np.floating)) else value
    return row


def _mean(values: np.ndarray | None) -> float | None:
  return None if values is None else float(np.mean(values))


def _score(labels: Sequence[str] | None) -> float | None:
  return None if labels is None else entailment_score(labels)


def _references(
  role: str, answers: Sequence[str], long_answers: Sequence[str | None]
) -> tuple[list[str], str]:
  """The authors' reference of each item: ``original_answer`` on real authors / world
  facts (the true answer where a row has none), else the answer."""
  if role in ("real_authors", "world_facts"):
    missing = sum(a is None for a in long_answers)
    refs = [a if long is None else long for a, long in zip(answers, long_answers)]
    return refs, "original_answer" + (f" (answer for {missing} rows without one)" * bool(missing))
  return list(answers), "answer"


def _idk_values(
  models: PaperModels, generations: Sequence[str]
) -> tuple[tuple[str, ...] | None, np.ndarray | None, tuple[str, ...] | None]:
  """The forget set's refusal answers, IDK ROUGE-L recalls and IDK entailment labels."""
  if not models.idk_answers:
    return None, None, None
  chosen = idk_choices(len(generations), len(models.idk_answers), models.idk_seed)
  idk = tuple(models.idk_answers[i] for i in chosen)
  rouge = metrics.rouge_l_recall(generations, idk)
  labels = None
  if models.nli is not None:
    labels = entailment_labels(models.nli, generations, idk, rouge, generation_is_premise=True)
  return idk, rouge, labels


def paper_item_values(
  role: str,
  tokenizer: Any,
  generations: Sequence[str],
  answers: Sequence[str],
  long_answers: Sequence[str | None],
  rouge: Sequence[float],
  models: PaperModels,
) -> PaperItemValues:
  """The paper's per-item generation terms of one set.

  Args:
    role: The set's role (decides the reference answer and the entailment direction).
    tokenizer: The evaluated model's tokenizer (token entropy).
    generations: The greedy generations, as decoded.
    answers: The true answers (ROUGE's reference).
    long_answers: Each row's ``original_answer`` (``None`` where absent).
    rouge: ROUGE-L recall of each generation against its answer (entailment's floor).
    models: The encoder, NLI model and IDK answers (each optional).
  """
  references, reference = _references(role, answers, long_answers)
  cosine = labels = None
  if models.sentence_encoder is not None:
    cosine = cosine_similarities(models.sentence_encoder, generations, references)
  if models.nli is not None:
    labels = entailment_labels(
      models.nli, generations, references, rouge, generation_is_premise=role == "forget"
    )
  idk = (None, None, None) if role != "forget" else _idk_values(models, generations)
  return PaperItemValues(token_entropies(tokenizer, generations), reference, cosine, labels, *idk)


def paper_set_metrics(role: str, scores: Mapping[str, Any]) -> dict[str, float | None]:
  """One set's metrics under the authors' names (``"Retain ROUGE"``, ...; ``None`` if not
  computed) from its summary (:meth:`~train.evaluation.evaluator.SetResult.summary`)."""
  label = PAPER_SET_LABELS[role]
  truth = scores["truth_ratio"]
  values = {
    "ROUGE": scores.get("rouge_l_recall"),
    "Probability": scores["probability"],
    # Our forget score is mean min(R, 1/R); the authors' forget term is 1 minus it.
    "Truth Ratio": (1.0 - truth) if role == "forget" else truth,
    "Token Entropy": scores.get("token_entropy"),
    "Cosine Similarity": scores.get("cosine_similarity"),
    "Entailment Score": scores.get("entailment_score"),
  }
  if role == "forget":
    values["IDK Token Entropy"] = scores.get("token_entropy")
    values["IDK Entailment Score"] = scores.get("idk_entailment_score")
  return {f"{label} {name}": value for name, value in values.items()}


def _one_minus_mean(values: Sequence[float]) -> float:
  return 1.0 - float(np.mean(values))


_AGGREGATES: tuple[tuple[str, Callable[[str], bool], Callable[..., float], str], ...] = (
  (
    "paper_model_utility",
    lambda key: not key.startswith("Forget "),
    metrics.harmonic_mean,
    "harmonic mean of the 18 {Retain, Real Authors, Real World} x {ROUGE, Probability, "
    "Truth Ratio, Token Entropy, Cosine Similarity, Entailment Score} terms (0 if any is 0)",
  ),
  (
    "paper_model_utility_retain",
    lambda key: key.startswith("Retain "),
    metrics.harmonic_mean,
    "harmonic mean of the 6 Retain terms",
  ),
  (
    "paper_untargeted_forget_efficacy",
    lambda key: key.startswith("Forget ") and "IDK" not in key and "Entropy" not in key,
    _one_minus_mean,
    "1 - mean of Forget {ROUGE, Probability, Truth Ratio (1 - mean min(R, 1/R)), Cosine "
    "Similarity, Entailment Score}",
  ),
  (
    "paper_targeted_forget_efficacy",
    lambda key: key.startswith("Forget IDK "),
    metrics.harmonic_mean,
    "harmonic mean of Forget IDK Token Entropy (= Forget Token Entropy) and Forget IDK "
    "Entailment Score (generation entails the refusal answer)",
  ),
)


def paper_aggregates(paper_metrics: Mapping[str, float | None]) -> dict[str, Any]:
  """The paper's four aggregates from :func:`paper_set_metrics` of every set.

  For each aggregate ``key``: ``key`` (``None`` when no term is available), ``key_terms``
  (the values used), ``key_missing`` (terms not computed, or whose set was not evaluated)
  and ``key_definition``.
  """
  expected = [
    f"{PAPER_SET_LABELS[role]} {name}"
    for role in ("retain", "real_authors", "world_facts", "forget")
    for name in (*PAPER_SET_METRICS, *(FORGET_IDK_METRICS if role == "forget" else ()))
  ]
  out: dict[str, Any] = {}
  for key, selects, combine, definition in _AGGREGATES:
    names = [name for name in expected if selects(name)]
    terms = {n: paper_metrics[n] for n in names if paper_metrics.get(n) is not None}
    out[key] = combine(list(terms.values())) if terms else None
    out[f"{key}_terms"] = terms
    out[f"{key}_missing"] = [n for n in names if n not in terms]
    out[f"{key}_definition"] = definition
  return out
