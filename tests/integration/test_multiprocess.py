"""A real multi-process run: two JAX processes (4 simulated CPU devices each, gloo
collectives, coordinated through ``JAX_COORDINATOR_ADDRESS``) unlearn on one (2, 4) mesh.

Each process loads only its half of every batch, orbax writes and then restores the
checkpoint from both processes, and process 0 exports the gathered model. The run is cut
after 3 steps and resumed to 5 in a second launch, and must end where one process on one
device ends after 5 uninterrupted steps.
"""

import os
import socket
import subprocess
import sys

from cli_runs import STEPS, assert_same_model, run_cli, unlearn_args
from safetensors.numpy import load_file


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_two_processes(args):
  port = _free_port()
  procs = []
  for process_id in range(2):
    env = {
      **os.environ,
      "HF_HUB_OFFLINE": "1",
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(process_id),
    }
    procs.append(
      subprocess.Popen(
        [sys.executable, *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
      )
    )
  outputs = [p.communicate(timeout=600) for p in procs]
  for process_id, (p, (_, err)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {process_id} exit {p.returncode}:\n{err[-3000:]}"


def test_two_processes_resume_and_match_single_device(tmp_path):
  run_cli(unlearn_args(tmp_path / "single", 32), devices=1)
  out = tmp_path / "two"
  mesh = ["mesh.data=2", "mesh.fsdp=4"]
  cut = [
    arg.replace(f"training.steps={STEPS}", "training.steps=3") for arg in unlearn_args(out, 32)
  ]
  _launch_two_processes(cut + mesh)
  assert (out / "checkpoints" / "3").is_dir()
  _launch_two_processes(unlearn_args(out, 32) + mesh)  # resumes from step 3
  steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
  assert len(steps) == STEPS  # one writer, and the resumed run kept steps 1-3
  assert_same_model(
    load_file(str(tmp_path / "single" / "model" / "model.safetensors")),
    load_file(str(out / "model" / "model.safetensors")),
    "2 processes",
  )
