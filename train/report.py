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
  _legend(axes[0])
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
  _legend(ax, fontsize=8)
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
  text = (
    "# Unlearning report\n\n" + markdown(rows) + "\n\n"
    "![losses](plots/losses.png)\n\n![conflict](plots/conflict_cosine.png)\n\n"
    "![trade-off](plots/tradeoff.png)\n"
  )
  runs = {label: [history] for label, history in histories.items()}
  constrained = constraint_keys(runs)
  if constrained:
    plot_scalars_over_steps(runs, constrained, plots / "constraint.png", "constraint")
    text += "\n![constraint](plots/constraint.png)\n"
  path = out / "report.md"
  path.write_text(text)
  return path


CONSTRAINT_KEYS = ("multiplier", "slack", "last_forget_loss", "last_retain_loss")
"""What primal-dual runs log each step (``train.program.step``): the multiplier lambda, the
slack ``bound - retain loss`` and the last loss seen of each objective."""


def constraint_keys(histories: dict[str, list[list[dict]]]) -> list[str]:
  """The :data:`CONSTRAINT_KEYS` some run logged (none: no constrained run)."""
  logged = {k for runs in histories.values() for run in runs for h in run for k in h}
  return [k for k in CONSTRAINT_KEYS if k in logged]


# ---------------------------------------------------------------- sweeps over seeds
# (train/sweep.py): mean ± std over seeds, error bars, cosines over steps, per-layer
# gradient cosines.

HEADLINE_KEYS = ("forget_quality", "model_utility", "forget_efficacy", "ranking_score")
SET_KEYS = ("probability", "rouge_l_recall", "truth_ratio")


def headline_keys(summaries: list[dict[str, Any]]) -> list[str]:
  """The summary numbers a sweep reports: the TOFU/paper aggregates, then every numeric
  ``paper_*`` key (the paper's own forget efficacy and utility, where the evaluator has
  them) and any ``*condition*`` fraction."""
  extra = sorted(
    {
      k
      for s in summaries
      for k, v in s.items()
      if (k.startswith("paper_") or "condition" in k) and isinstance(v, (int, float))
    }
  )
  return list(HEADLINE_KEYS) + [k for k in extra if k not in HEADLINE_KEYS]


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
  """``(mean, std, n)`` of the non-missing values; std is the sample std (ddof=1), 0 for
  one value, None for none."""
  import numpy as np  # noqa: PLC0415

  kept = [float(v) for v in values if v is not None]
  if not kept:
    return None, None, 0
  std = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
  return float(np.mean(kept)), std, len(kept)


def _set_values(summary: dict[str, Any]) -> dict[str, float | None]:
  return {
    f"{name}/{key}": values.get(key)
    for name, values in summary.get("sets", {}).items()
    for key in SET_KEYS
  }


