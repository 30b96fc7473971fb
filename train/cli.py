"""The unlearning program's command line (``python train/run.py`` or, installed,
``dualoptax-unlearn``).

    dualoptax-unlearn                            # the default experiment, self-contained
    dualoptax-unlearn unlearn [config.yaml] [section.key=value ...]
    dualoptax-unlearn finetune [config.yaml] [section.key=value ...]
    dualoptax-unlearn evaluate [config.yaml] [section.key=value ...]
    dualoptax-unlearn continual [config.yaml] [section.key=value ...]
    dualoptax-unlearn sweep sweep.yaml [key.path=value ...] [--dry-run | --report-only]

With no arguments it generates a small fictitious-author benchmark, trains a tiny model on
it, unlearns the forget split with Adam, DualOptim, DualOptim+ and DualOptim+ 8-bit from
the same start, evaluates all of them and prints a comparison table (see
``train/experiment.py``). The subcommands run one stage on any model and data:
``model.path`` is a local Hugging Face folder (e.g. a Phi-1.5 fine-tuned on TOFU) or GGUF file,
``data.path`` a TOFU-format folder. Settings are described in ``train/config.py``;
``unlearn`` resumes from the run folder's latest checkpoint.

``continual`` (``train/scenarios/continual.py``) unlearns ``continual.task_ids`` one after
another from the model each task leaves, evaluating after each, and resumes inside the
task a killed run was in.

``scenario=safety`` (``train/scenarios/safety.py``) swaps the data and the evaluation: the
two objectives are refusals to harmful instructions and answers to ordinary ones, both
descended (``loss.name=SFT+GD``), and ``evaluate`` / ``experiment`` report refusal rates
(``python train/run.py experiment configs/safety_tiny.yaml``).

``sweep`` runs a replication sweep (``train/sweep.py``): target and oracle fine-tuning,
unlearning with every variant, loss and seed of the sweep file, evaluation and a report
with mean ± std over seeds. Each stage is cached under a hash of its full configuration,
so an interrupted sweep continues where it stopped; ``--dry-run`` lists the stages and
which are cached, ``--report-only`` rewrites the report from the complete ones.

LoRA (``unlearn`` only): ``model.lora.enabled=true`` trains adapters (rank 8, alpha 32,
dropout 0.05 by default, the paper's setting) on the frozen model, which also serves as the
reference model; checkpoints hold the adapters and their optimizer state, and the exported
``model/`` has the adapters merged into its weights.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import traceback

from train.config import ConfigError, RunConfig, apply_overrides, load_config, save_config

COMMANDS = ("experiment", "finetune", "unlearn", "evaluate", "continual", "sweep")
ERROR_LOG = "error.log"  # in the run folder: the traceback of a failed run


def _stage(command: str, config: RunConfig, fresh: bool = False, override: bool = False) -> None:
  """Runs one stage in ``config.output_dir``, holding the folder's lock (process 0 of a
  multi-host job takes it); ``unlearn`` first checks the folder's saved config against
  ``config`` (:func:`train.runtime.run_guard.check_resume`, with ``--fresh`` / ``--override``)."""
  from train import scenarios  # noqa: PLC0415
  from train.runtime import distributed, run_guard  # noqa: PLC0415

  scenarios.check_stage(command, config)
  if command == "finetune" and config.model.lora.enabled:
    raise ConfigError("model.lora.enabled applies to unlearn; finetune trains every weight")
  out = pathlib.Path(config.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  primary = distributed.is_primary()
  with run_guard.locked(out, take=primary):
    if command == "continual" and fresh:
      raise ConfigError("continual resumes task by task: for a fresh start use a new output_dir")
    if command == "unlearn" and primary:
      run_guard.check_resume(out, config, fresh=fresh, override=override)
    distributed.barrier("run_guard")
    if primary:
      save_config(config, out / "config.yaml")
    _run_stage(command, config, out, override)


def _run_stage(command: str, config: RunConfig, out: pathlib.Path, override: bool) -> None:
  if command == "continual":
    from train.scenarios import continual  # noqa: PLC0415

    continual.run(config, override=override)
    return
  from train import program, scenarios  # noqa: PLC0415 (heavy imports)
  from train.program.modeling import FunctionalModel, build_model, save_model  # noqa: PLC0415

  tokenizer, data_dir = scenarios.prepare_data(config)
  module, model_config = build_model(config.model, tokenizer, seed=config.training.seed)
  model, params = FunctionalModel.split(module, model_config)
  if command == "evaluate":
    summary = scenarios.evaluate(config, model, params, tokenizer, data_dir, out / "eval")
    print(scenarios.summary_line(config, summary, out / "eval"))
    return
  splits = scenarios.load_splits(config, data_dir)
  loss_config = config.loss.build()
  forget_stream, retain_stream = program.make_streams(config, splits, tokenizer, loss_config)
  if command == "finetune":
    params = program.finetune(
      model, params, retain_stream, config.training.steps, config.optimizer.learning_rate
    )
  else:
    result = program.unlearn(config, model, params, params, forget_stream, retain_stream, out)
    model, params = result.model, result.params  # with LoRA: the adapted model
    print(
      f"unlearned {config.training.steps} steps in {result.seconds:.1f} s; "
      f"optimizer state {result.state_bytes:,} bytes; metrics in {out / 'metrics.jsonl'}"
    )
  save_model(model, params, str(out / "model"), tokenizer)
  print(f"model written to {out / 'model'}")


def _sweep(path: str | None, overrides: list[str], dry_run: bool, report_only: bool) -> int:
  from train import sweep  # noqa: PLC0415 (heavy imports)

  if path is None:
    raise ConfigError("sweep needs a sweep file: python train/run.py sweep SWEEP.yaml")
  spec = sweep.load_sweep(path, overrides)
  if report_only:
    planned = sweep.plan(spec)
    print(sweep.describe(spec, planned))
    print(f"report: {sweep.write_report(spec, planned, None)}")
    return 0
  sweep.run_sweep(spec, dry_run=dry_run)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description="LLM unlearning with DualOptim+ (dualoptax).",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__,
  )
  parser.add_argument("command", nargs="?", default="experiment", choices=COMMANDS)
  parser.add_argument("args", nargs="*", help="[config.yaml] then section.key=value overrides")
  parser.add_argument("--dry-run", action="store_true", help="sweep: list stages, run nothing")
  parser.add_argument("--report-only", action="store_true", help="sweep: rewrite the report")
  parser.add_argument(
    "--fresh",
    action="store_true",
    help="unlearn: move the run folder's checkpoints aside (checkpoints.old-<time>), start at 0",
  )
  parser.add_argument(
    "--override",
    action="store_true",
    help="unlearn: resume although the config differs from the saved one (logged)",
  )
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
    argv.insert(0, "experiment")  # `run.py key=value ...` configures the default experiment
  options = parser.parse_args(argv)
  config_path = None
  overrides = list(options.args)
  if overrides and "=" not in overrides[0]:
    config_path = overrides.pop(0)
  log_dir: list[pathlib.Path] = []  # where a failure's traceback goes, once it is known
  try:
    return _dispatch(options, config_path, overrides, log_dir)
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 (the cause in one line, the traceback in a file)
    return _report_failure(e, log_dir[-1] if log_dir else None)


def _dispatch(options, config_path, overrides, log_dir: list[pathlib.Path]) -> int:
  """Runs the command; appends the run folder to ``log_dir`` as soon as it is known."""
  from train.runtime import distributed  # noqa: PLC0415

  distributed.initialize_from_env()  # multi-host jobs; a no-op on one process
  if options.command == "sweep":
    return _sweep(config_path, overrides, options.dry_run, options.report_only)
  if options.command == "experiment":
    from train import experiment, scenarios  # noqa: PLC0415

    config = (
      load_config(config_path, overrides)
      if config_path
      else apply_overrides(experiment.default_config(), overrides)
    )
    log_dir.append(pathlib.Path(config.output_dir))
    scenarios.run_experiment(config)
  else:
    config = load_config(config_path, overrides)
    log_dir.append(pathlib.Path(config.output_dir))
    _stage(options.command, config, fresh=options.fresh, override=options.override)
  return 0


def _report_failure(error: BaseException, run_dir: pathlib.Path | None) -> int:
  """Prints one line naming the cause (the error's type and its message's first line) and
  writes the whole traceback to ``<run_dir>/error.log`` (or a temporary file); exit code 1.

  The library traceback of a failed run (orbax, tensorstore, asyncio) can run to screens
  and bury the cause; the user needs the cause, a developer the traceback."""
  text = "".join(traceback.format_exception(error))
  try:
    if run_dir is None:
      raise OSError("no run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / ERROR_LOG
    log.write_text(text)
  except OSError:  # an unwritable (or full) run folder must not hide the cause
    with tempfile.NamedTemporaryFile("w", suffix=".log", prefix="dualoptax-", delete=False) as f:
      f.write(text)
      log = pathlib.Path(f.name)
  message = (str(error).strip().splitlines() or [""])[0]
  print(f"error: {type(error).__name__}: {message} (traceback: {log})", file=sys.stderr)
  return 1
