"""The same unlearning run on a simulated 8-device mesh (FSDP) ends where the single-device
run ends. XLA fixes the device count at start-up, so each run is a separate process.

Sharded gradients are summed in another order, so they differ from the single-device ones
by float32 rounding. Adam-style normalisation turns a rounding-level relative difference of
a near-zero gradient (e.g. LM-head rows of tokens the batch never uses) into a different
update of that element; the check therefore asks >= 99.9 % of each tensor's elements to
agree to 1e-5 relative, and none to drift by more than a few learning rates.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Opt-in (`make test-mesh`): on this project's 2-core CI machine XLA:CPU's in-process
# all-reduce over 8 simulated devices sometimes never completes its rendezvous and aborts
# the process (xla::internal::AwaitAndLogIfStuck -> SIGABRT), even with nothing else
# running. The runs are correct when they complete.
pytestmark = pytest.mark.mesh


def _unlearn(out, mesh, devices, state_bits=32):
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  command = [sys.executable, str(ROOT / "train" / "run.py"), "unlearn", f"output_dir={out}",
             "training.steps=6", "training.checkpoint_every=6", "training.diagnostics_every=3",
             "model.hidden_size=64", "data.batch_size=8", "data.max_length=48",
             f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"optimizer.state_bits={state_bits}"]
  subprocess.run(command, check=True, env=env, capture_output=True, timeout=900)
  return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  return _unlearn(tmp_path_factory.mktemp("single"), (1, 1), 1)


@pytest.mark.parametrize("mesh", [(1, 8), (2, 4)], ids=["fsdp8", "data2-fsdp4"])
def test_sharded_run_matches_single_device(tmp_path, mesh, single):
  sharded = _unlearn(tmp_path / "sharded", mesh, 8)
  assert single.keys() == sharded.keys()
  for name in single:
    close = np.isclose(sharded[name], single[name], rtol=1e-5, atol=1e-6)
    assert close.mean() >= 0.999, f"{name}: {np.sum(~close)} of {close.size} elements differ"
    assert np.max(np.abs(sharded[name] - single[name])) <= 6 * 1e-4 * 3, name