def aggregate(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
  """Per ``(loss, variant)``: ``{metric: (mean, std, n)}`` over seeds of the summaries'
  headline keys, per-set scores (``set/key``) and the run timings."""
  summaries = [r["summary"] for r in records]
  keys = headline_keys(summaries)
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in records:
    groups.setdefault((r["loss"], r["variant"]), []).append(r)
  out = {}
  for group, runs in groups.items():
    values: dict[str, list] = {}
    for r in runs:
      flat = {k: r["summary"].get(k) for k in keys} | _set_values(r["summary"])
      flat |= {k: r.get(k) for k in ("unlearn_seconds", "eval_seconds", "state_bytes")}
      for k, v in flat.items():
        values.setdefault(k, []).append(v if isinstance(v, (int, float)) else None)
    out[group] = {k: mean_std(v) for k, v in values.items()}
    out[group]["seeds"] = sorted(r["seed"] for r in runs)
  return out


def pm(stats: tuple[float | None, float | None, int] | None, spec: str | None = None) -> str:
  """``mean ± std`` (``–`` if missing; the mean alone for one value, which has no spread to
  state), by :func:`_fmt` or the format ``spec``."""
  if stats is None or stats[0] is None:
    return "–"
  fmt = (lambda x: f"{x:{spec}}") if spec is not None else _fmt
  return fmt(stats[0]) if stats[2] == 1 else f"{fmt(stats[0])} ± {fmt(stats[1])}"


def _legend(ax: Any, **kwargs: Any) -> None:
  """A legend if anything is labelled (matplotlib warns on an empty one)."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend(**kwargs)


def seed_table(
  aggregated: dict[tuple[str, str], dict[str, Any]], loss: str, keys: list[str]
) -> str:
  """One loss's Markdown table: a row per variant, ``mean ± std`` over its seeds."""
  head = ["variant", "seeds"] + [k.replace("_", " ") for k in keys]
  head += ["unlearn s", "eval s", "optimizer state bytes"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for (group_loss, variant), stats in aggregated.items():
    if group_loss != loss:
      continue
    cells = [variant, str(len(stats["seeds"]))] + [pm(stats.get(k)) for k in keys]
    cells += [pm(stats.get("unlearn_seconds"), ".0f"), pm(stats.get("eval_seconds"), ".0f")]
    state = stats.get("state_bytes")
    cells.append("–" if not state or state[0] is None else f"{int(state[0]):,}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def per_set_table(aggregated: dict[tuple[str, str], dict[str, Any]], loss: str) -> str:
  """One loss's per-set scores (probability, ROUGE-L recall, truth ratio), mean ± std."""
  columns = sorted(
    {k for (group_loss, _), s in aggregated.items() if group_loss == loss for k in s if "/" in k}
  )
  lines = ["| variant | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
  for (group_loss, variant), stats in aggregated.items():
    if group_loss == loss:
      lines.append(f"| {variant} | " + " | ".join(pm(stats.get(c)) for c in columns) + " |")
  return "\n".join(lines)


def read_history(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """A run's ``metrics.jsonl`` (empty if absent)."""
  import json  # noqa: PLC0415

  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _color(variants: list[str], variant: str) -> Any:
  return plt.get_cmap("tab10")(variants.index(variant) % 10 if variant in variants else 0)


def plot_tradeoff_errorbars(
  aggregated: dict[tuple[str, str], dict[str, Any]],
  loss: str,
  path: pathlib.Path,
  references: dict[str, dict[str, Any]] | None = None,
  x_key: str = "model_utility",
  y_key: str = "forget_efficacy",
) -> None:
  """Forget efficacy against model utility, one point per variant with ±std error bars
  over seeds; the target and the oracle as reference markers."""
  variants = [v for (group_loss, v) in aggregated if group_loss == loss]
  fig, ax = plt.subplots(figsize=(6.5, 5))
  for variant in variants:
    stats = aggregated[(loss, variant)]
    x, y = stats.get(x_key, (None,) * 3), stats.get(y_key, (None,) * 3)
    if x[0] is None or y[0] is None:
      continue
    ax.errorbar(
      x[0],
      y[0],
      xerr=x[1],
      yerr=y[1],
      fmt="o",
      capsize=4,
      color=_color(variants, variant),
      label=f"{variant} (n={x[2]})",
    )
  for name, summary in (references or {}).items():
    if summary.get(x_key) is not None and summary.get(y_key) is not None:
      ax.scatter(summary[x_key], summary[y_key], marker="*", s=120, color="gray")
      ax.annotate(name, (summary[x_key], summary[y_key]), fontsize=8)
  ax.set(
    xlabel=x_key.replace("_", " "),
    ylabel=y_key.replace("_", " "),
    title=f"{loss}: trade-off (mean ± std over seeds)",
  )
  _legend(ax, fontsize=7)
  _save(fig, path)


def _mean_curves(histories: list[list[dict]], key: str) -> tuple[list[int], list[float], list]:
  """Steps, mean and std over runs of ``key`` where every run that has it logged it."""
  import numpy as np  # noqa: PLC0415

  by_step: dict[int, list[float]] = {}
  for history in histories:
    for h in history:
      if isinstance(h.get(key), (int, float)):
        by_step.setdefault(h["step"], []).append(float(h[key]))
  steps = sorted(by_step)
  return (
    steps,
    [float(np.mean(by_step[s])) for s in steps],
    [float(np.std(by_step[s])) for s in steps],
  )


COSINE_KEYS = (
  ("update_cosine", "-", "update terms"),
  ("preconditioned_cosine", ":", "preconditioned"),
  ("gradient_cosine", "--", "raw gradients"),
)


def plot_cosines_over_steps(
  histories: dict[str, list[list[dict]]], path: pathlib.Path, title: str
) -> None:
  """The paper's Figure 2: forget-vs-retain cosines over steps per variant (mean over
  seeds, shaded ±std): the update terms, the preconditioned ones and the raw gradients."""
  variants = list(histories)
  fig, axes = plt.subplots(1, len(COSINE_KEYS), figsize=(5 * len(COSINE_KEYS), 4), sharey=True)
  for ax, (key, style, name) in zip(axes, COSINE_KEYS):
    for variant, runs in histories.items():
      steps, mean, std = _mean_curves(runs, key)
      if not steps:
        continue
      color = _color(variants, variant)
      ax.plot(steps, mean, style, marker="o", markersize=3, color=color, label=variant)
      low = [m - s for m, s in zip(mean, std)]
      ax.fill_between(steps, low, [m + s for m, s in zip(mean, std)], color=color, alpha=0.15)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set(title=f"{name} ({key})", xlabel="step")
  axes[0].set_ylabel("cosine (forget vs retain)")
  _legend(axes[0], fontsize=7)
  fig.suptitle(title)
  _save(fig, path)


def layer_of(path: str) -> int | None:
  """The decoder layer index in a parameter path (``...['layers'][3]...``), else None."""
  import re  # noqa: PLC0415

  match = re.search(r"layers\W{0,4}(\d+)", path)
  return int(match.group(1)) if match else None


def layer_cosines(history: list[dict]) -> tuple[list[int], list[int], Any]:
  """``(steps, layers, matrix[layer, step])``: the mean forget/retain gradient cosine of
  each decoder layer's leaves at each diagnostics step (NaN where absent)."""
  import numpy as np  # noqa: PLC0415

  rows = [h for h in history if isinstance(h.get("gradient_cosine_per_leaf"), dict)]
  per_step = []
  for h in rows:
    by_layer: dict[int, list[float]] = {}
    for leaf, value in h["gradient_cosine_per_leaf"].items():
      layer = layer_of(leaf)
      if layer is not None and value is not None:
        by_layer.setdefault(layer, []).append(float(value))
    per_step.append({k: float(np.mean(v)) for k, v in by_layer.items()})
  layers = sorted({k for d in per_step for k in d})
  matrix = np.full((len(layers), len(rows)), np.nan)
  for j, d in enumerate(per_step):
    for i, layer in enumerate(layers):
      matrix[i, j] = d.get(layer, np.nan)
  return [h["step"] for h in rows], layers, matrix


def plot_layer_cosines(
  histories: dict[str, list[list[dict]]], path: pathlib.Path, title: str
) -> None:
  """Per variant: a heat map of the per-layer gradient cosine over diagnostics steps (mean
  over seeds), and the histogram of the per-layer values at the first and last step."""
  import numpy as np  # noqa: PLC0415

  variants = [v for v, runs in histories.items() if any(layer_cosines(r)[1] for r in runs)]
  if not variants:
    return
  fig, axes = plt.subplots(2, len(variants), figsize=(3.6 * len(variants), 7), squeeze=False)
  for k, variant in enumerate(variants):
    tables = [layer_cosines(r) for r in histories[variant]]
    tables = [t for t in tables if t[1]]
    steps, layers = tables[0][0], tables[0][1]
    same = [t[2] for t in tables if t[2].shape == tables[0][2].shape]
    matrix = np.nanmean(np.stack(same), axis=0)
    image = axes[0, k].imshow(
      matrix,
      aspect="auto",
      origin="lower",
      cmap="coolwarm",
      vmin=-1,
      vmax=1,
      extent=(0.5, len(steps) + 0.5, layers[0] - 0.5, layers[-1] + 0.5),
    )
    axes[0, k].set_xticks(range(1, len(steps) + 1), [str(s) for s in steps], fontsize=7)
    axes[0, k].set(title=variant, xlabel="step", ylabel="layer" if k == 0 else None)
    bins = np.linspace(-1, 1, 21)
    axes[1, k].hist(matrix[:, 0], bins=bins, alpha=0.6, label=f"step {steps[0]}")
    axes[1, k].hist(matrix[:, -1], bins=bins, alpha=0.6, label=f"step {steps[-1]}")
    axes[1, k].set(xlabel="per-layer gradient cosine", ylabel="layers" if k == 0 else None)
    _legend(axes[1, k], fontsize=7)
  fig.colorbar(image, ax=axes[0, :].tolist(), shrink=0.8)
  fig.suptitle(title)
  fig.savefig(path, dpi=110)
  plt.close(fig)


# Per-step keys about DualOptim+'s conditioning: the fractions of elements whose
# denominator is cancelled or floored, the largest update entry (with and without a floor).
CONDITIONING_WORDS = ("condition", "fraction", "max_update", "unguarded")


def conditioning_keys(histories: dict[str, list[list[dict]]]) -> list[str]:
  """Per-step scalar keys about ill-conditioning (:data:`CONDITIONING_WORDS`), if any."""
  return sorted(
    {
      k
      for runs in histories.values()
      for run in runs
      for h in run
      for k, v in h.items()
      if any(word in k for word in CONDITIONING_WORDS)
      and "cosine" not in k
      and isinstance(v, (int, float))
    }
  )


def plot_scalars_over_steps(
  histories: dict[str, list[list[dict]]], keys: list[str], path: pathlib.Path, title: str
) -> None:
  """Logged scalars over steps, one panel per key, one line per variant (mean over seeds,
  shaded ±std); a log scale for the largest-update keys."""
  variants = list(histories)
  cols = min(4, len(keys))
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    for variant, runs in histories.items():
      steps, mean, std = _mean_curves(runs, key)
      if steps:
        color = _color(variants, variant)
        ax.plot(steps, mean, marker="o", markersize=3, color=color, label=variant)
        low = [m - s for m, s in zip(mean, std)]
        ax.fill_between(steps, low, [m + s for m, s in zip(mean, std)], color=color, alpha=0.15)
    if "max_" in key or "unguarded" in key:  # spans decades; zero at a warmup step
      positive = all(y > 0 for line in ax.get_lines() for y in line.get_ydata())
      ax.set_yscale("log") if positive else ax.set_yscale("symlog", linthresh=1e-8)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step")
  for ax in list(axes.flat)[len(keys) :]:
    ax.axis("off")
  # One legend for the figure, from the panel with the most variants.
  handles, labels = max(
    (ax.get_legend_handles_labels() for ax in axes.flat), key=lambda h: len(h[0])
  )
  if handles:
    fig.legend(handles, labels, loc="lower right", fontsize=7)
  fig.suptitle(title)
  _save(fig, path)


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def _fmt_seconds(seconds: float | None) -> str:
  return "–" if seconds is None else f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def _finetune_lines(collected: dict[str, Any]) -> list[str]:
  """The fine-tuning and reference-evaluation facts of a sweep."""
  lines = []
  reference = collected.get("reference") or {}
  for role, record in (collected.get("finetune") or {}).items():
    if not record or "given" in record:
      lines.append(
        f"- {role}: " + (f"given ({record['given']})" if record else "not fine-tuned yet")
      )
      continue
    evaluated = reference.get(role) or {}
    probability = evaluated.get("forget_probability")
    speed = record.get("padded_tokens_per_second")
    lines.append(
      f"- {role}: {record.get('questions')} questions, {record.get('steps')} steps in "
      f"{_fmt_seconds(record.get('seconds'))}, {'–' if speed is None else f'{speed:.0f}'} "
      f"(padded) tokens/s; forget-set probability "
      f"{'–' if probability is None else f'{probability:.3f}'}; evaluation "
      f"{_fmt_seconds(evaluated.get('eval_seconds'))}"
    )
  return lines


def _settings_lines(settings: dict[str, Any] | None) -> list[str]:
  """The sweep's settings (its file is copied beside the report, with the reasons)."""
  if not settings:
    return []
  lines = ["### Settings", "", "The sweep file with the reason for each choice: `sweep.yaml`."]
  if settings.get("overrides"):
    lines.append(f"Command-line overrides: `{' '.join(settings['overrides'])}`.")
  lines += ["", "| setting | value |", "|---|---|"]
  flat = {
    "data_path": settings.get("data_path"),
    "model_fetch": settings.get("model_fetch"),
    **{f"base.{k}": v for k, v in settings.get("base", {}).items()},
    **{f"finetune.{k}": v for k, v in settings.get("finetune", {}).items()},
    "seeds": settings.get("seeds"),
  }
  lines += [f"| {k} | `{v}` |" for k, v in flat.items()]
  lines += ["", "Variants: " + "; ".join(f"{k}: `{v}`" for k, v in settings["variants"].items())]
  return lines + [""]


def _reference_table(reference: dict[str, Any], keys: list[str]) -> str:
  head = ["model"] + [k.replace("_", " ") for k in keys]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for role in ("target", "oracle"):
    summary = (reference.get(role) or {}).get("summary")
    if summary:
      lines.append(f"| {role} | " + " | ".join(_fmt(summary.get(k)) for k in keys) + " |")
  return "\n".join(lines)


def paper_efficacy_key(loss: str) -> str:
  """The paper's forget efficacy for a loss: targeted for losses that teach a refusal
  (IDK, DPO), untargeted otherwise."""
  forget = loss.split("+")[0].upper()
  return f"paper_{'targeted' if forget in ('IDK', 'DPO') else 'untargeted'}_forget_efficacy"


def _histories_by_variant(runs: list[dict[str, Any]], loss: str) -> dict[str, list[list[dict]]]:
  out: dict[str, list[list[dict]]] = {}
  for r in runs:
    if r["loss"] == loss:
      out.setdefault(r["variant"], []).append(read_history(r.get("metrics_path", "")))
  return out


def _loss_section(collected, aggregated, loss, keys, plots, references) -> list[str]:
  """The Markdown of one loss: tables and the plots, which it writes into ``plots``."""
  slug = _slug(loss)
  histories = _histories_by_variant(collected["runs"], loss)
  plot_tradeoff_errorbars(aggregated, loss, plots / f"tradeoff_{slug}.png", references)
  paper = paper_efficacy_key(loss)
  has_paper = any(
    (s.get(paper) or (None,))[0] is not None for (g, _), s in aggregated.items() if g == loss
  )
  if has_paper:
    plot_tradeoff_errorbars(
      aggregated,
      loss,
      plots / f"tradeoff_paper_{slug}.png",
      references,
      x_key="paper_model_utility",
      y_key=paper,
    )
  plot_cosines_over_steps(histories, plots / f"cosines_{slug}.png", f"{loss}: Figure 2 cosines")
  plot_layer_cosines(histories, plots / f"layer_cosines_{slug}.png", f"{loss}: per-layer cosine")
  parts = [
    f"## {loss}",
    "",
    seed_table(aggregated, loss, keys),
    "",
    "Per-set scores:",
    "",
    per_set_table(aggregated, loss),
    "",
    f"![trade-off](plots/tradeoff_{slug}.png)",
    "",
    *([f"![paper trade-off](plots/tradeoff_paper_{slug}.png)", ""] if has_paper else []),
    f"![cosines](plots/cosines_{slug}.png)",
    "",
  ]
  if (plots / f"layer_cosines_{slug}.png").exists():
    parts += [f"![per-layer cosines](plots/layer_cosines_{slug}.png)", ""]
  constrained = constraint_keys(histories)
  if constrained:
    name = f"constraint_{slug}.png"
    title = f"{loss}: multiplier lambda, slack and losses per step"
    plot_scalars_over_steps(histories, constrained, plots / name, title)
    parts += [f"![constraint](plots/{name})", ""]
  per_step = conditioning_keys(histories)
  if per_step:
    name = f"conditioning_{slug}.png"
    plot_scalars_over_steps(histories, per_step, plots / name, f"{loss}: conditioning per step")
    parts += [f"![conditioning](plots/{name})", ""]
  return parts


def write_sweep(out: pathlib.Path, collected: dict[str, Any]) -> pathlib.Path:
  """Writes a sweep's report: ``report.md``, ``plots/*.png`` and ``results.json`` (the
  aggregates and every run's record) under ``out``; returns the Markdown's path.

  ``collected`` is :func:`train.sweep.collect`'s result (runs with ``variant``, ``loss``,
  ``seed``, ``summary``, timings and ``metrics_path``; ``finetune``; ``reference``) plus
  ``wall_seconds``, ``sweep``, ``losses``.
  """
  import json  # noqa: PLC0415

  plots = out / "plots"
  plots.mkdir(parents=True, exist_ok=True)
  runs = collected["runs"]
  aggregated = aggregate(runs) if runs else {}
  keys = headline_keys([r["summary"] for r in runs])
  reference = collected.get("reference") or {}
  references = {
    role: (reference.get(role) or {}).get("summary") or {} for role in ("target", "oracle")
  }
  compute = sum(r.get("unlearn_seconds", 0) + r.get("eval_seconds", 0) for r in runs)
  compute += sum((f or {}).get("seconds", 0) for f in (collected.get("finetune") or {}).values())
  compute += sum((reference.get(role) or {}).get("eval_seconds", 0) for role in references)
  parts = [
    f"# Replication sweep: {collected.get('sweep', '')}",
    "",
    f"{len(runs)} of {collected.get('planned', len(runs))} unlearning runs complete. "
    f"Wall time of the last invocation: {_fmt_seconds(collected.get('wall_seconds'))}; "
    f"compute summed over all stages: {_fmt_seconds(compute)}.",
    "",
    "Mean ± sample std over seeds (the value alone where one seed is complete).",
    "",
    "### Fine-tuning and reference models",
    "",
    *_finetune_lines(collected),
    "",
    _reference_table(reference, keys),
    "",
  ]
  parts += _settings_lines(collected.get("settings"))
  for loss in collected.get("losses") or sorted({r["loss"] for r in runs}):
    parts += _loss_section(collected, aggregated, loss, keys, plots, references)
  path = out / "report.md"
  path.write_text("\n".join(parts))
  results = {
    "aggregated": [
      {"loss": loss, "variant": variant, **stats} for (loss, variant), stats in aggregated.items()
    ],
    **{k: v for k, v in collected.items() if k != "reference"},
    "reference": {role: (reference.get(role) or {}) for role in ("target", "oracle")},
  }
  (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
  return path
