"""The TOFU evaluator: any model, any TOFU-format files, per-item and summary outputs.

Typical use::

    from train import evaluation as ev
    sets = ev.tofu_eval_sets("/data/tofu", forget_split="forget01", task_id=1)
    result = ev.evaluate(logits_fn_or_scoring_model, tokenizer, sets, template="phi",
                         retain_reference="retain_model/tofu_eval_items.json")
    result.write("out/")                 # tofu_eval_items.json, tofu_eval_summary.json, .md
    print(result.markdown_table())

See :mod:`train.evaluation.metrics` for the definitions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import numpy as np
from transformers import PreTrainedTokenizerBase

from train.data import tofu
from train.data.prompting import PromptEncoder, Template
from train.evaluation import metrics
from train.evaluation.scoring import ScoringModel, as_scoring_model, generate_greedy, score_answers

Role = Literal["forget", "retain", "real_authors", "world_facts"]
ROLES: tuple[str, ...] = ("forget", "retain", "real_authors", "world_facts")
"""What a set is for. forget / retain sets score the paraphrased answer in the truth ratio;
real_authors / world_facts sets score the true answer against its perturbed options."""
_PARAPHRASE_ROLES = ("forget", "retain")
UTILITY_ROLES: tuple[str, ...] = ("retain", "real_authors", "world_facts")
UTILITY_METRICS: tuple[str, ...] = ("probability", "rouge_l_recall", "truth_ratio")
PAPER_ONLY_FORGET_TERMS: tuple[str, ...] = ("cosine_similarity", "entailment_score")
"""Forget-efficacy terms of the DualOptim+ paper that need hub models (pluggable here)."""

ITEMS_FILE, SUMMARY_FILE, TABLE_FILE = (
  "tofu_eval_items.json",
  "tofu_eval_summary.json",
  "tofu_eval_summary.md",
)
ITEMS_FORMAT, SUMMARY_FORMAT = "dualoptax.tofu_eval_items/1", "dualoptax.tofu_eval_summary/1"


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
  """One evaluation file.

  Attributes:
    name: Key of the set in the outputs (unique within one evaluation).
    path: The TOFU-format JSON-lines file.
    role: One of :data:`ROLES`; decides the required keys and the metric definitions.
    task_id: Keep only rows with this ``task_id`` (forget files); ``None`` keeps all.
  """

  name: str
  path: str
  role: Role
  task_id: int | None = None

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"role of set {self.name!r} must be one of {ROLES}, got {self.role!r}")


def tofu_eval_sets(
  data_dir: str | os.PathLike[str], *, forget_split: str = "forget01", task_id: int | None = 1
) -> tuple[EvalSetSpec, ...]:
  """The standard four TOFU evaluation sets in a data folder.

  Args:
    data_dir: Folder with ``<forget_split>_perturbed.json``, ``retain_perturbed.json``,
      ``real_authors_perturbed.json`` and ``world_facts_perturbed.json``.
    forget_split: ``"forget01"``, ``"forget05"`` or ``"forget10"``.
    task_id: Which forget set of that size (1 is the standard one); ``None`` for all rows.
  """
  d = os.fspath(data_dir)
  return (
    EvalSetSpec("forget", os.path.join(d, f"{forget_split}_perturbed.json"), "forget", task_id),
    EvalSetSpec("retain", os.path.join(d, "retain_perturbed.json"), "retain"),
    EvalSetSpec("real_authors", os.path.join(d, "real_authors_perturbed.json"), "real_authors"),
    EvalSetSpec("world_facts", os.path.join(d, "world_facts_perturbed.json"), "world_facts"),
  )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How to evaluate.

  Attributes:
    batch_size: Rows per scoring / generation batch (fixed, to limit recompiles).
    max_new_tokens: Greedy generation length for ROUGE (TOFU uses up to 200).
    max_length: Scored sequences (prompt + answer + EOS) are cut to this many tokens.
    length_multiple: Padded lengths are multiples of this (fewer distinct shapes).
    append_eos: Score the EOS token after each answer, as TOFU does.
    max_items: Evaluate at most this many items per set (quick runs); ``None`` for all.
    generate: Generate answers and compute ROUGE-L; without it ROUGE and model utility are
      missing and forget efficacy uses probability and truth ratio only.
    show_progress: Show tqdm progress bars.
  """

  batch_size: int = 16
  max_new_tokens: int = 200
  max_length: int = 512
  length_multiple: int = 32
  append_eos: bool = True
  max_items: int | None = None
  generate: bool = True
  show_progress: bool = True

  def __post_init__(self):
    for name in ("batch_size", "max_length", "length_multiple"):
      if getattr(self, name) < 1:
        raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.max_new_tokens < 0:
      raise ValueError(f"EvalConfig.max_new_tokens must be >= 0, got {self.max_new_tokens}")
    if self.max_items is not None and self.max_items < 0:
      raise ValueError(f"EvalConfig.max_items must be >= 0 or None, got {self.max_items}")


