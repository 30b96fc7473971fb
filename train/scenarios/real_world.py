"""Real-world unlearning (``scenario=real_world``): make a pretrained model forget what it
knows about real people, keeping what it knows about others.

The data are the DualOptim+ authors' four files (:mod:`train.data.real_world`), named in
``config.real_world``; without ``real_world.path`` the embedded generator's invented people
are written to ``<output_dir>/data``. ``real_world.task_ids`` picks the people forgotten
(one task per person; several at once, or every task when empty). Both objectives train on
``answer`` (the model's own long answers): the selected people's rows are the forget set,
every neighbor row the retain set.

Evaluation (:func:`evaluate_real_world`) is the TOFU evaluator on the sets of
:func:`eval_sets`: ``forget`` (``forget_perturbed.json``, the selected tasks; role forget),
``neighbor`` (``neighbor_perturbed.json``; the retain role) and each file of
``real_world.utility_sets`` (role ``utility``, world-facts format). ROUGE-L and probability
score ``real_world.answer_key`` (``golden_answer``: the short true answer), the truth ratio
the paraphrased answer against the 5 perturbed ones. Model utility is the harmonic mean of
the non-forget sets' terms (``model_utility_sets`` names them), as the authors' own
real-world evaluation takes the neighbor set as its Retain set.

:func:`run` (``python train/run.py experiment configs/real_world_tiny.yaml``, once the
command dispatches here) evaluates, unlearns, evaluates again and writes a table.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from train.config import RunConfig
from train.data import real_world as data_rw
from train.data import tofu
from train.data import tokenizer as tokenizer_lib
from train.evaluation.evaluator import SUMMARY_FILE, EvalSetSpec
from train.runtime import distributed
from train.scenarios import before_after

REPORT_FILE = "real_world_report.md"
HEADLINE = (
  "forget/probability",
  "forget/rouge_l_recall",
  "neighbor/probability",
  "neighbor/rouge_l_recall",
  "model_utility",
  "forget_efficacy",
)
"""Flat keys of :func:`evaluate_real_world`'s result: what the model still knows of the
forgotten people (forget set) and of the others (neighbor set), and the aggregates."""


def data_folder(config: RunConfig) -> str:
  """``real_world.path``, or ``<output_dir>/data`` where :func:`prepare_data` writes the
  embedded files."""
  return config.real_world.path or str(pathlib.Path(config.output_dir) / "data")


def utility_paths(config: RunConfig, folder: str) -> list[str]:
  """The ``real_world.utility_sets`` files (relative to the data folder or absolute).

  Raises:
    FileNotFoundError: Naming each missing one.
  """
  paths = [os.path.join(folder, name) for name in config.real_world.utility_sets]
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    raise FileNotFoundError(f"real_world.utility_sets file(s) not found: {missing}")
  return paths


def load_data(config: RunConfig) -> data_rw.RealWorldData:
  """The four files, validated, with the forget rows of ``real_world.task_ids``."""
  section = config.real_world
  files = {role: getattr(section, role) for role in data_rw.FILES}
  return data_rw.load_real_world(data_folder(config), section.task_ids, **files)


def corpus_texts(config: RunConfig, folder: str) -> list[str]:
  """Every question (also as the template renders it), answer, golden / paraphrased /
  perturbed answer of the data and utility files: a tiny model's tokenizer corpus."""
  from train.data.prompting import PromptTemplate, get_prompt_template  # noqa: PLC0415

  preset = get_prompt_template(config.data.template)
  section = config.real_world
  paths = [os.path.join(folder, getattr(section, role)) for role in data_rw.FILES]
  texts = []
  for path in paths + utility_paths(config, folder):
    for _, row in tofu.iter_json_lines(path):
      if isinstance(preset, PromptTemplate) and isinstance(row.get("question"), str):
        texts.append(preset.prompt(row["question"]))
      texts += [v for v in row.values() if isinstance(v, str)]
      texts += [v for v in row.get("perturbed_answer", ()) if isinstance(v, str)]
  return texts


def prepare_data(config: RunConfig) -> tuple[Any, str]:
  """The run's tokenizer and data folder (``program.prepare_data``'s contract): the
  model's own tokenizer, or one trained on the files' texts for the tiny model. The files
  are validated here, so a bad file fails before any model is built. Without
  ``real_world.path`` the embedded files are written first (once per run, by the primary
  process; the others wait at a barrier)."""
  if config.real_world.path is None:
    if distributed.is_primary():
      data_rw.write_synthetic_real_world(data_folder(config), seed=config.data.seed)
    distributed.barrier("synthetic real-world data")
  data = load_data(config)
  folder = os.path.dirname(data.paths["forget"])
  if config.model.path is not None:
    import models  # noqa: PLC0415 (the model library, only for a pretrained model)

    return models.load_tokenizer(config.model.path), folder
  return tokenizer_lib.train_tokenizer(corpus_texts(config, folder)), folder


