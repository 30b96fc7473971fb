"""The default experiment (``python train/run.py`` with no arguments).

1. generate the embedded fictitious-author benchmark (TOFU layout) and a tokenizer for it;
2. fine-tune a tiny model on every fact (the TARGET model to unlearn from) and another on
   the retain facts only (the ORACLE, for forget quality);
3. from the same target, unlearn the forget split with Adam (joint loss), DualOptim,
   DualOptim+ and DualOptim+ 8-bit (alternating 1 forget step : 5 retain steps);
4. evaluate every model and print a comparison table; write the report and plots.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax

from train import data as data_lib
from train import program, report
from train.config import RunConfig, save_config
from train.data import synthetic, tofu
from train.data import tokenizer as tokenizer_lib
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


def run(config: RunConfig, finetune_steps: int = 600, finetune_lr: float = 3e-3) -> dict[str, Any]:
  """Runs the whole experiment under ``config.output_dir``; returns the report rows."""
  out = pathlib.Path(config.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_config(config, out / "config.yaml")
  began = time.perf_counter()

  data_dir = config.data.path or synthetic.write_synthetic_tofu(out / "data", seed=config.data.seed)
  tokenizer = tokenizer_lib.train_tokenizer(
    tokenizer_lib.tofu_corpus_texts(data_dir, template=config.data.template), vocab_size=1024
  )
  splits = data_lib.load_unlearning_data(data_dir, config.data.forget_split, config.data.task_id)
  print(f"data: {len(splits.forget)} forget / {len(splits.retain)} retain questions in {data_dir}")

  loss_config = config.loss.build()
  module, model_config = build_model(config.model, tokenizer, seed=config.training.seed)
  model, init_params = FunctionalModel.split(module, model_config)

  # The real-knowledge control facts stand in for what a pretrained model already knows:
  # both models learn them, and unlearning should leave them alone.
  control = tuple(
    item
    for name in ("real_authors_perturbed", "world_facts_perturbed")
    for item in tofu.load_tofu(
      pathlib.Path(data_dir) / f"{name}.json", required_keys=tofu.OPTION_KEYS
    )
  )
  # Target: every fact. Oracle: never saw the forget split.
  everything = dataclasses.replace(splits, retain=splits.retain + splits.forget + control)
  _, all_stream = program.make_streams(config, everything, tokenizer, loss_config)
  target = program.finetune(model, init_params, all_stream, finetune_steps, finetune_lr, "target")
  without_forget = dataclasses.replace(splits, retain=splits.retain + control)
  _, oracle_stream = program.make_streams(config, without_forget, tokenizer, loss_config)
  oracle = program.finetune(
    model, init_params, oracle_stream, finetune_steps, finetune_lr, "oracle"
  )
  save_model(model, target, str(out / "target_model"), tokenizer)
  oracle_summary = program.evaluate_params(
    config, model, oracle, tokenizer, data_dir, out / "eval" / "oracle"
  )
  reference = str(out / "eval" / "oracle" / "tofu_eval_items.json")
  target_summary = program.evaluate_params(
    config, model, target, tokenizer, data_dir, out / "eval" / "target", reference
  )
  rows = [
    report.row("target (before unlearning)", target_summary),
    report.row("oracle (retain only)", oracle_summary),
  ]
  histories = {}
  for label, optimizer, training in VARIANTS:
    variant = _variant_config(config, optimizer, training)
    run_dir = out / "unlearn" / label.replace(" ", "_").replace("(", "").replace(")", "")
    run_dir.mkdir(parents=True, exist_ok=True)
    forget_stream, retain_stream = program.make_streams(variant, splits, tokenizer, loss_config)
    result = program.unlearn(
      variant, model, target, target, forget_stream, retain_stream, run_dir, resume=False
    )
    summary = program.evaluate_params(
      variant, model, result.params, tokenizer, data_dir, run_dir / "eval", reference
    )
    rows.append(report.row(label, summary, seconds=result.seconds, state_bytes=result.state_bytes))
    histories[label] = result.history
  report_path = report.write(out, rows, histories)
  print(report.markdown(rows))
  print(
    f"\nreport: {report_path}\nplots: {out / 'plots'}\n"
    f"total time: {time.perf_counter() - began:.0f} s on {jax.device_count()} "
    f"{jax.devices()[0].platform} device(s)"
  )
  (out / "results.json").write_text(json.dumps(rows, indent=1))
  return {"rows": rows, "report": str(report_path)}
