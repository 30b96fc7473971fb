"""The experiment report: a comparison table (Markdown) and plots (PNG)."""

from __future__ import annotations

import pathlib
from typing import Any

import matplotlib

from dualoptax import FORGET, RETAIN

matplotlib.use("Agg")  # files only; no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = (
  "model",
  "forget quality",
  "forget efficacy",
  "model utility",
  "ranking score",
  "seconds",
  "optimizer state bytes",
)


def row(
  label: str, summary: dict[str, Any], seconds: float | None = None, state_bytes: int | None = None
) -> dict[str, Any]:
  """One table row from an evaluation summary."""
  return {
    "model": label,
    "forget quality": summary.get("forget_quality"),
    "forget efficacy": summary.get("forget_efficacy"),
    "model utility": summary.get("model_utility"),
    "ranking score": summary.get("ranking_score"),
    "seconds": seconds,
    "optimizer state bytes": state_bytes,
  }


def _fmt(value: Any) -> str:
  if value is None:
    return "–"
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
  return str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def _save(fig: Any, path: pathlib.Path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_losses(histories: dict[str, list[dict]], path: pathlib.Path) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for label, history in histories.items():
    for ax, objective, key in ((axes[0], FORGET, "loss"), (axes[1], RETAIN, "nll")):
      # A joint step (objective -1) serves both objectives.
      points = [(h["step"], h[key]) for h in history if h["objective"] in (objective, -1)]
      if label.startswith("adam") and objective == FORGET:
        points = [(h["step"], h["forget_nll"]) for h in history if "forget_nll" in h]
      if points:
        ax.plot(*zip(*points), label=label)
  axes[0].set(title="forget objective (loss; Adam: forget NLL)", xlabel="step")
  axes[1].set(title="retain NLL", xlabel="step")
  axes[0].legend()
  _save(fig, path)


def _plot_conflict(histories: dict[str, list[dict]], path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for label, history in histories.items():
    grads = [(h["step"], h["gradient_cosine"]) for h in history if "gradient_cosine" in h]
    updates = [(h["step"], h["update_cosine"]) for h in history if "update_cosine" in h]
    if updates:
      ax.plot(*zip(*updates), marker="o", label=f"{label}: update terms")
    if grads and label.startswith("dualoptim_plus") and "8-bit" not in label:
      ax.plot(*zip(*grads), linestyle="--", color="gray", label="raw gradients")
  ax.axhline(0.0, color="black", linewidth=0.5)
  ax.set(title="forget vs retain cosine similarity", xlabel="step", ylabel="cosine")
  ax.legend(fontsize=8)
  _save(fig, path)


def _plot_tradeoff(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  for r in rows:
    if r["forget efficacy"] is not None and r["model utility"] is not None:
      ax.scatter(r["model utility"], r["forget efficacy"], s=40)
      ax.annotate(r["model"], (r["model utility"], r["forget efficacy"]), fontsize=8)
  ax.set(xlabel="model utility", ylabel="forget efficacy", title="unlearning trade-off")
  _save(fig, path)


def write(
  out: pathlib.Path, rows: list[dict[str, Any]], histories: dict[str, list[dict]]
) -> pathlib.Path:
  """Writes ``report.md`` and the plots under ``out``; returns the report's path."""
  plots = out / "plots"
  plots.mkdir(parents=True, exist_ok=True)
  _plot_losses(histories, plots / "losses.png")
  _plot_conflict(histories, plots / "conflict_cosine.png")
  _plot_tradeoff(rows, plots / "tradeoff.png")
  path = out / "report.md"
  path.write_text(
    "# Unlearning report\n\n" + markdown(rows) + "\n\n"
    "![losses](plots/losses.png)\n\n![conflict](plots/conflict_cosine.png)\n\n"
    "![trade-off](plots/tradeoff.png)\n"
  )
  return path
