"""Continual unlearning end to end (``python train/run.py continual``): two forget tasks in
a row on the tiny model, each from the model the previous one left; a run SIGKILLed inside
the second task resumes there (the first task restored from its final checkpoint, as the
second's start and NPO reference) and ends with the same parameters as an uninterrupted
run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.numpy import load_file

from train.scenarios import continual

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _continual(out):
  return [
    sys.executable,
    str(ROOT / "train" / "run.py"),
    "continual",
    str(ROOT / "configs" / "continual_tiny.yaml"),
    f"output_dir={out}",
    "continual.task_ids=[1, 2]",
    "training.steps=4",
    "training.checkpoint_every=2",
    "training.diagnostics_every=50",
    "model.hidden_size=64",
    "data.batch_size=4",
    "data.max_length=48",
    "eval.max_items=2",
    "eval.max_new_tokens=2",
  ]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
  began = time.monotonic()
  while not path.is_dir():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() - began < timeout, f"{path} never appeared"
    time.sleep(0.05)


def test_a_run_killed_inside_the_second_task_resumes_to_the_same_model(tmp_path):
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  done = subprocess.run(_continual(whole), env=ENV, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = json.loads((whole / "results.json").read_text())
  assert [(r["position"], r["task"]) for r in rows] == [(1, 1), (2, 2)]
  assert set(rows[1]["per_task"]) == {"1", "2"}  # every task so far is evaluated
  assert (whole / continual.PLOT_FILE).stat().st_size > 0

  process = subprocess.Popen(_continual(killed), env=ENV, stderr=subprocess.PIPE, text=True)
  _wait_for(killed / "task2_id2" / "checkpoints" / "2", process)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  first_done = (killed / "task1_id1" / continual.DONE_FILE).stat().st_mtime_ns
  assert not (killed / "task2_id2" / continual.DONE_FILE).exists()
  resumed = subprocess.run(_continual(killed), env=ENV, capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert (killed / "task1_id1" / continual.DONE_FILE).stat().st_mtime_ns == first_done
  a = load_file(str(whole / "model" / "model.safetensors"))
  b = load_file(str(killed / "model" / "model.safetensors"))
  assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
  log = (killed / "task2_id2" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]
