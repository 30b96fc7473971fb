"""The experiment of the two-objective scenarios besides TOFU (real-world unlearning,
safety alignment): evaluate the model, run the unlearning stage on the scenario's data,
evaluate again, and write a before/after table."""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

from train.config import RunConfig, save_config

Evaluate = Callable[[RunConfig, Any, Any, Any, pathlib.Path], dict[str, Any]]
"""``evaluate(config, model, params, tokenizer, out_dir) -> summary``."""


def report_table(rows: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> str:
  """A Markdown table: one row per evaluated model, one column per key ("–": missing)."""
  lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for label, summary in rows.items():
    cells = ("–" if summary.get(k) is None else f"{summary[k]:.3f}" for k in keys)
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run(
  config: RunConfig,
  evaluate: Evaluate,
  keys: tuple[str, ...],
  report_file: str,
  title: Callable[[RunConfig], str],
) -> dict[str, Any]:
  """Evaluates ``config.model``, runs the unlearning stage on the scenario's two
  objectives (``train.scenarios.load_splits``), evaluates the result; writes
  ``report_file`` (``# title(config)``, read once the data are in place, and the table of
  ``keys``), ``results.json``, the model
  and both evaluations (``eval_before/``, ``eval/``) under ``config.output_dir``."""
  from train import program, scenarios  # noqa: PLC0415 (jax-heavy)
  from train.program.modeling import FunctionalModel, build_model, save_model  # noqa: PLC0415

  out = pathlib.Path(config.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_config(config, out / "config.yaml")
  began = time.perf_counter()
  tokenizer, data_dir = scenarios.prepare_data(config)
  splits = scenarios.load_splits(config, data_dir)
  print(f"data: {len(splits.forget)} {splits.forget_split} / {len(splits.retain)} "
        f"{splits.retain_split} rows")  # fmt: skip
  module, model_config = build_model(config.model, tokenizer, seed=config.training.seed)
  model, params = FunctionalModel.split(module, model_config)
  rows = {"before": evaluate(config, model, params, tokenizer, out / "eval_before")}
  streams = program.make_streams(config, splits, tokenizer, config.loss.build())
  result = program.unlearn(config, model, params, params, *streams, out)
  label = f"after {config.training.steps} steps ({config.optimizer.name}, {config.loss.name})"
  rows[label] = evaluate(config, result.model, result.params, tokenizer, out / "eval")
  save_model(result.model, result.params, str(out / "model"), tokenizer)
  table = report_table(rows, keys)
  (out / report_file).write_text(f"# {title(config)}\n\n{table}\n")
  (out / "results.json").write_text(json.dumps(rows, indent=1))
  print(f"{table}\n\nreport: {out / report_file} ({time.perf_counter() - began:.0f} s)")
  return {"rows": rows, "history": result.history}
