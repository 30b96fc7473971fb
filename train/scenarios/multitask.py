"""Multi-task learning (``scenario=multitask``): K >= 2 named tasks learnt as K objectives.

Each task of ``config.multitask.tasks`` is a question / answer file learnt by descent on its
answers' token-mean NLL, times its coefficient (``multitask.coeffs``). The optimizers
(``optimizer.name``):

* ``dualoptim_plus``: ``dualoptax.multi_objective_dualoptim_plus``, one shared base state
  plus one delta per task; a step serves one task, in the alternating schedule of
  ``multitask.steps`` (consecutive steps per task), at ``learning_rate * lr_ratios[k]``;
* ``dualoptim``: ``dualoptax.multi_objective_dualoptim``, K independent Adam states, the
  same schedule and ratios;
* ``adam``: one Adam state on the coefficient-weighted SUM of the K losses, one batch of
  every task per step (the joint baseline; it sees K batches per step, the others one).

Every ``training.diagnostics_every`` steps the run measures the K x K cosine matrix of the
K tasks' gradients at the current parameters, on one fixed batch per task: the conflict
between objectives that the paper's Figure 2 plots for forget and retain.

Evaluation (:func:`evaluate_multitask`) scores each task's held-out rows: the answers'
token-mean NLL, the exact-match accuracy of the greedy answer (case, whitespace and final
punctuation normalized) and its ROUGE-L recall, then their average over tasks.

:func:`run` (``python train/run.py experiment configs/multitask_tiny.yaml``) trains the
same initial model with each of the three optimizers, evaluates all of them and writes
``multitask_report.md``, ``results.json`` and two figures.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from train import data as data_lib
from train import losses
from train.config import RunConfig, save_config
from train.data import multitask_synthetic, tofu
from train.data import tokenizer as tokenizer_lib
from train.data.prompting import PromptEncoder
from train.evaluation import metrics
from train.evaluation.scoring import generate_texts, score_answers
from train.losses.tokens import IGNORE_INDEX
from train.program import optimizer as optimizer_lib
from train.program.modeling import FunctionalModel, ScoringAdapter, build_model
from train.runtime import distributed
from train.runtime.compiler import step_compiler_options
from train.runtime.metrics import MetricsLogger
from train.scenarios import multitask_report as mt_report
from train.scenarios.multitask_report import HEADLINE

OPTIMIZERS = ("adam", "dualoptim", "dualoptim_plus")
"""The optimizers :func:`run` compares, in table order."""
DEFINITIONS = {
  "nll": "token-mean NLL of the held-out answers (lower is better)",
  "exact_match": "share of held-out questions whose greedy answer equals the reference after "
  "lower-casing, collapsing whitespace and dropping final punctuation",
  "rouge_l_recall": "ROUGE-L recall of the greedy answer against the reference",
}
SUMMARY_FILE = "multitask_eval.json"
REPORT_FILE = "multitask_report.md"
# Would be config fields (multitask.train_per_task / eval_per_task) for the embedded tasks.
SYNTHETIC = multitask_synthetic.MultitaskSyntheticConfig()
TOKENIZER_VOCAB = 1024  # the tiny model's BPE vocabulary


@dataclasses.dataclass(frozen=True)
class TaskData:
  """One task: its name, files and rows."""

  name: str
  train_path: str
  eval_path: str
  train: tuple[tofu.TofuItem, ...]
  eval: tuple[tofu.TofuItem, ...]


def task_files(config: RunConfig) -> dict[str, tuple[str, str]]:
  """``{task: (train_path, eval_path)}`` of ``config.multitask.tasks``, after writing the
  embedded tasks to ``<output_dir>/data`` when ``multitask.path`` is null (by the primary
  process; the others wait at a barrier).

  Raises:
    FileNotFoundError: Naming the ``multitask.tasks`` entry and the missing path.
  """
  folder = config.multitask.path
  if folder is None:
    folder = str(pathlib.Path(config.output_dir) / "data")
    if distributed.is_primary():
      synthetic = dataclasses.replace(SYNTHETIC, seed=config.data.seed)
      multitask_synthetic.write_synthetic_multitask(folder, synthetic)
    distributed.barrier("synthetic multitask data")
  files = {}
  for i, task in enumerate(config.multitask.tasks):
    paths = tuple(
      os.path.join(folder, f"{task}{suffix}.json")
      for suffix in ("", multitask_synthetic.EVAL_SUFFIX)
    )
    for path in paths:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"multitask.tasks[{i}] {task!r}: task file not found: {path}")
    files[task] = paths
  return files


def _load(task: str, path: str) -> tuple[tofu.TofuItem, ...]:
  """The rows of one task file (``load_tofu`` names the file and line of a bad row)."""
  if tofu.count_rows(path) == 0:
    raise ValueError(f"multitask task {task!r}: the file {path} has no rows")
  return tuple(tofu.load_tofu(path))


def load_tasks(config: RunConfig) -> dict[str, TaskData]:
  """Every task's training and held-out rows, in ``multitask.tasks`` order.

  Raises:
    FileNotFoundError: A task file is missing (see :func:`task_files`).
    ValueError: A task file is empty (naming the task and file), or a row is malformed
      (``tofu.TofuFormatError``, naming the file and line).
  """
  tasks = {}
  for name, (train_path, eval_path) in task_files(config).items():
    train, held = _load(name, train_path), _load(name, eval_path)
    tasks[name] = TaskData(name, train_path, eval_path, train, held)
  return tasks


def corpus_texts(tasks: Mapping[str, TaskData], template: str) -> list[str]:
  """Prompts (as ``template`` renders them) and answers of every task's rows, in order:
  the tiny model's tokenizer corpus."""
  items = [item for task in tasks.values() for item in task.train + task.eval]
  return tokenizer_lib.item_corpus_texts(items, template)