class GenerationScorer(Protocol):
  """A pluggable per-item forget-efficacy term computed from the generations.

  E.g. the paper's cosine similarity (sentence-embedding cosine of generation and answer,
  clipped at 0) or entailment score (1 if an NLI model says the generation entails the
  answer). Scores must lie in [0, 1], high meaning the model still knows the answer.
  """

  name: str

  def __call__(
    self, generations: Sequence[str], answers: Sequence[str], questions: Sequence[str]
  ) -> Sequence[float]: ...


@dataclasses.dataclass(frozen=True)
class SetResult:
  """Per-item results of one set (arrays are in item order).

  Attributes:
    spec: The set.
    items: The evaluated items.
    nll_answer: Mean NLL of the true answer.
    nll_paraphrased: Mean NLL of the paraphrased answer (forget / retain), else ``None``.
    nll_perturbed: Mean NLL of each perturbed answer, one array per item.
    probability: p̃(answer), or the normalized probability on real authors / world facts.
    truth_ratio: The raw truth ratio R.
    generations: Greedy generations (``None`` when not generating).
    rouge_l_recall: ROUGE-L recall of the generations (``None`` when not generating).
    extra: Per-item values of the pluggable terms, by name.
  """

  spec: EvalSetSpec
  items: tuple[tofu.TofuItem, ...]
  nll_answer: np.ndarray
  nll_paraphrased: np.ndarray | None
  nll_perturbed: tuple[np.ndarray, ...]
  probability: np.ndarray
  truth_ratio: np.ndarray
  generations: tuple[str, ...] | None
  rouge_l_recall: np.ndarray | None
  extra: dict[str, np.ndarray]

  @property
  def truth_ratio_score(self) -> float:
    """mean min(R, 1/R) on a forget set, mean max(0, 1 − R) elsewhere."""
    if self.spec.role == "forget":
      return metrics.forget_truth_ratio_score(self.truth_ratio)
    return metrics.truth_preference_score(self.truth_ratio)

  def summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {
      "role": self.spec.role,
      "file": self.spec.path,
      "task_id": self.spec.task_id,
      "num_items": len(self.items),
      "probability": float(np.mean(self.probability)),
      "rouge_l_recall": None
      if self.rouge_l_recall is None
      else float(np.mean(self.rouge_l_recall)),
      "truth_ratio": self.truth_ratio_score,
      "truth_ratio_definition": "mean min(R, 1/R)"
      if self.spec.role == "forget"
      else "mean max(0, 1 - R)",
    }
    out.update({name: float(np.mean(v)) for name, v in self.extra.items()})
    return out

  def items_json(self) -> list[dict[str, Any]]:
    rows = []
    for k, item in enumerate(self.items):
      row: dict[str, Any] = {
        "index": item.index,
        "line_number": item.line_number,
        "task_id": item.task_id,
        "question": item.question,
        "answer": item.answer,
        "generation": None if self.generations is None else self.generations[k],
        "probability": float(self.probability[k]),
        "truth_ratio": float(self.truth_ratio[k]),
        "rouge_l_recall": None if self.rouge_l_recall is None else float(self.rouge_l_recall[k]),
        "nll_answer": float(self.nll_answer[k]),
        "nll_paraphrased": None if self.nll_paraphrased is None else float(self.nll_paraphrased[k]),
        "nll_perturbed": [float(x) for x in self.nll_perturbed[k]],
      }
      row.update({name: float(v[k]) for name, v in self.extra.items()})
      rows.append(row)
    return rows


def _required_keys(role: str) -> tuple[str, ...]:
  return tofu.PARAPHRASE_KEYS if role in _PARAPHRASE_ROLES else tofu.OPTION_KEYS


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  if pad_id is None:
    raise ValueError(
      "the tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token"
    )
  return pad_id


