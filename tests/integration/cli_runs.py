"""Small CLI unlearning runs in fresh processes (the device count is fixed when jax
starts), and the comparison of their exported models; shared by the mesh and
multi-process tests.

Sharded gradients are summed in another order, so they differ from the single-device ones
by float32 rounding. Adam-style normalisation turns a rounding-level relative difference of
a near-zero gradient (e.g. LM-head rows of tokens the batch never uses) into a different
update of that element. The comparison therefore asks >= 99.9 % of each tensor's elements
to agree to 1e-5 relative, and none to drift by more than a few learning rates.

DualOptim+'s paper formula divides by ``sqrt(|Eh + Vh|)``, which nearly vanishes where an
objective's delta cancels the base: there one step can move an element by hundreds of
learning rates (the default experiment logs a median largest entry of ~100 lr a step), so
a rounding-level difference there becomes a drift of many learning rates. The runs below
therefore floor that denominator (``optimizer.denominator_floor=0.1``: at most ~3 lr a
step), which keeps the drift bound meaningful; the floor changes no code path of the
sharding being compared.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
LEARNING_RATE = 1e-4
STEPS = 5


def unlearn_args(out, state_bits):
  """The CLI arguments of one small unlearning run into `out`."""
  return [
    str(ROOT / "train" / "run.py"),
    "unlearn",
    f"output_dir={out}",
    f"training.steps={STEPS}",
    f"training.checkpoint_every={STEPS}",
    "training.diagnostics_every=2",
    "model.hidden_size=64",
    "data.batch_size=8",
    "data.max_length=48",
    f"optimizer.learning_rate={LEARNING_RATE}",
    f"optimizer.state_bits={state_bits}",
    "optimizer.denominator_floor=0.1",
  ]


def run_cli(args, devices, timeout=600, env=None):
  """Runs `python args...` on `devices` simulated CPU devices; fails with its stderr.

  Returns:
    The finished process (its stdout and stderr as text).
  """
  env = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    **(env or {}),
  }
  done = subprocess.run(
    [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout
  )
  assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
  return done


def assert_same_model(single, sharded, label, min_close=0.999):
  """Asserts two exported models (name -> array) agree by the rule in the module doc."""
  assert single.keys() == sharded.keys(), label
  for name in single:
    close = np.isclose(sharded[name], single[name], rtol=1e-5, atol=1e-6)
    assert close.mean() >= min_close, f"{label} {name}: {np.sum(~close)} of {close.size} differ"
    drift = np.max(np.abs(sharded[name] - single[name]))
    assert drift <= 3 * STEPS * LEARNING_RATE, f"{label} {name}: drift {drift}"
