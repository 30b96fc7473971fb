"""Continual unlearning (``python train/run.py continual CONFIG``): forget tasks one after
another, each from the model the previous task left.

As the authors' ``forget.py`` with ``TASK_LIST``: task ``k`` unlearns forget task
``continual.task_ids[k]`` for ``training.steps`` steps, starting from task ``k - 1``'s
final model, which is also its reference model (NPO, KL); its retain set is the scenario's
retain set minus the questions of the tasks already unlearned (for TOFU: retain90 plus the
forget tasks not yet unlearned). The authors start each task with a fresh optimizer (a new
Trainer per task): ``continual.reset_optimizer=true``, the default; ``false`` carries the
moments (and DualOptim+'s deltas) into the next task and restarts only the learning-rate
schedule (:func:`train.program.optimizer.restart_learning_rate_schedule`).

After every task the model is evaluated on the forget set of each task unlearned so far
and on the utility sets (``scenarios.evaluate`` with that task selected); the curve of
forget efficacy and model utility against the number of tasks unlearned is plotted.

Each task runs in ``<output_dir>/task<k>_id<task>`` with its own checkpoints, so a killed
run resumes inside the task it was in; a finished task holds ``done.json`` (its evaluation)
and its final checkpoint, from which the next task starts after a restart.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

from train import data as data_lib
from train.config import ConfigError, RunConfig, save_config

DONE_FILE = "done.json"
REPORT_FILE = "continual_report.md"
PLOT_FILE = "continual.png"
CURVE_KEYS = ("forget_efficacy", "model_utility")


def check(config: RunConfig) -> None:
  """Refuses what the continual mode does not run, naming the setting."""
  if config.scenario not in ("tofu", "real_world"):
    raise ConfigError(f"continual runs scenario tofu or real_world, got {config.scenario!r}")
  if config.model.lora.enabled:
    raise ConfigError(
      "continual does not run LoRA yet (each task would need the previous task's adapters "
      "merged or carried): set model.lora.enabled=false"
    )


def task_config(config: RunConfig, position: int, task: int) -> RunConfig:
  """The run of the ``position``-th task (1-based): its forget task and its folder."""
  folder = pathlib.Path(config.output_dir) / f"task{position}_id{task}"
  if config.scenario == "real_world":
    section = dataclasses.replace(config.real_world, task_ids=(task,))
    return dataclasses.replace(config, output_dir=str(folder), real_world=section)
  data = dataclasses.replace(config.data, task_id=task)
  return dataclasses.replace(config, output_dir=str(folder), data=data)


def forget_questions(config: RunConfig, data_dir: str, tasks: list[int]) -> frozenset[str]:
  """The questions of forget ``tasks`` (already unlearned: no longer retained)."""
  from train import scenarios  # noqa: PLC0415 (the package imports this module's users)

  questions: set[str] = set()
  for task in tasks:
    splits = scenarios.load_splits(task_config(config, 0, task), data_dir)
    questions.update(item.question for item in splits.forget)
  return frozenset(questions)


def task_splits(config: RunConfig, data_dir: str, position: int) -> data_lib.TofuSplits:
  """The splits of the ``position``-th task: its forget rows; the retain rows without the
  questions of the tasks unlearned before it."""
  from train import scenarios  # noqa: PLC0415

  tasks = list(config.continual.task_ids)
  splits = scenarios.load_splits(task_config(config, position, tasks[position - 1]), data_dir)
  done = forget_questions(config, data_dir, tasks[: position - 1])
  retain = tuple(item for item in splits.retain if item.question not in done)
  if not retain:
    raise ValueError(f"task {tasks[position - 1]}: no retain row is left after {tasks[:position]}")
  return dataclasses.replace(splits, retain=retain)


def _final_state(folder: pathlib.Path, params: Any, opt_state: Any, steps: int) -> tuple:
  """A finished task's final parameters and optimizer state, from its last checkpoint."""
  from train.runtime.checkpointing import RunCheckpointer  # noqa: PLC0415

  checkpointer = RunCheckpointer(folder / "checkpoints")
  try:
    _, state, _ = checkpointer.restore({"params": params, "opt_state": opt_state}, steps)
  finally:
    checkpointer.close()
  return state["params"], state["opt_state"]


def _evaluate_task(config, position, model, params, tokenizer, data_dir) -> dict[str, Any]:
  """Scores after the ``position``-th task: each task so far (forget metrics and the
  utility sets), and the curve's values (forget efficacy averaged over those tasks, model
  utility from the latest)."""
  from train import scenarios  # noqa: PLC0415

  done = list(config.continual.task_ids)[:position]
  evals = pathlib.Path(task_config(config, position, done[-1]).output_dir) / "eval"
  per_task = {}
  for k, task in enumerate(done, 1):
    tc = task_config(config, k, task)
    per_task[task] = scenarios.evaluate(tc, model, params, tokenizer, data_dir, evals / f"task{k}")
  efficacy = [s.get("forget_efficacy") for s in per_task.values()]
  efficacy = [e for e in efficacy if e is not None]
  return {
    "position": position,
    "task": done[-1],
    "forget_efficacy": sum(efficacy) / len(efficacy) if efficacy else None,
    "model_utility": per_task[done[-1]].get("model_utility"),
    "per_task": {str(t): {k: s.get(k) for k in CURVE_KEYS} for t, s in per_task.items()},
  }