def _prompt_encoder(
  template: str | Template | PromptEncoder, tokenizer: PreTrainedTokenizerBase
) -> PromptEncoder:
  if isinstance(template, PromptEncoder):
    if template.tokenizer is not tokenizer:
      raise ValueError("the PromptEncoder was made with another tokenizer than the one given")
    return template
  return PromptEncoder.create(template, tokenizer)


def _load_items(spec: EvalSetSpec, config: EvalConfig) -> tuple[tofu.TofuItem, ...]:
  items = tuple(
    tofu.load_tofu(
      spec.path,
      required_keys=_required_keys(spec.role),
      task_id=spec.task_id,
      max_items=config.max_items,
    )
  )
  if not items:
    raise ValueError(f"set {spec.name!r} has no item to evaluate (max_items={config.max_items})")
  return items


def _scored_answers(item: tofu.TofuItem, paraphrase_based: bool) -> list[str]:
  """An item's answers to score, in order: true, paraphrased (forget / retain), perturbed."""
  return [
    item.answer,
    *([item.paraphrased_answer] if paraphrase_based else []),
    *item.perturbed_answers,
  ]


def _answer_nlls(
  model: ScoringModel,
  encoder: PromptEncoder,
  spec: EvalSetSpec,
  items: Sequence[tofu.TofuItem],
  prompts: Sequence[str],
  config: EvalConfig,
  pad_id: int,
) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, ...]]:
  """Scores every answer of every item in one flat pass.

  Returns:
    The NLLs of the true answers, of the paraphrased ones (``None`` unless forget / retain)
    and of each item's perturbed answers.
  """
  paraphrase_based = spec.role in _PARAPHRASE_ROLES
  answers = [_scored_answers(item, paraphrase_based) for item in items]
  encoded = [
    encoder.encode_answer(
      prompts[k], text, append_eos=config.append_eos, max_length=config.max_length
    )
    for k, texts in enumerate(answers)
    for text in texts
  ]
  num_truncated = sum(e.truncated for e in encoded)
  if num_truncated:
    warnings.warn(
      f"set {spec.name!r}: {num_truncated} of {len(encoded)} scored sequences were cut to "
      f"max_length={config.max_length} tokens",
      stacklevel=3,  # the caller of evaluate_set
    )
  flat_nll = score_answers(
    model,
    encoded,
    pad_token_id=pad_id,
    batch_size=config.batch_size,
    length_multiple=config.length_multiple,
    progress_description=f"{spec.name}: scoring" if config.show_progress else None,
  )
  starts = np.cumsum([0] + [len(texts) for texts in answers])
  per_item = [flat_nll[start:end] for start, end in zip(starts[:-1], starts[1:])]
  num_true = 2 if paraphrase_based else 1  # answers before the perturbed ones
  return (
    np.array([nll[0] for nll in per_item]),
    np.array([nll[1] for nll in per_item]) if paraphrase_based else None,
    tuple(nll[num_true:] for nll in per_item),
  )


def _generations(
  model: ScoringModel,
  encoder: PromptEncoder,
  spec: EvalSetSpec,
  prompts: Sequence[str],
  config: EvalConfig,
  pad_id: int,
) -> tuple[str, ...]:
  """Greedy generations, cut at the template's end token or EOS, decoded and stripped."""
  new_tokens = generate_greedy(
    model,
    [encoder.encode_prompt(p) for p in prompts],
    max_new_tokens=config.max_new_tokens,
    eos_token_id=encoder.stop_token_ids,
    pad_token_id=pad_id,
    batch_size=config.batch_size,
    length_multiple=config.length_multiple,
    progress_description=f"{spec.name}: generating" if config.show_progress else None,
  )
  decode = encoder.tokenizer.decode
  return tuple(decode(t, skip_special_tokens=True).strip() for t in new_tokens)


def _extra_term_values(
  terms: Sequence[GenerationScorer], generations: Sequence[str], items: Sequence[tofu.TofuItem]
) -> dict[str, np.ndarray]:
  """Each pluggable term's per-item values, checked to be one value in [0, 1] per item."""
  answers = [item.answer for item in items]
  questions = [item.question for item in items]
  extra = {}
  for term in terms:
    values = np.asarray(term(generations, answers, questions), np.float64)
    if values.shape != (len(items),) or np.any(values < 0) or np.any(values > 1):
      raise ValueError(
        f"term {term.name!r} must return {len(items)} values in [0, 1], got shape "
        f"{values.shape} with range [{values.min(initial=0)}, {values.max(initial=0)}]"
      )
    extra[term.name] = values
  return extra


