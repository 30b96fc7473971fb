"""Faults of a whole CLI run: a corrupted newest checkpoint, and a SIGKILL inside a save;
either way the next start resumes from the last complete checkpoint and ends with the same
parameters as an uninterrupted run."""

import json
import os
import subprocess

import pytest
from safetensors.numpy import load_file

from tests.integration.test_run import _unlearn
from train.runtime.checkpointing import KILL_IN_SAVE_ENV

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _run(out, steps, env=None):
  return subprocess.run(
    _unlearn(out, steps), env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600
  )


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
  """The uninterrupted 8-step run."""
  out = tmp_path_factory.mktemp("whole")
  done = _run(out, 8)
  assert done.returncode == 0, done.stderr[-3000:]
  return load_file(str(out / "model" / "model.safetensors"))


def _assert_same_model_and_log(whole, out):
  model = load_file(str(out / "model" / "model.safetensors"))
  assert model.keys() == whole.keys()
  for name in model:
    assert (model[name] == whole[name]).all(), name
  steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(1, 9))


def test_a_corrupted_newest_checkpoint_resumes_from_the_one_before(tmp_path, whole):
  out = tmp_path / "run"
  assert _run(out, 6).returncode == 0
  step6 = out / "checkpoints" / "6"
  data = max((step6 / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[8:108] = os.urandom(100)
  data.write_bytes(bytes(raw))
  done = _run(out, 8)
  assert done.returncode == 0, done.stderr[-3000:]
  warning = [line for line in done.stderr.splitlines() if "is unreadable" in line]
  assert len(warning) == 1, done.stderr[-3000:]
  assert f"checkpoint step 6 in {out / 'checkpoints'} is unreadable (" in warning[0]
  assert warning[0].endswith("resuming from step 4")
  assert "Traceback" not in done.stderr and "Event loop is closed" not in done.stderr
  assert [p.name.split("-")[0] for p in (out / "checkpoints").glob("6.corrupt-*")] == ["6.corrupt"]
  _assert_same_model_and_log(whole, out)


def test_killed_inside_a_save_resumes_from_the_last_complete_checkpoint(tmp_path, whole):
  out = tmp_path / "run"
  killed = _run(out, 8, env={KILL_IN_SAVE_ENV: "4"})
  assert killed.returncode == -9, killed.stderr[-3000:]
  names = sorted(p.name for p in (out / "checkpoints").iterdir())
  assert "2" in names and "4" not in names, names
  assert any(n.startswith("4.orbax-checkpoint-tmp") for n in names), names  # died mid-write
  assert not (out / "model").exists()
  done = _run(out, 8)
  assert done.returncode == 0, done.stderr[-3000:]
  _assert_same_model_and_log(whole, out)
