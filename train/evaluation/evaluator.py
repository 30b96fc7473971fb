"""The TOFU evaluator: any model, any TOFU-format files, per-item and summary outputs.

Typical use::

    from train import evaluation as ev
    sets = ev.tofu_eval_sets("/data/tofu", forget_split="forget01", task_id=1)
    result = ev.evaluate(logits_fn_or_scoring_model, tokenizer, sets, template="phi",
                         retain_reference="retain_model/tofu_eval_items.json")
    result.write("out/")                 # tofu_eval_items.json, tofu_eval_summary.json, .md
    print(result.markdown_table())

Besides TOFU's metrics it computes the DualOptim+ paper's generation terms (token entropy
always; cosine similarity, entailment and IDK terms with the models given in
:class:`~train.evaluation.paper_metrics.PaperModels`) and both families of aggregates
(:mod:`train.evaluation.summary`). Every output records the answer-boundary convention,
the template and the tokenizer; forget quality refuses a reference measured otherwise.

See :mod:`train.evaluation.metrics` and :mod:`train.evaluation.paper_metrics` for the
definitions.
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
from train.data.prompting import ANSWER_BOUNDARIES, EncodedAnswer, PromptEncoder, Template
from train.evaluation import metrics, paper_metrics, summary
from train.evaluation.reference import ITEMS_FORMAT as ITEMS_FORMAT
from train.evaluation.reference import load_forget_truth_ratios as load_forget_truth_ratios
from train.evaluation.scoring import ScoringModel, as_scoring_model, generate_texts, score_answers
from train.evaluation.summary import markdown_table as markdown_table
from train.evaluation.summary import summarize

Role = Literal["forget", "retain", "real_authors", "world_facts", "utility"]
ROLES: tuple[str, ...] = ("forget", "retain", "real_authors", "world_facts", "utility")
"""What a set is for. forget / retain sets score the paraphrased answer in the truth ratio;
real_authors / world_facts sets score the true answer against its perturbed options, and
so does ``utility``: any other real-knowledge control set (e.g. the real-world scenario's),
which enters model utility under its own name. Every set but the forget one counts in
model utility (:mod:`train.evaluation.summary`)."""
_PARAPHRASE_ROLES = ("forget", "retain")
TaskSelection = int | tuple[int, ...] | None

ITEMS_FILE, SUMMARY_FILE, TABLE_FILE = (
  "tofu_eval_items.json",
  "tofu_eval_summary.json",
  "tofu_eval_summary.md",
)
SUMMARY_FORMAT = summary.SUMMARY_FORMAT


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
  """One evaluation file.

  Attributes:
    name: Key of the set in the outputs (unique within one evaluation).
    path: The TOFU-format JSON-lines file.
    role: One of :data:`ROLES`; decides the required keys and the metric definitions.
    task_id: Keep only rows with this ``task_id`` (forget files), or with one of these
      (a tuple: several tasks, e.g. several people to forget at once); ``None`` keeps all.
    answer_key: The row key holding the answer that is scored, generated against (ROUGE)
      and compared in the paper's terms. ``"answer"`` is TOFU's; the real-world files
      train on ``answer`` (long chat answers) but are scored on ``golden_answer``.
  """

  name: str
  path: str
  role: Role
  task_id: TaskSelection = None
  answer_key: str = "answer"

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f"role of set {self.name!r} must be one of {ROLES}, got {self.role!r}")
    if not isinstance(self.answer_key, str) or not self.answer_key:
      raise ValueError(
        f"answer_key of set {self.name!r} must be a row key, got {self.answer_key!r}"
      )
    if isinstance(self.task_id, tuple) and not self.task_id:
      raise ValueError(f"task_id of set {self.name!r} is an empty tuple; use None for every row")


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
    max_length: The text's tokens (prompt + answer) are cut to this many, then the end
      token is appended and scored (open-unlearning's truncation).
    length_multiple: Padded lengths are multiples of this (fewer distinct shapes).
    append_eos: Score the EOS token after each answer, as TOFU does.
    max_items: Evaluate at most this many items per set (quick runs); ``None`` for all.
    generate: Generate answers and compute ROUGE-L; without it ROUGE and model utility are
      missing and forget efficacy uses probability and truth ratio only.
    show_progress: Show tqdm progress bars.
    answer_boundary: Which tokens are scored as the answer: ``"answer"`` (exactly the
      answer's) or ``"open-unlearning"`` (see :mod:`train.data.prompting`).
  """

  batch_size: int = 16
  max_new_tokens: int = 200
  max_length: int = 512
  length_multiple: int = 32
  append_eos: bool = True
  max_items: int | None = None
  generate: bool = True
  show_progress: bool = True
  answer_boundary: str = "answer"

  def __post_init__(self):
    for name in ("batch_size", "max_length", "length_multiple"):
      if getattr(self, name) < 1:
        raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.max_new_tokens < 0:
      raise ValueError(f"EvalConfig.max_new_tokens must be >= 0, got {self.max_new_tokens}")
    if self.max_items is not None and self.max_items < 0:
      raise ValueError(f"EvalConfig.max_items must be >= 0 or None, got {self.max_items}")
    if self.answer_boundary not in ANSWER_BOUNDARIES:
      raise ValueError(
        f"EvalConfig.answer_boundary must be one of {ANSWER_BOUNDARIES}, "
        f"got {self.answer_boundary!r}"
      )


class GenerationScorer(Protocol):
  """A pluggable per-item forget-efficacy term computed from the generations.

  E.g. the paper's cosine similarity (:class:`~train.evaluation.paper_metrics.CosineSimilarity`)
  or an entailment score. Scores must lie in [0, 1], high meaning the model still knows the
  answer.
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
    scored_tokens: Per item, the number of scored tokens (answer + end token) of each scored
      answer: true, paraphrased (forget / retain), then perturbed.
    truncated: Per item, whether each of those sequences was cut to ``max_length``.
    paper: The paper's generation terms (``None`` when not generating).
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
  scored_tokens: tuple[tuple[int, ...], ...] = ()
  truncated: tuple[tuple[bool, ...], ...] = ()
  paper: paper_metrics.PaperItemValues | None = None

  @property
  def truth_ratio_score(self) -> float:
    """mean min(R, 1/R) on a forget set, mean max(0, 1 − R) elsewhere."""
    if self.spec.role == "forget":
      return metrics.forget_truth_ratio_score(self.truth_ratio)
    return metrics.truth_preference_score(self.truth_ratio)

  def _builtin_summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {
      "role": self.spec.role,
      "file": self.spec.path,
      "task_id": _json_task(self.spec.task_id),
      "answer_key": self.spec.answer_key,
      "num_items": len(self.items),
      "probability": float(np.mean(self.probability)),
      "rouge_l_recall": None
      if self.rouge_l_recall is None
      else float(np.mean(self.rouge_l_recall)),
      "truth_ratio": self.truth_ratio_score,
      "truth_ratio_definition": "mean min(R, 1/R)"
      if self.spec.role == "forget"
      else "mean max(0, 1 - R)",
      "num_truncated_sequences": int(sum(sum(t) for t in self.truncated)),
    }
    if self.paper is not None:
      out.update(self.paper.summary(self.spec.role))
    return out

  def summary(self) -> dict[str, Any]:
    """Set means; a pluggable term fills a built-in key only where that is not computed."""
    out = self._builtin_summary()
    for name, values in self.extra.items():
      if out.get(name) is not None:
        raise ValueError(f"term {name!r} clashes with the built-in metric {name!r}")
      out[name] = float(np.mean(values))
    return out

  def _token_fields(self, k: int) -> dict[str, Any]:
    """Item ``k``'s scored-token counts and truncation flags."""
    if not self.scored_tokens:
      return {}
    tokens, cut = self.scored_tokens[k], self.truncated[k]
    num_true = 2 if self.nll_paraphrased is not None else 1
    return {
      "answer_tokens_scored": tokens[0],
      "answer_truncated": cut[0],
      "paraphrased_tokens_scored": tokens[1] if num_true == 2 else None,
      "perturbed_tokens_scored": list(tokens[num_true:]),
      "num_truncated_sequences": int(sum(cut)),
    }

  def items_json(self) -> list[dict[str, Any]]:
    rows = []
    for k, item in enumerate(self.items):
      row: dict[str, Any] = {
        "index": item.index,
        "line_number": item.line_number,
        "task_id": item.task_id,
        "question": item.question,
        "answer": item.answer,
        "original_answer": item.original_answer,
        "generation": None if self.generations is None else self.generations[k],
        "probability": float(self.probability[k]),
        "truth_ratio": float(self.truth_ratio[k]),
        "rouge_l_recall": None if self.rouge_l_recall is None else float(self.rouge_l_recall[k]),
        "nll_answer": float(self.nll_answer[k]),
        "nll_paraphrased": None if self.nll_paraphrased is None else float(self.nll_paraphrased[k]),
        "nll_perturbed": [float(x) for x in self.nll_perturbed[k]],
        **self._token_fields(k),
      }
      if self.paper is not None:
        row.update(self.paper.item_json(k))
      row.update({name: float(v[k]) for name, v in self.extra.items()})
      rows.append(row)
    return rows


def _json_task(task_id: TaskSelection) -> int | list[int] | None:
  return list(task_id) if isinstance(task_id, tuple) else task_id


def _required_keys(role: str) -> tuple[str, ...]:
  return tofu.PARAPHRASE_KEYS if role in _PARAPHRASE_ROLES else tofu.OPTION_KEYS


def _select_tasks(path: str, items: Sequence[tofu.TofuItem], task_ids: tuple[int, ...]) -> list:
  """The rows of any of ``task_ids`` (each must occur), in file order."""
  wanted = set(task_ids)
  for item in items:
    if item.task_id is None:
      raise tofu.TofuFormatError(
        path, item.line_number, f"task_id={list(task_ids)} was requested but the row has none"
      )
  kept = [item for item in items if item.task_id in wanted]
  absent = sorted(wanted - {item.task_id for item in kept})
  if absent:
    present = sorted({item.task_id for item in items})
    raise tofu.TofuFormatError(
      path, None, f"no row has task_id {absent}; the file has task ids {present}"
    )
  return kept


def _with_answer_key(spec: EvalSetSpec, items: Sequence[tofu.TofuItem]) -> list:
  """The items with ``answer`` taken from the row's ``spec.answer_key``."""
  rows = dict(tofu.iter_json_lines(spec.path))
  out = []
  for item in items:
    row = rows[item.line_number]
    value = row.get(spec.answer_key)
    if not isinstance(value, str):
      problem = "missing" if value is None else f"not a string ({type(value).__name__})"
      raise tofu.TofuFormatError(
        spec.path,
        item.line_number,
        f"{spec.answer_key!r} is {problem}: set {spec.name!r} scores answer_key="
        f"{spec.answer_key!r}; the row has {sorted(row)}",
      )
    out.append(dataclasses.replace(item, answer=value))
  return out


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  if pad_id is None:
    raise ValueError(
      "the tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token"
    )
  return pad_id


def _prompt_encoder(
  template: str | Template | PromptEncoder, tokenizer: PreTrainedTokenizerBase, boundary: str
) -> PromptEncoder:
  if isinstance(template, PromptEncoder):
    if template.tokenizer is not tokenizer:
      raise ValueError("the PromptEncoder was made with another tokenizer than the one given")
    if template.boundary != boundary:
      raise ValueError(
        f"the PromptEncoder uses answer boundary {template.boundary!r} but "
        f"EvalConfig.answer_boundary is {boundary!r}"
      )
    return template
  return PromptEncoder.create(template, tokenizer, boundary)


def _load_items(spec: EvalSetSpec, config: EvalConfig) -> tuple[tofu.TofuItem, ...]:
  several = isinstance(spec.task_id, tuple)
  items = tofu.load_tofu(
    spec.path,
    required_keys=_required_keys(spec.role),
    task_id=None if several else spec.task_id,
    max_items=None if several else config.max_items,
  )
  if several:
    items = _select_tasks(spec.path, items, spec.task_id)[: config.max_items]
  if spec.answer_key != "answer":
    items = _with_answer_key(spec, items)
  items = tuple(items)
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


@dataclasses.dataclass(frozen=True)
class _Scored:
  """Every scored answer of a set: NLLs, token counts and truncation flags, per item."""

  nll: tuple[np.ndarray, ...]
  tokens: tuple[tuple[int, ...], ...]
  truncated: tuple[tuple[bool, ...], ...]


def _encode_all(
  encoder: PromptEncoder,
  spec: EvalSetSpec,
  prompts: Sequence[str],
  answers: Sequence[Sequence[str]],
  config: EvalConfig,
) -> list[EncodedAnswer]:
  encoded = [
    encoder.encode_answer(
      prompts[k],
      text,
      append_eos=config.append_eos,
      max_length=config.max_length,
      end_after_cut=True,
    )
    for k, texts in enumerate(answers)
    for text in texts
  ]
  num_truncated = sum(e.truncated for e in encoded)
  if num_truncated:
    warnings.warn(
      f"set {spec.name!r}: {num_truncated} of {len(encoded)} scored sequences were cut to "
      f"max_length={config.max_length} tokens (the end token is still scored)",
      stacklevel=4,  # the caller of evaluate_set
    )
  return encoded


def _score_all(
  model: ScoringModel,
  encoder: PromptEncoder,
  spec: EvalSetSpec,
  items: Sequence[tofu.TofuItem],
  prompts: Sequence[str],
  config: EvalConfig,
  pad_id: int,
) -> _Scored:
  """Scores every answer of every item in one flat pass."""
  answers = [_scored_answers(item, spec.role in _PARAPHRASE_ROLES) for item in items]
  encoded = _encode_all(encoder, spec, prompts, answers, config)
  flat_nll = score_answers(
    model,
    encoded,
    pad_token_id=pad_id,
    batch_size=config.batch_size,
    length_multiple=config.length_multiple,
    progress_description=f"{spec.name}: scoring" if config.show_progress else None,
  )
  starts = np.cumsum([0] + [len(texts) for texts in answers])
  spans = list(zip(starts[:-1], starts[1:]))
  return _Scored(
    nll=tuple(flat_nll[a:b] for a, b in spans),
    tokens=tuple(tuple(e.num_answer_tokens for e in encoded[a:b]) for a, b in spans),
    truncated=tuple(tuple(e.truncated for e in encoded[a:b]) for a, b in spans),
  )


def _generations(
  model: ScoringModel,
  encoder: PromptEncoder,
  spec: EvalSetSpec,
  prompts: Sequence[str],
  config: EvalConfig,
  pad_id: int,
) -> tuple[str, ...]:
  """Greedy generations, cut at the template's end token or EOS and decoded without special
  tokens; not stripped (the authors' token entropy counts a leading space token)."""
  return tuple(
    generate_texts(
      model,
      encoder,
      prompts,
      max_new_tokens=config.max_new_tokens,
      pad_token_id=pad_id,
      batch_size=config.batch_size,
      length_multiple=config.length_multiple,
      progress_description=f"{spec.name}: generating" if config.show_progress else None,
    )
  )


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


def _probability_and_ratios(
  nll_answer: np.ndarray,
  nll_base: np.ndarray,
  nll_perturbed: Sequence[np.ndarray],
  normalized: bool,
) -> tuple[np.ndarray, np.ndarray]:
  """Per-item probability (normalized over the options when asked) and truth ratio R."""
  ratios = np.array(
    [metrics.truth_ratio(nll_base[k : k + 1], p[None])[0] for k, p in enumerate(nll_perturbed)]
  )
  if not normalized:
    return metrics.probability(nll_answer), ratios
  prob = np.array(
    [
      metrics.normalized_probability(nll_answer[k : k + 1], p[None])[0]
      for k, p in enumerate(nll_perturbed)
    ]
  )
  return prob, ratios


def _generation_terms(
  model: ScoringModel,
  encoder: PromptEncoder,
  spec: EvalSetSpec,
  items: Sequence[tofu.TofuItem],
  prompts: Sequence[str],
  config: EvalConfig,
  extra_terms: Sequence[GenerationScorer],
  paper: paper_metrics.PaperModels,
) -> dict[str, Any]:
  """The generations and every term computed from them (SetResult fields)."""
  generations = _generations(
    model, encoder, spec, prompts, config, _pad_token_id(encoder.tokenizer)
  )
  answers = [item.answer for item in items]
  rouge = metrics.rouge_l_recall(generations, answers)
  paper_values = paper_metrics.paper_item_values(
    # A utility set is compared like world facts (its original_answer, where it has one).
    "world_facts" if spec.role == "utility" else spec.role,
    encoder.tokenizer,
    generations,
    answers,
    [item.original_answer for item in items],
    rouge,
    paper,
  )
  return {
    "generations": generations,
    "rouge_l_recall": rouge,
    "extra": _extra_term_values(extra_terms, generations, items),
    "paper": paper_values,
  }


def evaluate_set(
  model: ScoringModel | Callable[..., Any],
  tokenizer: PreTrainedTokenizerBase,
  spec: EvalSetSpec,
  *,
  template: str | Template | PromptEncoder = "phi",
  config: EvalConfig = EvalConfig(),
  extra_terms: Sequence[GenerationScorer] = (),
  paper: paper_metrics.PaperModels | None = None,
) -> SetResult:
  """Scores and generates on one set (see :func:`evaluate`; ``template`` may also be a
  :class:`~train.data.prompting.PromptEncoder` made with ``tokenizer`` and the config's
  answer boundary)."""
  model = as_scoring_model(model)
  paper = paper or paper_metrics.PaperModels()
  encoder = _prompt_encoder(template, tokenizer, config.answer_boundary)
  pad_id = _pad_token_id(tokenizer)
  items = _load_items(spec, config)
  prompts = [encoder.prompt(item.question) for item in items]
  scored = _score_all(model, encoder, spec, items, prompts, config, pad_id)
  paraphrase_based = spec.role in _PARAPHRASE_ROLES
  nll_answer = np.array([nll[0] for nll in scored.nll])
  nll_paraphrased = np.array([nll[1] for nll in scored.nll]) if paraphrase_based else None
  nll_perturbed = tuple(nll[2 if paraphrase_based else 1 :] for nll in scored.nll)
  # Real authors / world facts have no paraphrase: the truth ratio uses the true answer.
  nll_base = nll_answer if nll_paraphrased is None else nll_paraphrased
  prob, ratios = _probability_and_ratios(
    nll_answer, nll_base, nll_perturbed, normalized=not paraphrase_based
  )
  generated: dict[str, Any] = {"generations": None, "rouge_l_recall": None, "extra": {}}
  if config.generate:
    generated = _generation_terms(model, encoder, spec, items, prompts, config, extra_terms, paper)
  elif extra_terms:
    raise ValueError("forget-efficacy terms need generations; set EvalConfig(generate=True)")
  result = SetResult(
    spec=spec,
    items=items,
    nll_answer=nll_answer,
    nll_paraphrased=nll_paraphrased,
    nll_perturbed=nll_perturbed,
    probability=prob,
    truth_ratio=ratios,
    scored_tokens=scored.tokens,
    truncated=scored.truncated,
    **generated,
  )
  result.summary()  # a pluggable term that clashes with a computed metric fails here
  return result


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
    """The per-item JSON object (every value for every item of every set), with the
    convention, template and tokenizer that forget quality checks."""
    return {
      "format": ITEMS_FORMAT,
      "answer_boundary": self.summary["answer_boundary"],
      "template": self.summary["template"],
      "tokenizer": self.summary["tokenizer"],
      "config": self.summary["config"],
      "sets": {
        name: {
          "role": r.spec.role,
          "file": r.spec.path,
          "task_id": _json_task(r.spec.task_id),
          "answer_key": r.spec.answer_key,
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


def evaluate(
  model: ScoringModel | Callable[..., Any],
  tokenizer: PreTrainedTokenizerBase,
  eval_sets: Sequence[EvalSetSpec],
  *,
  template: str | Template = "phi",
  config: EvalConfig = EvalConfig(),
  retain_reference: str | os.PathLike[str] | np.ndarray | None = None,
  forget_efficacy_terms: Sequence[GenerationScorer] = (),
  paper: paper_metrics.PaperModels | None = None,
) -> EvaluationResult:
  """Evaluates a model on TOFU-format sets.

  Args:
    model: A :class:`~train.evaluation.scoring.ScoringModel`, or a JAX-traceable
      ``logits_fn(input_ids, attention_mask) -> logits`` (wrapped in ``FunctionModel``).
    tokenizer: The model's Hugging Face tokenizer (needs an EOS token; pads with the pad
      token, else EOS).
    eval_sets: The sets (e.g. :func:`tofu_eval_sets`); names must be unique. Forget
      quality and efficacy use the one forget set; model utility every other set present
      (TOFU's three give its 9 terms; the summary names the sets used and what is missing).
    template: A :class:`~train.data.prompting.PromptTemplate` or preset name (``"plain"``,
      ``"phi"``, ``"llama2-chat"``, ``"phi3-chat"``), or a
      :class:`~train.data.prompting.ChatTemplate` or ``"chat"``: the tokenizer's chat
      template (answers end with its end-of-turn token; generations stop at it).
    config: Batch size, generation length, ``max_items`` cap, answer boundary...
    retain_reference: For forget quality: a retain-only model's per-item file (or its
      forget-set truth ratios). Without it forget quality is ``None``. A file scored with
      another answer boundary or template is refused (``ValueError``).
    forget_efficacy_terms: Extra per-item forget-efficacy terms (e.g.
      :class:`~train.evaluation.paper_metrics.CosineSimilarity`); forget set only.
    paper: The sentence encoder, NLI model and IDK answers of the paper's terms (each
      optional; token entropy needs none). Missing terms are named in the summary.

  Returns:
    The per-set results and the summary (``result.write(dir)`` saves everything).

  Raises:
    ValueError: Duplicate set names, a mismatched reference, or problems named in the
      message.
    tofu.TofuFormatError: A malformed data file (the message names file and line).
  """
  names = [s.name for s in eval_sets]
  if len(set(names)) != len(names):
    raise ValueError(f"set names must be unique, got {names}")
  encoder = PromptEncoder.create(template, tokenizer, config.answer_boundary)
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
      paper=paper,
    )
  summary_json = summarize(
    results,
    retain_reference=retain_reference,
    config=dataclasses.asdict(config),
    template=encoder.describe(),
    tokenizer=encoder.describe_tokenizer(),
    answer_boundary=config.answer_boundary,
    paper_models=paper,
  )
  return EvaluationResult(sets=results, summary=summary_json)