def prepare(config: RunConfig) -> tuple[Any, dict[str, TaskData]]:
  """The run's tokenizer (the model's own, or for the tiny model one trained on every
  task's texts) and its tasks (:func:`load_tasks`)."""
  tasks = load_tasks(config)
  if config.model.path is not None:
    import models  # noqa: PLC0415 (the model library, only for a pretrained model)

    tokenizer = models.load_tokenizer(config.model.path)
  else:
    texts = corpus_texts(tasks, config.data.template)
    tokenizer = tokenizer_lib.train_tokenizer(texts, vocab_size=TOKENIZER_VOCAB)
  return tokenizer, tasks


def scheduled_task(step: int, steps: Sequence[int]) -> int:
  """The task that step ``step`` (0-based) serves in the alternating schedule of
  ``steps[k]`` consecutive steps per task (as ``dualoptax.scheduled_objective``)."""
  ends = np.cumsum(steps)
  return int(np.searchsorted(ends, step % ends[-1], side="right"))


_PUNCTUATION = re.compile(r"[\s.!?,;:]+$")


def normalize_answer(text: str) -> str:
  """Lower case, single spaces, no surrounding whitespace or final punctuation."""
  return _PUNCTUATION.sub("", " ".join(text.lower().split()))


def exact_match(generations: Sequence[str], references: Sequence[str]) -> np.ndarray:
  """1.0 where a generation equals its reference after :func:`normalize_answer`."""
  return np.array(
    [normalize_answer(g) == normalize_answer(r) for g, r in zip(generations, references)],
    np.float64,
  )


# --- The optimizer, the batches and the jitted functions.


def make_multitask_optimizer(
  config: RunConfig, *, total_steps: int | None = None, steps_per_epoch: int | None = None
) -> optax.GradientTransformation:
  """``train.program.optimizer.make_optimizer`` for K tasks: the K-objective DualOptim+ /
  DualOptim with ``multitask.steps`` and ``multitask.lr_ratios``, or Adam (one objective:
  the summed loss, so the ratios do not apply)."""
  mt = config.multitask
  steps = tuple(int(s) for s in mt.per_task("steps"))
  ratios = tuple(float(r) for r in mt.per_task("lr_ratios"))
  return optimizer_lib.make_optimizer(
    config.optimizer,
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    objectives=(steps, ratios),
  )


