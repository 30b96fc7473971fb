"""The unlearning program end to end: a tiny default experiment, and exact resume after
SIGKILL."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_tiny_experiment_reports_every_optimizer(tmp_path):
  from train import experiment

  config = experiment.default_config(str(tmp_path / "run"))
  config = dataclasses.replace(
    config,
    training=dataclasses.replace(config.training, steps=6, diagnostics_every=3, checkpoint_every=3),
    eval=dataclasses.replace(config.eval, max_items=4, max_new_tokens=4),
  )
  result = experiment.run(config, finetune_steps=8)
  labels = [r["model"] for r in result["rows"]]
  assert labels == [
    "target (before unlearning)",
    "oracle (retain only)",
    "adam (joint)",
    "dualoptim",
    "dualoptim_plus",
    "dualoptim_plus 8-bit",
  ]
  for r in result["rows"][2:]:
    assert 0.0 <= r["forget efficacy"] <= 1.0 and r["seconds"] > 0
    assert r["forget quality"] is not None
  bytes_ = {r["model"]: r["optimizer state bytes"] for r in result["rows"][2:]}
  assert bytes_["dualoptim_plus 8-bit"] < bytes_["dualoptim"] < bytes_["dualoptim_plus"]
  run = tmp_path / "run"
  for name in (
    "report.md",
    "results.json",
    "config.yaml",
    "plots/losses.png",
    "plots/conflict_cosine.png",
    "plots/tradeoff.png",
    "target_model/model.safetensors",
  ):
    assert (run / name).exists(), name
  history = [
    json.loads(line)
    for line in (run / "unlearn" / "dualoptim_plus" / "metrics.jsonl").read_text().splitlines()
  ]
  assert [h["step"] for h in history] == list(range(1, 7))
  assert "update_cosine" in history[2] and "gradient_cosine" in history[2]
  assert any("lm_head" in k for k in history[2]["gradient_cosine_per_leaf"])
  from train.runtime.tensorboard import read_scalars

  events = list((run / "unlearn" / "dualoptim_plus" / "tensorboard").glob("events.out.*"))
  scalars = list(read_scalars(events[0]))
  assert {(s, t) for s, t, _ in scalars} >= {(1, "loss"), (3, "gradient_cosine")}


def _unlearn(out, steps, extra=()):
  return [
    sys.executable,
    str(ROOT / "train" / "run.py"),
    "unlearn",
    f"output_dir={out}",
    f"training.steps={steps}",
    "training.checkpoint_every=2",
    "training.diagnostics_every=50",
    "model.hidden_size=64",
    "data.batch_size=4",
    "data.max_length=48",
    *extra,
  ]


def test_sigkilled_run_resumes_to_the_same_parameters(tmp_path):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  subprocess.run(_unlearn(whole, 10), check=True, env=env, capture_output=True, timeout=600)
  process = subprocess.Popen(
    _unlearn(killed, 10), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 600
  while not (killed / "checkpoints" / "4").exists():
    assert process.poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (killed / "model").exists()
  subprocess.run(_unlearn(killed, 10), check=True, env=env, capture_output=True, timeout=600)
  a = load_file(str(whole / "model" / "model.safetensors"))
  b = load_file(str(killed / "model" / "model.safetensors"))
  assert a.keys() == b.keys()
  for name in a:
    assert (a[name] == b[name]).all(), name
  steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, 11))