def evaluate_set(
  model: ScoringModel | Callable[..., Any],
  tokenizer: PreTrainedTokenizerBase,
  spec: EvalSetSpec,
  *,
  template: str | Template | PromptEncoder = "phi",
  config: EvalConfig = EvalConfig(),
  extra_terms: Sequence[GenerationScorer] = (),
) -> SetResult:
  """Scores and generates on one set (see :func:`evaluate`; ``template`` may also be a
  :class:`~train.data.prompting.PromptEncoder` made with ``tokenizer``)."""
  model = as_scoring_model(model)
  encoder = _prompt_encoder(template, tokenizer)
  pad_id = _pad_token_id(tokenizer)
  items = _load_items(spec, config)
  prompts = [encoder.prompt(item.question) for item in items]
  nll_answer, nll_paraphrased, nll_perturbed = _answer_nlls(
    model, encoder, spec, items, prompts, config, pad_id
  )
  # Real authors / world facts have no paraphrase: the truth ratio uses the true answer.
  nll_base = nll_answer if nll_paraphrased is None else nll_paraphrased
  ratios = np.array(
    [metrics.truth_ratio(nll_base[k : k + 1], p[None])[0] for k, p in enumerate(nll_perturbed)]
  )
  if nll_paraphrased is not None:
    prob = metrics.probability(nll_answer)
  else:
    prob = np.array(
      [
        metrics.normalized_probability(nll_answer[k : k + 1], p[None])[0]
        for k, p in enumerate(nll_perturbed)
      ]
    )

  generations = rouge = None
  extra: dict[str, np.ndarray] = {}
  if config.generate:
    generations = _generations(model, encoder, spec, prompts, config, pad_id)
    rouge = metrics.rouge_l_recall(generations, [item.answer for item in items])
    extra = _extra_term_values(extra_terms, generations, items)
  elif extra_terms:
    raise ValueError("forget-efficacy terms need generations; set EvalConfig(generate=True)")

  return SetResult(
    spec=spec,
    items=items,
    nll_answer=nll_answer,
    nll_paraphrased=nll_paraphrased,
    nll_perturbed=nll_perturbed,
    probability=prob,
    truth_ratio=ratios,
    generations=generations,
    rouge_l_recall=rouge,
    extra=extra,
  )


def load_forget_truth_ratios(
  path: str | os.PathLike[str], set_name: str | None = None
) -> np.ndarray:
  """The per-item forget-set truth ratios R saved by an earlier evaluation.

  Reads this evaluator's per-item file (:data:`ITEMS_FILE`; the set named ``set_name``, or
  its only forget set) or an open-unlearning ``TOFU_EVAL.json``
  (``forget_truth_ratio.value_by_index``).

  Raises:
    ValueError: The file has no (unique) forget set or no truth ratios.
  """
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if isinstance(data, dict) and "forget_truth_ratio" in data:
    by_index = data["forget_truth_ratio"]["value_by_index"]
    return np.array([by_index[k]["score"] for k in sorted(by_index, key=int)], np.float64)
  if not isinstance(data, dict) or "sets" not in data:
    raise ValueError(f"{path}: neither a {ITEMS_FORMAT} file nor an open-unlearning TOFU_EVAL.json")
  sets = data["sets"]
  if set_name is None:
    names = [n for n, s in sets.items() if s.get("role") == "forget"]
    if len(names) != 1:
      raise ValueError(f"{path}: expected one set with role 'forget', found {names}; pass set_name")
    set_name = names[0]
  if set_name not in sets:
    raise ValueError(f"{path}: no set {set_name!r}; sets: {sorted(sets)}")
  ratios = np.array([row["truth_ratio"] for row in sets[set_name]["items"]], np.float64)
  if ratios.size == 0:
    raise ValueError(f"{path}: set {set_name!r} has no item")
  return ratios


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
  """Everything one evaluation produced.

  Attributes:
    sets: Per-set results by name.
    summary: The summary JSON object (per-set scores and every aggregate).
  """

  sets: dict[str, SetResult]
  summary: dict[str, Any]

  def items_json(self) -> dict[str, Any]:
    """The per-item JSON object (every value for every item of every set)."""
    return {
      "format": ITEMS_FORMAT,
      "config": self.summary["config"],
      "template": self.summary["template"],
      "sets": {
        name: {
          "role": r.spec.role,
          "file": r.spec.path,
          "task_id": r.spec.task_id,
          "items": r.items_json(),
        }
        for name, r in self.sets.items()
      },
    }

  def markdown_table(self) -> str:
    return markdown_table(self.summary)

  def write(self, out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Writes the per-item JSON, the summary JSON and the Markdown table; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
      kind: os.path.join(out_dir, name)
      for kind, name in (("items", ITEMS_FILE), ("summary", SUMMARY_FILE), ("table", TABLE_FILE))
    }
    with open(paths["items"], "w", encoding="utf-8") as f:
      json.dump(self.items_json(), f, indent=1, ensure_ascii=False)
    with open(paths["summary"], "w", encoding="utf-8") as f:
      json.dump(self.summary, f, indent=2, ensure_ascii=False)
    with open(paths["table"], "w", encoding="utf-8") as f:
      f.write(self.markdown_table())
    return paths