@dataclasses.dataclass
class TaskStreams:
  """Every task's training batches, padded to one length (one compiled step)."""

  streams: list[data_lib.BatchStream]
  length: int
  pad_id: int

  def next_batch(self, task: int) -> losses.LMBatch:
    return self.padded(next(self.streams[task]))

  def padded(self, qa: data_lib.QABatch) -> losses.LMBatch:
    a, extra = qa.answers, self.length - qa.answers.length
    pad = lambda x, v: np.pad(x, ((0, 0), (0, extra)), constant_values=v)  # noqa: E731
    return losses.LMBatch(
      pad(a.input_ids, self.pad_id), pad(a.attention_mask, 0), pad(a.labels, IGNORE_INDEX)
    )

  def probes(self) -> losses.LMBatch:
    """The first rows of every task in file order, ``[K, B, T]``: the fixed batches the
    gradient cosines are measured on, the same for every optimizer."""
    batches = []
    for stream in self.streams:
      rows = range(min(stream.config.batch_size, len(stream.dataset)))
      batches.append(self.padded(stream.dataset.batch(list(rows))))
    return stack(batches)


def stack(batches: Sequence[losses.LMBatch]) -> losses.LMBatch:
  """``[K, B, T]`` arrays of K batches of equal shape."""
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def task_streams(config: RunConfig, tokenizer: Any, tasks: Mapping[str, TaskData]) -> TaskStreams:
  """One seeded, reshuffled stream per task (``stream_id`` = its index), padded to the
  longest task's padded length.

  Raises:
    ValueError: A task has fewer training rows than ``data.batch_size`` (naming it).
  """
  tokenization = data_lib.TokenizationConfig(
    template=config.data.template, max_length=config.data.max_length
  )
  batching = data_lib.BatchingConfig(batch_size=config.data.batch_size, seed=config.data.seed)
  streams = []
  for k, task in enumerate(tasks.values()):
    dataset = data_lib.QADataset(task.train, tokenizer, tokenization)
    try:
      streams.append(data_lib.BatchStream(dataset, batching, stream_id=k))
    except ValueError as e:
      raise ValueError(f"multitask task {task.name!r} ({task.train_path}): {e}") from e
  length = max(tokenization.padded_length(s.dataset.max_sequence_length()) for s in streams)
  return TaskStreams(streams, length, streams[0].dataset.pad_id)


def _nll_fn(model: FunctionalModel):
  def nll(params, batch):
    logits = model.logits(params, batch.input_ids, batch.attention_mask)
    return losses.mean_token_nll(logits, batch)

  return nll


def compile_step(model: FunctionalModel, tx, coeffs: Sequence[float], summed: bool):
  """The jitted ``(params, opt_state, batch, objective) -> (params, opt_state, nlls)``
  (params and state donated; the objective a traced int32, so one program serves every
  task). Alternating: ``batch`` is one task's, the loss ``coeffs[objective] * NLL``,
  ``nlls`` its NLL. Summed: ``batch`` is ``[K, B, T]``, the loss ``sum_k coeffs[k] *
  NLL_k``, ``nlls`` the K NLLs."""
  weights = jnp.asarray(coeffs, jnp.float32)
  nll = _nll_fn(model)

  def loss(params, batch, objective):
    if not summed:
      value = nll(params, batch)
      return weights[objective] * value, value
    values = jnp.stack(
      [nll(params, jax.tree.map(lambda x: x[k], batch)) for k in range(len(coeffs))]
    )
    return jnp.sum(weights * values), values

  def step(params, opt_state, batch, objective):
    (_, nlls), grads = jax.value_and_grad(loss, has_aux=True)(params, batch, objective)
    updates, opt_state = tx.update(grads, opt_state, params, objective=objective)
    return optax.apply_updates(params, updates), opt_state, nlls

  return jax.jit(step, donate_argnums=(0, 1), compiler_options=step_compiler_options())


