"""The default experiment (``python train/run.py`` with no arguments).

1. generate the embedded fictitious-author benchmark (TOFU layout) and a tokenizer for it;
2. fine-tune a tiny model on every fact (the TARGET model to unlearn from) and another on
   the retain facts only (the ORACLE, for forget quality);
3. from the same target, unlearn the forget split with Adam (joint loss), DualOptim,
   DualOptim+ and DualOptim+ 8-bit (alternating 1 forget step : 5 retain steps); with
   ``model.lora.enabled`` each of them trains LoRA adapters on the frozen target;
4. evaluate every model and print a comparison table; write the report and plots.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax

from train import program, report
from train.config import RunConfig, save_config
from train.data import tofu
from train.program.modeling import FunctionalModel, build_model, save_model

# (label, optimizer overrides, training overrides) of the compared runs.
VARIANTS = (
  ("adam (joint)", dict(name="adam"), dict(mode="joint")),
  ("dualoptim", dict(name="dualoptim"), {}),
  ("dualoptim_plus", dict(name="dualoptim_plus"), {}),
  ("dualoptim_plus 8-bit", dict(name="dualoptim_plus", state_bits=8), {}),
)


def default_config(output_dir: str = "runs/default") -> RunConfig:
  """The settings of the default experiment (fits a 2-core CPU in a few minutes)."""
  base = RunConfig()
  return dataclasses.replace(
    base,
    output_dir=output_dir,
    data=dataclasses.replace(
      base.data, forget_split="forget10", task_id=1, template="phi", max_length=64, batch_size=16
    ),
    optimizer=dataclasses.replace(
      base.optimizer, learning_rate=2e-4, forget_lr_ratio=1.0, weight_decay=0.0
    ),
    training=dataclasses.replace(
      base.training, steps=120, diagnostics_every=10, checkpoint_every=60
    ),
    eval=dataclasses.replace(base.eval, max_new_tokens=32, batch_size=32),
  ).validate()


def _variant_config(config: RunConfig, optimizer: dict, training: dict) -> RunConfig:
  return dataclasses.replace(
    config,
    optimizer=dataclasses.replace(config.optimizer, **optimizer),
    training=dataclasses.replace(config.training, **training),
  )


def _finetune_target_and_oracle(config, model, init_params, splits, tokenizer, data_dir, steps, lr):
  """The TARGET (fine-tuned on every fact) and the ORACLE (never saw the forget split).

  Both also learn the real-knowledge control facts, which stand in for what a pretrained
  model already knows: unlearning should leave them alone.
  """
  control = tuple(
    item
    for name in ("real_authors_perturbed", "world_facts_perturbed")
    for item in tofu.load_tofu(
      pathlib.Path(data_dir) / f"{name}.json", required_keys=tofu.OPTION_KEYS
    )
  )

  def finetune(retain, desc):  # plain NLL training on the retain stream of these facts
    facts = dataclasses.replace(splits, retain=retain)
    _, stream = program.make_streams(config, facts, tokenizer, config.loss.build())
    return program.finetune(model, init_params, stream, steps, lr, desc)

  target = finetune(splits.retain + splits.forget + control, "target")
  return target, finetune(splits.retain + control, "oracle")


def _evaluate_start(config, model, target, oracle, tokenizer, data_dir):
  """The report rows of the target and the oracle, and the oracle's per-item file (the
  retain reference of forget quality)."""
  out = pathlib.Path(config.output_dir) / "eval"
  oracle_summary = program.evaluate_params(
    config, model, oracle, tokenizer, data_dir, out / "oracle"
  )
  reference = str(out / "oracle" / "tofu_eval_items.json")
  target_summary = program.evaluate_params(
    config, model, target, tokenizer, data_dir, out / "target", reference
  )
  rows = [
    report.row("target (before unlearning)", target_summary),
    report.row("oracle (retain only)", oracle_summary),
  ]
  return rows, reference


def _unlearn_variant(config, label, model, target, splits, tokenizer, data_dir, reference):
  """Unlearns ``target`` with one variant's config and evaluates the result: its report row
  and its metrics history."""
  run_dir = pathlib.Path(config.output_dir) / "unlearn"
  run_dir = run_dir / label.replace(" ", "_").replace("(", "").replace(")", "")
  run_dir.mkdir(parents=True, exist_ok=True)
  streams = program.make_streams(config, splits, tokenizer, config.loss.build())
  result = program.unlearn(config, model, target, target, *streams, run_dir, resume=False)
  summary = program.evaluate_params(
    config, result.model, result.params, tokenizer, data_dir, run_dir / "eval", reference
  )
  row = report.row(label, summary, seconds=result.seconds, state_bytes=result.state_bytes)
  return row, result.history


def run(config: RunConfig, finetune_steps: int = 600, finetune_lr: float = 3e-3) -> dict[str, Any]:
  """Runs the whole experiment under ``config.output_dir``; returns the report rows."""
  out = pathlib.Path(config.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_config(config, out / "config.yaml")
  began = time.perf_counter()
  tokenizer, data_dir = program.prepare_data(config)
  splits = program.load_splits(config, data_dir)
  print(f"data: {len(splits.forget)} forget / {len(splits.retain)} retain questions in {data_dir}")
  module, model_config = build_model(config.model, tokenizer, seed=config.training.seed)
  model, init_params = FunctionalModel.split(module, model_config)
  target, oracle = _finetune_target_and_oracle(
    config, model, init_params, splits, tokenizer, data_dir, finetune_steps, finetune_lr
  )
  save_model(model, target, str(out / "target_model"), tokenizer)
  rows, reference = _evaluate_start(config, model, target, oracle, tokenizer, data_dir)
  histories = {}
  for label, optimizer, training in VARIANTS:
    variant = _variant_config(config, optimizer, training)
    row, histories[label] = _unlearn_variant(
      variant, label, model, target, splits, tokenizer, data_dir, reference
    )
    rows.append(row)
  report_path = report.write(out, rows, histories)
  print(report.markdown(rows))
  print(
    f"\nreport: {report_path}\nplots: {out / 'plots'}\n"
    f"total time: {time.perf_counter() - began:.0f} s on {jax.device_count()} "
    f"{jax.devices()[0].platform} device(s)"
  )
  (out / "results.json").write_text(json.dumps(rows, indent=1))
  return {"rows": rows, "report": str(report_path)}