def load_splits(config: RunConfig, data_dir: str | None = None) -> Any:
  """The forget rows of the selected people and every neighbor row, both with their
  ``answer`` (``train.data.TofuSplits``); ``data_dir`` is unused (``config`` names it)."""
  del data_dir
  return data_rw.real_world_splits(load_data(config))


def eval_sets(
  config: RunConfig, data: data_rw.RealWorldData | None = None
) -> tuple[EvalSetSpec, ...]:
  """forget (selected tasks), neighbor (retain role), then one ``utility`` set per
  ``real_world.utility_sets`` file, named by its file's stem; ``data``: the files already
  loaded (:func:`load_data`), else they are read here."""
  data = load_data(config) if data is None else data
  key = config.real_world.answer_key
  sets = [
    EvalSetSpec("forget", data.paths["forget_eval"], "forget", data.task_ids, key),
    EvalSetSpec("neighbor", data.paths["neighbor_eval"], "retain", None, key),
  ]
  for path in utility_paths(config, os.path.dirname(data.paths["forget"])):
    name = pathlib.Path(path).stem
    if name in ("forget", "neighbor"):
      name = f"utility_{name}"
    sets.append(EvalSetSpec(name, path, "utility"))
  return tuple(sets)


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
  """The :data:`HEADLINE` values of an evaluation summary (``None`` where not computed)."""
  sets = summary["sets"]
  values: dict[str, float | None] = {}
  for key in HEADLINE:
    name, _, metric = key.rpartition("/")
    values[key] = sets[name].get(metric) if name else summary.get(key)
  return values


def evaluate_real_world(
  config: RunConfig, model: Any, params: Any, tokenizer: Any, out_dir: pathlib.Path
) -> dict[str, Any]:
  """Evaluates ``params`` on :func:`eval_sets`; writes the evaluator's files
  (``tofu_eval_items.json``, ``tofu_eval_summary.json``, ``.md``) to ``out_dir`` and
  returns the summary with the :data:`HEADLINE` keys and the people forgotten added."""
  from train.data.prompting import PromptEncoder  # noqa: PLC0415 (jax-heavy below)
  from train.evaluation import evaluate  # noqa: PLC0415
  from train.program.evaluate import eval_config, paper_models  # noqa: PLC0415
  from train.program.modeling import ScoringAdapter  # noqa: PLC0415

  data = load_data(config)
  folder = os.path.dirname(data.paths["forget"])
  encoder = PromptEncoder.create(config.data.template, tokenizer, config.eval.answer_boundary)
  scoring = ScoringAdapter(model, params, encoder.stop_token_ids, tokenizer.pad_token_id)
  result = evaluate(
    scoring,
    tokenizer,
    eval_sets(config, data),
    template=config.data.template,
    config=eval_config(config),
    retain_reference=config.eval.retain_reference,
    paper=paper_models(config, folder),
  )
  out_dir.mkdir(parents=True, exist_ok=True)
  if distributed.is_primary():
    result.write(out_dir)
  summary = json.loads(json.dumps(result.summary))  # JSON types, as the file has them
  people = {str(task): data.people[task] for task in data.task_ids}
  return {**summary, **headline(summary), "forgotten_people": people}


def report_table(rows: dict[str, dict[str, Any]]) -> str:
  """A Markdown table: one row per evaluated model, one column per :data:`HEADLINE` key."""
  return before_after.report_table(rows, HEADLINE)


def run(config: RunConfig) -> dict[str, Any]:
  """Evaluates the model, unlearns the selected people (the unlearning stage with this
  scenario's data), evaluates again; writes ``real_world_report.md``, ``results.json`` and
  the model under ``config.output_dir``."""

  def title(config: RunConfig) -> str:
    return f"Real-world unlearning of {', '.join(load_data(config).people.values())}"

  return before_after.run(config, evaluate_real_world, HEADLINE, REPORT_FILE, title)


__all__ = [
  "HEADLINE",
  "REPORT_FILE",
  "SUMMARY_FILE",
  "eval_sets",
  "evaluate_real_world",
  "headline",
  "load_data",
  "load_splits",
  "prepare_data",
  "report_table",
  "run",
]
