"""Tokens/s of one whole unlearning step on SmolLM2-135M-Instruct: full weights vs LoRA.

Run from the project root (fetches the model on first use)::

    python benchmarks/unlearning_step.py                     # 4 x 256 tokens, NPO+GD
    python benchmarks/unlearning_step.py --batch 2 --seq 128 --rounds 3

One step is what `python train/run.py unlearn` runs: the forward and backward passes of
the step's objective (for NPO also the frozen reference model's forward pass), then the
DualOptim+ update, jitted by the program's own `compile_steps` with its XLA:CPU options.
The variants (full weights; LoRA rank 8 on every projection; each with the configured
remat) are compiled once, then timed in alternating rounds (one forget and one retain
step per round), so a shared machine's drift hits them alike. Reported: median and best
seconds per step, tokens/s, the ratio to the full-weight step, and the optimizer state's
bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import dualoptax  # noqa: E402
from models import fetch  # noqa: E402
from train import config as config_lib  # noqa: E402
from train.losses import IGNORE_INDEX, LMBatch  # noqa: E402
from train.program import modeling  # noqa: E402
from train.program import step as step_lib  # noqa: E402
from train.program.optimizer import make_optimizer  # noqa: E402
from train.program.unlearn import make_train_step, place_on_mesh, trained_part  # noqa: E402


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--loss", default="NPO+GD")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--remat", default="none", choices=config_lib.REMAT_POLICIES)
  return parser.parse_args()


def _run_config(args: argparse.Namespace, path: str, lora: bool) -> config_lib.RunConfig:
  model = config_lib.ModelConfig(
    path=path, dtype=args.dtype, remat=args.remat, lora=config_lib.LoRASection(enabled=lora)
  )
  return config_lib.RunConfig(
    model=model,
    optimizer=config_lib.OptimizerConfig(name="dualoptim_plus"),
    loss=config_lib.LossSection(name=args.loss),
  ).validate()


def _inputs(args: argparse.Namespace, vocab_size: int, seed: int) -> step_lib.StepInputs:
  """Random token rows of which the second half is scored, with a micro-batch axis of 1."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab_size, size=(1, args.batch, args.seq), dtype=np.int32)
  labels = ids.copy()
  labels[..., : args.seq // 2] = IGNORE_INDEX
  mask = np.ones_like(ids)
  batch = LMBatch(input_ids=ids, attention_mask=mask, labels=labels)
  return step_lib.StepInputs(answers=batch, idk=batch)


def _variant(args, config, model, params):
  """A compiled train step and its placed state for one run config."""
  tx = make_optimizer(config.optimizer)
  part = trained_part(config, model, params, params)
  shardings, trained, fixed, opt_state = place_on_mesh(
    config.mesh, part.params, part.fixed, tx.init(part.params)
  )
  compiled = step_lib.compile_steps(
    make_train_step(part, tx, config), shardings, config.optimizer, alternating=True
  )
  batches = [
    jax.device_put(_inputs(args, model.config.vocab_size, seed), shardings.inputs())
    for seed in (0, 1)
  ]
  objectives = [jax.device_put(np.int32(o), shardings.replicated) for o in (0, 1)]
  state = {"params": trained, "opt_state": opt_state, "number": 0}

  def step(index: int) -> float:
    number = jax.device_put(np.int32(state["number"]), shardings.replicated)
    began = time.perf_counter()
    state["params"], state["opt_state"], metrics = compiled.train(
      state["params"], state["opt_state"], fixed, batches[index], objectives[index], number
    )
    jax.block_until_ready((state["params"], metrics))
    state["number"] += 1
    return time.perf_counter() - began

  return step, dualoptax.state_nbytes(opt_state)


def main() -> None:
  args = _parse_args()
  path = args.model or str(fetch.fetch("smollm2"))
  base_config = _run_config(args, path, lora=False)
  module, model_config = modeling.build_model(base_config.model, tokenizer=None)
  model, params = modeling.FunctionalModel.split(module, model_config)
  variants, sizes = {}, {}
  for name, lora in (("full weights", False), ("LoRA r8", True)):
    config = _run_config(args, path, lora)
    began = time.perf_counter()
    variants[name], sizes[name] = _variant(args, config, model, params)
    variants[name](0)  # compiles
    print(f"{name}: compiled and ran one step in {time.perf_counter() - began:.1f} s", flush=True)
  times = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, step in variants.items():
      times[name] += [step(0), step(1)]
  _report(args, times, sizes)


def _report(args, times: dict[str, list[float]], sizes: dict[str, int]) -> None:
  tokens = args.batch * args.seq
  print(
    f"\nSmolLM2-135M unlearning step, DualOptim+ ({args.loss}), {args.dtype}, "
    f"remat={args.remat}, batch {args.batch} x {args.seq} tokens, {args.rounds} rounds"
  )
  print("| variant | median s/step | best s/step | tokens/s (median) | vs full | state bytes |")
  print("|---|---|---|---|---|---|")
  full = statistics.median(times["full weights"])
  for name, seconds in times.items():
    median = statistics.median(seconds)
    print(
      f"| {name} | {median:.3f} | {min(seconds):.3f} | {tokens / median:.0f} | "
      f"{full / median:.2f}x | {sizes[name]:,} |"
    )


if __name__ == "__main__":
  main()