def gradient_cosines_fn(model: FunctionalModel, num_tasks: int):
  """The jitted ``(params, probes [K, B, T]) -> [K, K]`` cosines of the K tasks' NLL
  gradients at ``params`` (the Figure-2 conflict measure; negative entries conflict)."""
  nll = _nll_fn(model)

  def cosines(params, probes):
    grads = [jax.grad(nll)(params, jax.tree.map(lambda x: x[k], probes)) for k in range(num_tasks)]
    gram = jnp.zeros((num_tasks, num_tasks), jnp.float32)
    for leaves in zip(*(jax.tree.leaves(g) for g in grads)):
      rows = jnp.stack([leaf.reshape(-1).astype(jnp.float32) for leaf in leaves])
      gram = gram + rows @ rows.T
    norms = jnp.sqrt(jnp.diagonal(gram))
    return gram / jnp.maximum(norms[:, None] * norms[None, :], 1e-30)

  return jax.jit(cosines)


# --- Training.


@dataclasses.dataclass
class MultitaskResult:
  """What :func:`train_multitask` returns.

  Attributes:
    params: The trained parameters.
    opt_state: The optimizer's final state.
    history: One record per step: ``step`` (1-based), ``task_id`` (-1: the summed loss),
      ``task``, ``loss`` and ``nll/<task>`` of the task(s) the step trained.
    cosines: ``{"step": updates so far, "matrix": K x K}`` every ``diagnostics_every``
      steps and at the end.
  """

  params: Any
  opt_state: Any
  history: list[dict[str, Any]]
  cosines: list[dict[str, Any]]