def embedded_data(config: RunConfig) -> RunConfig:
  """``config`` reading the embedded TOFU-style data with enough forget tasks for
  ``continual.task_ids`` (written to ``<output_dir>/data``) when ``data.path`` is null."""
  if config.scenario != "tofu" or config.data.path is not None:
    return config
  from train.data import synthetic  # noqa: PLC0415

  folder = pathlib.Path(config.output_dir) / "data"
  synthetic.write_synthetic_tofu(
    folder, seed=config.data.seed, num_tasks=max(config.continual.task_ids)
  )
  return dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(folder)))


def run(config: RunConfig, override: bool = False) -> dict[str, Any]:
  """Unlearns ``continual.task_ids`` in order (resuming where a killed run stopped) and
  evaluates after each; writes ``continual_report.md``, ``results.json`` and the curve.

  Each task folder's checkpoints resume only under the config that wrote them
  (:func:`train.runtime.run_guard.check_resume`; ``override`` resumes anyway, logged)."""
  from train import scenarios  # noqa: PLC0415 (jax-heavy)
  from train.program import optimizer as optimizer_lib  # noqa: PLC0415
  from train.program.modeling import FunctionalModel, build_model, save_model  # noqa: PLC0415

  check(config)
  out = pathlib.Path(config.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_config(config, out / "config.yaml")
  began = time.perf_counter()
  config = embedded_data(config)
  tokenizer, data_dir = scenarios.prepare_data(config)
  module, model_config = build_model(config.model, tokenizer, seed=config.training.seed)
  model, params = FunctionalModel.split(module, model_config)
  state = _TaskState(params, None, optimizer_lib.run_optimizer(config).init(params))
  rows = []
  for position, task in enumerate(config.continual.task_ids, 1):
    rows.append(_run_task(config, position, task, state, (model, tokenizer, data_dir), override))
  save_model(model, state.params, str(out / "model"), tokenizer)
  _write_report(out, config, rows)
  print(f"report: {out / REPORT_FILE} ({time.perf_counter() - began:.0f} s)")
  return {"rows": rows}


@dataclasses.dataclass
class _TaskState:
  """What one task hands the next: the parameters and the optimizer state (None before
  the first task), and an optimizer state of the right layout to restore into."""

  params: Any
  opt_state: Any
  opt_template: Any


def _run_task(config, position, task, state: _TaskState, context, override) -> dict[str, Any]:
  """Runs (or, if finished before a restart, restores) one task; updates ``state``."""
  from train import program  # noqa: PLC0415
  from train.program import optimizer as optimizer_lib  # noqa: PLC0415
  from train.runtime import run_guard  # noqa: PLC0415

  model, tokenizer, data_dir = context
  tc = task_config(config, position, task)
  folder = pathlib.Path(tc.output_dir)
  folder.mkdir(parents=True, exist_ok=True)
  run_guard.check_resume(folder, tc, override=override)
  save_config(tc, folder / "config.yaml")
  if (folder / DONE_FILE).exists():  # finished before a restart: its final state
    state.params, state.opt_state = _final_state(
      folder, state.params, state.opt_template, tc.training.steps
    )
    return json.loads((folder / DONE_FILE).read_text())
  splits = task_splits(config, data_dir, position)
  streams = program.make_streams(tc, splits, tokenizer, tc.loss.build())
  carried = None
  if state.opt_state is not None and not config.continual.reset_optimizer:
    carried = optimizer_lib.restart_learning_rate_schedule(state.opt_state)
  print(f"task {position}/{len(config.continual.task_ids)}: forget task {task}")
  result = program.unlearn(
    tc, model, state.params, state.params, *streams, folder, opt_state=carried
  )
  state.params, state.opt_state = result.params, result.opt_state
  row = _evaluate_task(config, position, model, state.params, tokenizer, data_dir)
  row["seconds"] = result.seconds
  (folder / DONE_FILE).write_text(json.dumps(row, indent=1))
  return row


def _fmt(value: Any) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def _write_report(out: pathlib.Path, config: RunConfig, rows: list[dict[str, Any]]) -> None:
  state = "reset" if config.continual.reset_optimizer else "carried"
  lines = [
    f"# Continual unlearning: {config.loss.name}, {config.optimizer.name} (state {state})",
    "",
    "| tasks unlearned | last task | forget efficacy (mean over tasks so far) | model utility |",
    "|---|---|---|---|",
  ]
  for row in rows:
    lines.append(
      f"| {row['position']} | {row['task']} | {_fmt(row['forget_efficacy'])} | "
      f"{_fmt(row['model_utility'])} |"
    )
  (out / REPORT_FILE).write_text("\n".join(lines) + f"\n\n![curve]({PLOT_FILE})\n")
  (out / "results.json").write_text(json.dumps(rows, indent=1))
  _plot(out / PLOT_FILE, rows)
  print("\n".join(lines))


def _plot(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(5, 3.2))
  x = [row["position"] for row in rows]
  for key in CURVE_KEYS:
    ys = [row[key] for row in rows]
    if all(y is not None for y in ys):
      ax.plot(x, ys, marker="o", label=key.replace("_", " "))
  ax.set_xlabel("tasks unlearned")
  ax.set_xticks(x)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