def _only_set_of_role(
  results: dict[str, SetResult], role: str, notes: list[str]
) -> SetResult | None:
  matches = [r for r in results.values() if r.spec.role == role]
  if len(matches) != 1:
    notes.append(f"{len(matches)} sets with role {role!r} (need exactly 1)")
    return None
  return matches[0]


def _forget_quality(
  forget: SetResult | None,
  retain_reference: str | os.PathLike[str] | np.ndarray | None,
  notes: list[str],
) -> dict[str, Any]:
  """The summary's forget-quality fields (``None`` without a forget set or a reference)."""
  quality = reference_name = num_reference = None
  if retain_reference is None:
    notes.append("forget quality needs a retain model's per-item file (retain_reference)")
  elif forget is not None:
    if isinstance(retain_reference, (str, os.PathLike)):
      reference_name = os.fspath(retain_reference)
      reference = load_forget_truth_ratios(retain_reference)
    else:
      reference_name, reference = "array", np.asarray(retain_reference, np.float64)
    num_reference = int(reference.size)
    quality = metrics.forget_quality(forget.truth_ratio, reference)
    if reference.size != forget.truth_ratio.size:
      notes.append(
        f"forget quality compares {forget.truth_ratio.size} items with {reference.size} "
        "reference items"
      )
  return {
    "forget_quality": quality,
    "forget_quality_reference": reference_name,
    "forget_quality_num_reference_items": num_reference,
  }


def _model_utility(results: dict[str, SetResult], notes: list[str]) -> dict[str, Any]:
  """The summary's model-utility fields: the harmonic mean of every utility set's metrics
  (``None`` unless each utility role has one set and ROUGE-L was computed)."""
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
  return {"model_utility": utility, "model_utility_terms": terms}


def _forget_efficacy(forget: SetResult | None) -> dict[str, Any]:
  """The summary's forget-efficacy fields (``None`` without a forget set)."""
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
    "forget_efficacy_terms": terms,
    "forget_efficacy_terms_not_used": [
      t for t in PAPER_ONLY_FORGET_TERMS if forget is None or t not in forget.extra
    ],
  }


def summarize(
  results: dict[str, SetResult],
  *,
  retain_reference: str | os.PathLike[str] | np.ndarray | None = None,
  config: EvalConfig | None = None,
  template: Template | PromptEncoder | None = None,
) -> dict[str, Any]:
  """The summary JSON object: per-set scores and the aggregates (see :func:`evaluate`).

  ``template`` is recorded as its fields (an encoder's adds a chat template's end-of-turn
  token)."""
  notes: list[str] = []
  summary: dict[str, Any] = {
    "format": SUMMARY_FORMAT,
    "sets": {name: r.summary() for name, r in results.items()},
  }
  forget = _only_set_of_role(results, "forget", notes)
  summary.update(_forget_quality(forget, retain_reference, notes))
  summary.update(_model_utility(results, notes))
  summary.update(_forget_efficacy(forget))
  efficacy, utility = summary["forget_efficacy"], summary["model_utility"]
  summary["ranking_score"] = (
    None if efficacy is None or utility is None else metrics.ranking_score(efficacy, utility)
  )
  summary["notes"] = notes
  summary["config"] = None if config is None else dataclasses.asdict(config)
  if isinstance(template, PromptEncoder):
    summary["template"] = template.describe()
  else:
    summary["template"] = None if template is None else dataclasses.asdict(template)
  return summary


