"""What a run does, chosen by ``config.scenario``: its data, its evaluation and its
experiment. ``tofu`` (unlearning TOFU-format data) lives in ``train.program`` and
``train.experiment``; ``safety`` (alignment on refusals and utility answers) in
:mod:`train.scenarios.safety`; ``multitask`` (K tasks as K objectives, its own loop) in
:mod:`train.scenarios.multitask`, run by the ``experiment`` command only. The CLI's stages
reach them through these functions; :mod:`train.scenarios.continual` chains unlearning
runs of ``tofu`` or ``real_world``."""

from __future__ import annotations

import pathlib
from typing import Any

from train.config import ConfigError, RunConfig

STAGE_SCENARIOS = ("tofu", "real_world", "safety")
"""Scenarios the single stages (``unlearn``, ``evaluate``, ``finetune``) run."""


def check_stage(command: str, config: RunConfig) -> None:
  """Refuses a stage the scenario does not have, naming what does run it."""
  if command in ("unlearn", "evaluate", "finetune") and config.scenario not in STAGE_SCENARIOS:
    raise ConfigError(
      f"scenario={config.scenario} has no {command} stage: run it with "
      f"`python train/run.py experiment CONFIG` (stages run {list(STAGE_SCENARIOS)})"
    )


def prepare_data(config: RunConfig) -> tuple[Any, str]:
  """The run's tokenizer and data folder."""
  if config.scenario == "safety":
    from train.scenarios import safety  # noqa: PLC0415

    return safety.prepare_data(config)
  if config.scenario == "real_world":
    from train.scenarios import real_world  # noqa: PLC0415

    return real_world.prepare_data(config)
  from train import program  # noqa: PLC0415 (jax-heavy)

  return program.prepare_data(config)


def load_splits(config: RunConfig, data_dir: str) -> Any:
  """The two objectives' items (``train.data.TofuSplits``)."""
  if config.scenario == "safety":
    from train.scenarios import safety  # noqa: PLC0415

    return safety.load_splits(config)
  if config.scenario == "real_world":
    from train.scenarios import real_world  # noqa: PLC0415

    return real_world.load_splits(config, data_dir)
  from train import program  # noqa: PLC0415

  return program.load_splits(config, data_dir)


def evaluate(
  config: RunConfig, model: Any, params: Any, tokenizer: Any, data_dir: str, out: pathlib.Path
) -> dict[str, Any]:
  """Evaluates ``params`` into ``out`` (JSON files); returns the summary."""
  if config.scenario == "safety":
    from train.scenarios import safety  # noqa: PLC0415

    return safety.evaluate_safety(config, model, params, tokenizer, out)
  if config.scenario == "real_world":
    from train.scenarios import real_world  # noqa: PLC0415

    return real_world.evaluate_real_world(config, model, params, tokenizer, out)
  from train import program  # noqa: PLC0415

  return program.evaluate_params(config, model, params, tokenizer, data_dir, out)


def summary_line(config: RunConfig, summary: dict[str, Any], out: pathlib.Path) -> str:
  """One line naming the evaluation's headline numbers and where it was written."""
  if config.scenario in ("safety", "real_world"):
    from train.scenarios import real_world, safety  # noqa: PLC0415

    keys = (safety if config.scenario == "safety" else real_world).HEADLINE
    shown = ", ".join(f"{k} {_number(summary.get(k))}" for k in keys)
  else:
    shown = (
      f"model utility {summary['model_utility']}, forget efficacy {summary['forget_efficacy']}"
    )
  return f"evaluation written to {out}: {shown}"


def _number(value: Any) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def run_experiment(config: RunConfig) -> Any:
  """``python train/run.py experiment``: the scenario's whole experiment."""
  if config.scenario == "safety":
    from train.scenarios import safety  # noqa: PLC0415

    return safety.run(config)
  if config.scenario == "multitask":
    from train.scenarios import multitask  # noqa: PLC0415

    return multitask.run(config)
  if config.scenario == "real_world":
    from train.scenarios import real_world  # noqa: PLC0415

    return real_world.run(config)
  from train import experiment  # noqa: PLC0415

  return experiment.run(config)