def _epoch_steps(config: RunConfig, tasks: Mapping[str, TaskData]) -> int:
  """Steps of one pass over every task (the warmup of a null ``optimizer.warmup_steps``)."""
  rows = config.data.batch_size
  return sum(max(len(t.train) // rows, 1) for t in tasks.values())


def _step_record(step: int, task: int, names: Sequence[str], coeffs, nlls) -> dict[str, Any]:
  nlls = np.atleast_1d(np.asarray(nlls, np.float64))
  if task < 0:
    record = {"step": step, "task_id": -1, "task": "sum"}
    record.update({f"nll/{n}": float(v) for n, v in zip(names, nlls)})
    return {**record, "loss": float(np.dot(coeffs, nlls))}
  record = {
    "step": step,
    "task_id": task,
    "task": names[task],
    f"nll/{names[task]}": float(nlls[0]),
  }
  return {**record, "loss": float(coeffs[task] * nlls[0])}


def _cosine_record(step: int, names: Sequence[str], matrix: np.ndarray) -> dict[str, Any]:
  record: dict[str, Any] = {"step": step}
  for i, j in itertools.combinations(range(len(names)), 2):
    record[f"cosine/{names[i]}|{names[j]}"] = float(matrix[i, j])
  return record


def train_multitask(
  config: RunConfig,
  model: FunctionalModel,
  params: Any,
  tokenizer: Any,
  tasks: Mapping[str, TaskData],
  out_dir: str | os.PathLike[str],
) -> MultitaskResult:
  """Trains ``params`` on the tasks for ``training.steps`` steps with ``optimizer.name``
  (see the module docstring); ``params`` are donated (pass a copy to keep them). Writes
  ``metrics.jsonl`` (per-step task and loss; the pairwise gradient cosines) and
  ``cosines.json`` (the K x K matrices) under ``out_dir``."""
  names, steps = list(tasks), config.training.steps
  coeffs = np.asarray(config.multitask.per_task("coeffs"), np.float64)
  schedule = config.multitask.per_task("steps")
  data = task_streams(config, tokenizer, tasks)
  tx = make_multitask_optimizer(
    config, total_steps=steps, steps_per_epoch=_epoch_steps(config, tasks)
  )
  opt_state = tx.init(params)
  summed = config.optimizer.name == "adam"
  step_fn = compile_step(model, tx, coeffs, summed)
  cosine_fn, probes = gradient_cosines_fn(model, len(names)), data.probes()
  history, cosines = [], []
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  with MetricsLogger(out, write=distributed.is_primary()) as logger:

    def measure(step: int) -> None:
      matrix = np.asarray(cosine_fn(params, probes), np.float64)
      cosines.append({"step": step, "matrix": matrix.tolist()})
      logger.log(_cosine_record(step, names, matrix))

    progress = tqdm(range(steps), desc=f"multitask {config.optimizer.name}", mininterval=1.0)
    for step in progress:
      if step % config.training.diagnostics_every == 0:
        measure(step)
      task = -1 if summed else scheduled_task(step, schedule)
      batch = (
        stack([data.next_batch(k) for k in range(len(names))]) if summed else data.next_batch(task)
      )
      params, opt_state, nlls = step_fn(params, opt_state, batch, jnp.int32(max(task, 0)))
      record = _step_record(step + 1, task, names, coeffs, nlls)
      history.append(record)
      logger.log(record)
      progress.set_postfix(task=record["task"], loss=f"{record['loss']:.3f}", refresh=False)
    measure(steps)
  if distributed.is_primary():
    (out / "cosines.json").write_text(json.dumps({"tasks": names, "cosines": cosines}))
  return MultitaskResult(params, opt_state, history, cosines)


# --- Evaluation.


def eval_items(tasks: Mapping[str, TaskData]) -> dict[str, tuple[tofu.TofuItem, ...]]:
  """``{task: held-out rows}``, what :func:`evaluate_multitask` scores."""
  return {name: task.eval for name, task in tasks.items()}


def _generate(config: RunConfig, scoring: Any, encoder: Any, questions: Sequence[str]) -> list:
  texts = generate_texts(
    scoring, encoder, [encoder.prompt(q) for q in questions],
    max_new_tokens=config.eval.max_new_tokens, pad_token_id=encoder.tokenizer.pad_token_id,
    batch_size=config.eval.batch_size, length_multiple=32,
  )  # fmt: skip
  return [t.strip() for t in texts]


def _evaluate_task(config: RunConfig, scoring: Any, encoder: Any, items) -> tuple[dict, list]:
  """One task's headline values and per-item rows."""
  encoded = [
    encoder.encode_answer(encoder.prompt(i.question), i.answer, max_length=config.eval.max_length)
    for i in items
  ]
  nll = score_answers(
    scoring, encoded, pad_token_id=encoder.tokenizer.pad_token_id,
    batch_size=config.eval.batch_size, length_multiple=32,
  )  # fmt: skip
  texts = _generate(config, scoring, encoder, [i.question for i in items])
  references = [i.answer for i in items]
  exact, rouge = exact_match(texts, references), metrics.rouge_l_recall(texts, references)
  values = {
    "nll": float(np.mean(nll)),
    "exact_match": float(np.mean(exact)),
    "rouge_l_recall": float(np.mean(rouge)),
    "size": len(items),
  }
  rows = [
    {"line": i.line_number, "question": i.question, "answer": i.answer, "generation": t,
     "nll": float(n), "exact_match": bool(e), "rouge_l_recall": float(r)}
    for i, t, n, e, r in zip(items, texts, nll, exact, rouge)
  ]  # fmt: skip
  return values, rows


def evaluate_multitask(
  config: RunConfig,
  model: FunctionalModel,
  params: Any,
  tokenizer: Any,
  items: Mapping[str, Sequence[tofu.TofuItem]],
  out_dir: str | os.PathLike[str],
) -> dict[str, Any]:
  """Per task (the first ``eval.max_items`` of ``items[task]``): the answers' NLL, the greedy
  answer's exact match and ROUGE-L recall, and their ``average`` over tasks; writes
  ``<out_dir>/multitask_eval.json`` with the per-item generations and returns the summary
  ``{"tasks": {task: values}, "average": values, ...}``."""
  encoder = PromptEncoder.create(config.data.template, tokenizer, config.eval.answer_boundary)
  scoring = ScoringAdapter(model, params, encoder.stop_token_ids, tokenizer.pad_token_id)
  cap = config.eval.max_items
  per_task, rows = {}, {}
  for task, task_items in items.items():
    chosen = tuple(task_items) if cap is None else tuple(task_items)[:cap]
    per_task[task], rows[task] = _evaluate_task(config, scoring, encoder, chosen)
  average = {k: float(np.mean([v[k] for v in per_task.values()])) for k in HEADLINE}
  summary = {"tasks": per_task, "average": average, "_definitions": DEFINITIONS}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if distributed.is_primary():
    text = json.dumps({"summary": summary, "items": rows}, indent=1, ensure_ascii=False)
    (out / SUMMARY_FILE).write_text(text)
  return summary


# --- The experiment.


def run(config: RunConfig) -> dict[str, Any]:
  """From one initial model, trains with each of :data:`OPTIMIZERS` and evaluates every
  model; writes ``multitask_report.md``, ``results.json``, ``multitask_results.png`` and
  ``multitask_cosines.png`` under ``config.output_dir`` (each optimizer's run in a
  subfolder) and prints the table. Returns ``{"rows": {model: summary}, "cosines":
  {optimizer: records}, "results": {optimizer: MultitaskResult}}``."""
  out = pathlib.Path(config.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_config(config, out / "config.yaml")
  began = time.perf_counter()
  tokenizer, tasks = prepare(config)
  names, held = list(tasks), eval_items(tasks)
  print("tasks: " + ", ".join(f"{n} {len(t.train)} / {len(t.eval)}" for n, t in tasks.items()))
  module, model_config = build_model(config.model, tokenizer, seed=config.training.seed)
  model, initial = FunctionalModel.split(module, model_config)
  rows = {"initial": evaluate_multitask(config, model, initial, tokenizer, held, out / "initial")}
  cosines, results, seconds = {}, {}, {}
  for name in OPTIMIZERS:
    run_config = dataclasses.replace(
      config, optimizer=dataclasses.replace(config.optimizer, name=name)
    )
    started = time.perf_counter()
    params = jax.tree.map(jnp.copy, initial)  # the step donates its parameters
    result = train_multitask(run_config, model, params, tokenizer, tasks, out / name)
    seconds[name] = time.perf_counter() - started
    rows[name] = evaluate_multitask(run_config, model, result.params, tokenizer, held, out / name)
    cosines[name], results[name] = result.cosines, result
  if distributed.is_primary():
    (out / REPORT_FILE).write_text(mt_report.report(config, names, rows, cosines, seconds))
    stored = {"tasks": names, "rows": rows, "cosines": cosines, "train_seconds": seconds}
    (out / "results.json").write_text(json.dumps(stored, indent=1))
    mt_report.plot_results(rows, names, out / "multitask_results.png")
    mt_report.plot_cosines(cosines, names, out / "multitask_cosines.png")
  print(f"{mt_report.report_table(rows, names)}\n\n{mt_report.cosine_table(cosines, names)}")
  print(f"report: {out / REPORT_FILE} ({time.perf_counter() - began:.0f} s)")
  return {"rows": rows, "cosines": cosines, "results": results}


__all__ = [
  "DEFINITIONS",
  "HEADLINE",
  "OPTIMIZERS",
  "MultitaskResult",
  "TaskData",
  "compile_step",
  "corpus_texts",
  "evaluate_multitask",
  "exact_match",
  "gradient_cosines_fn",
  "load_tasks",
  "make_multitask_optimizer",
  "normalize_answer",
  "prepare",
  "run",
  "scheduled_task",
  "task_files",
  "task_streams",
  "train_multitask",
]
