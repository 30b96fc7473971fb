"""The multi-task experiment's report: Markdown tables of the held-out results and of
the tasks' gradient cosines, and their figures (:func:`train.scenarios.multitask.run`)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from train.config import RunConfig

HEADLINE = ("nll", "exact_match", "rouge_l_recall")
"""Per task and averaged: held-out answer NLL, exact match and ROUGE-L recall."""


def report_table(rows: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> str:
  """A Markdown table: one row per model, ``nll / exact match / ROUGE-L`` per task and
  their average over tasks."""
  columns = [*tasks, "average"]
  lines = [
    "| model | " + " | ".join(f"{c} (NLL / EM / RL)" for c in columns) + " |",
    "|---" * (len(columns) + 1) + "|",
  ]
  for label, summary in rows.items():
    cells = [summary["tasks"][t] for t in tasks] + [summary["average"]]
    shown = [" / ".join(f"{c[k]:.3f}" for k in HEADLINE) for c in cells]
    lines.append(f"| {label} | " + " | ".join(shown) + " |")
  return "\n".join(lines)


def cosine_table(cosines: Mapping[str, Sequence[dict]], tasks: Sequence[str]) -> str:
  """A Markdown table of each pair's gradient cosine per optimizer: its mean over the run's
  measurements and its last value."""
  pairs = list(itertools.combinations(range(len(tasks)), 2))
  header = " | ".join(f"{tasks[i]} / {tasks[j]}" for i, j in pairs)
  lines = [f"| optimizer | {header} |", "|---" * (len(pairs) + 1) + "|"]
  for name, records in cosines.items():
    matrices = np.asarray([r["matrix"] for r in records])
    cells = [f"{matrices[:, i, j].mean():+.3f} (last {matrices[-1, i, j]:+.3f})" for i, j in pairs]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_results(rows: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], path) -> None:
  """Grouped bars: one panel per headline metric, one group per task (and the average),
  one bar per model."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  columns = [*tasks, "average"]
  fig, axes = plt.subplots(1, len(HEADLINE), figsize=(5 * len(HEADLINE), 3.6))
  width = 0.8 / len(rows)
  for axis, key in zip(axes, HEADLINE):
    for n, (label, summary) in enumerate(rows.items()):
      values = [summary["tasks"][t][key] for t in tasks] + [summary["average"][key]]
      axis.bar(np.arange(len(columns)) + n * width, values, width, label=label)
    axis.set_xticks(np.arange(len(columns)) + width * (len(rows) - 1) / 2, columns)
    axis.set_title(key)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="upper center", ncol=len(rows), fontsize=8)
  fig.tight_layout(rect=(0, 0, 1, 0.9))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_cosines(cosines: Mapping[str, Sequence[dict]], tasks: Sequence[str], path) -> None:
  """The gradient cosine of every pair of tasks over the run: one panel per pair, one line
  per optimizer (below 0: the tasks' gradients conflict)."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  pairs = list(itertools.combinations(range(len(tasks)), 2))
  fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 3.4), squeeze=False)
  for axis, (i, j) in zip(axes[0], pairs):
    for name, records in cosines.items():
      steps = [r["step"] for r in records]
      axis.plot(steps, [r["matrix"][i][j] for r in records], marker=".", label=name)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_title(f"cos(grad {tasks[i]}, grad {tasks[j]})", fontsize=9)
    axis.set_xlabel("step")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(config: RunConfig, tasks, rows, cosines, seconds) -> str:
  mt = config.multitask
  setting = (
    f"{config.training.steps} steps, batch {config.data.batch_size}, learning rate "
    f"{config.optimizer.learning_rate}; steps per task {list(mt.per_task('steps'))}, "
    f"lr ratios {list(mt.per_task('lr_ratios'))}, coefficients {list(mt.per_task('coeffs'))}"
  )
  times = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
  return (
    f"# Multi-task learning: {', '.join(tasks)}\n\n{setting}. Adam trains on the weighted "
    "sum of the task losses (one batch of every task per step); DualOptim and DualOptim+ "
    "serve one task per step, in the schedule.\n\n"
    f"## Held-out results (NLL / exact match / ROUGE-L recall)\n\n{report_table(rows, tasks)}"
    f"\n\n## Gradient cosines between tasks (Figure 2)\n\nMean over the measurements every "
    f"{config.training.diagnostics_every} steps (last value):\n\n{cosine_table(cosines, tasks)}"
    f"\n\nTraining time: {times}.\n\n![results](multitask_results.png)\n\n"
    "![cosines](multitask_cosines.png)\n"
  )