def evaluate(
  model: ScoringModel | Callable[..., Any],
  tokenizer: PreTrainedTokenizerBase,
  eval_sets: Sequence[EvalSetSpec],
  *,
  template: str | Template = "phi",
  config: EvalConfig = EvalConfig(),
  retain_reference: str | os.PathLike[str] | np.ndarray | None = None,
  forget_efficacy_terms: Sequence[GenerationScorer] = (),
) -> EvaluationResult:
  """Evaluates a model on TOFU-format sets.

  Args:
    model: A :class:`~train.evaluation.scoring.ScoringModel`, or a JAX-traceable
      ``logits_fn(input_ids, attention_mask) -> logits`` (wrapped in ``FunctionModel``).
    tokenizer: The model's Hugging Face tokenizer (needs an EOS token; pads with the pad
      token, else EOS).
    eval_sets: The sets (e.g. :func:`tofu_eval_sets`); names must be unique. The
      aggregates use the one set of each role.
    template: A :class:`~train.data.prompting.PromptTemplate` or preset name (``"plain"``,
      ``"phi"``, ``"llama2-chat"``, ``"phi3-chat"``), or a
      :class:`~train.data.prompting.ChatTemplate` or ``"chat"``: the tokenizer's chat
      template (answers end with its end-of-turn token; generations stop at it).
    config: Batch size, generation length, ``max_items`` cap, progress bars...
    retain_reference: For forget quality: a retain-only model's per-item file (or its
      forget-set truth ratios). Without it forget quality is ``None``.
    forget_efficacy_terms: Extra per-item forget-efficacy terms (e.g. the paper's cosine
      similarity and entailment); evaluated on the forget set only.

  Returns:
    The per-set results and the summary (``result.write(dir)`` saves everything).

  Raises:
    ValueError: Duplicate set names, or problems named in the message.
    tofu.TofuFormatError: A malformed data file (the message names file and line).
  """
  names = [s.name for s in eval_sets]
  if len(set(names)) != len(names):
    raise ValueError(f"set names must be unique, got {names}")
  encoder = PromptEncoder.create(template, tokenizer)
  model = as_scoring_model(model)
  results = {}
  for spec in eval_sets:
    results[spec.name] = evaluate_set(
      model,
      tokenizer,
      spec,
      template=encoder,
      config=config,
      extra_terms=forget_efficacy_terms if spec.role == "forget" else (),
    )
  summary = summarize(results, retain_reference=retain_reference, config=config, template=encoder)
  return EvaluationResult(sets=results, summary=summary)


def _fmt(x: float | None) -> str:
  return "–" if x is None else f"{x:.4f}"


def markdown_table(summary: dict[str, Any]) -> str:
  """A Markdown report of a summary (:attr:`EvaluationResult.summary` or its saved JSON)."""
  lines = [
    "| set | items | probability | ROUGE-L recall | truth ratio |",
    "|---|---:|---:|---:|---:|",
  ]
  for name, s in summary["sets"].items():
    lines.append(
      f"| {name} ({s['truth_ratio_definition']}) | {s['num_items']} | {_fmt(s['probability'])} | "
      f"{_fmt(s['rouge_l_recall'])} | {_fmt(s['truth_ratio'])} |"
    )
  efficacy_terms = ", ".join(summary["forget_efficacy_terms"]) or "none"
  lines += [
    "",
    "| aggregate | value |",
    "|---|---:|",
    f"| forget quality (KS p-value vs retain model) | {_fmt(summary['forget_quality'])} |",
    f"| model utility (harmonic mean of {len(summary['model_utility_terms'])}) | "
    f"{_fmt(summary['model_utility'])} |",
    f"| forget efficacy (1 − mean of: {efficacy_terms}) | {_fmt(summary['forget_efficacy'])} |",
    f"| (forget efficacy + model utility) / 2 | {_fmt(summary['ranking_score'])} |",
  ]
  if summary.get("notes"):
    lines += ["", *[f"- {note}" for note in summary["notes"]]]
  return "\n".join(lines) + "\n"
