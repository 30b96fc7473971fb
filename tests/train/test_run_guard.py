"""Run-folder guards: a resume under a changed config is refused (unless --fresh or
--override), and a second process in the same folder is refused by its lock."""

import dataclasses
import json
import os
import socket
import subprocess
import time

import pytest
import yaml

from train import cli
from train.config import ConfigError, RunConfig, load_config, save_config
from train.runtime import run_guard


def _error_lines(capsys):
  return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _run_folder(tmp_path, *overrides):
  """A run folder as an earlier run left it: its config.yaml and a checkpoint step."""
  out = tmp_path / "run"
  (out / "checkpoints" / "4").mkdir(parents=True)
  save_config(load_config(None, [f"output_dir={out}", *overrides]), out / "config.yaml")
  return out


def test_changed_settings_are_listed_with_old_and_new_values(tmp_path):
  out = _run_folder(tmp_path, "optimizer.name=adam")
  new = load_config(None, [f"output_dir={out}", "optimizer.name=dualoptim", "data.seed=3"])
  with pytest.raises(ConfigError) as e:
    run_guard.check_resume(out, new)
  message = str(e.value)
  assert "optimizer.name: 'adam' -> 'dualoptim'" in message
  assert "data.seed: 0 -> 3" in message and "--fresh" in message and "\n" not in message


def test_allowed_changes_resume(tmp_path):
  out = _run_folder(tmp_path)
  new = load_config(
    None,
    [
      f"output_dir={out}",
      "training.steps=999",
      "training.checkpoint_every=7",
      "eval.batch_size=3",
      "mesh.fsdp=1",
    ],
  )
  run_guard.check_resume(out, new)  # no error


def test_no_checkpoint_no_check(tmp_path):
  out = _run_folder(tmp_path, "optimizer.name=adam")
  (out / "checkpoints" / "4").rmdir()
  run_guard.check_resume(out, load_config(None, [f"output_dir={out}", "optimizer.name=dualoptim"]))


def test_fresh_moves_checkpoints_aside(tmp_path):
  out = _run_folder(tmp_path, "optimizer.name=adam")
  new = load_config(None, [f"output_dir={out}", "optimizer.name=dualoptim"])
  run_guard.check_resume(out, new, fresh=True)
  assert not (out / "checkpoints").exists()
  (old,) = out.glob("checkpoints.old-*")
  assert (old / "4").is_dir()
  assert "--fresh" in (out / run_guard.GUARD_LOG).read_text()


def test_override_resumes_and_logs(tmp_path, capsys):
  out = _run_folder(tmp_path, "optimizer.name=adam")
  new = load_config(None, [f"output_dir={out}", "optimizer.name=dualoptim"])
  run_guard.check_resume(out, new, override=True)
  assert (out / "checkpoints" / "4").is_dir()
  assert "optimizer.name: 'adam' -> 'dualoptim'" in (out / run_guard.GUARD_LOG).read_text()
  assert "--override" in capsys.readouterr().err


def test_cli_refuses_a_changed_resume_and_keeps_the_saved_config(tmp_path, capsys):
  out = _run_folder(tmp_path, "optimizer.name=adam")
  saved = (out / "config.yaml").read_text()
  code = cli.main(["unlearn", f"output_dir={out}", "optimizer.name=dualoptim"])
  assert code == 2
  (line,) = _error_lines(capsys)
  assert "optimizer.name: 'adam' -> 'dualoptim'" in line and str(out) in line
  assert (out / "config.yaml").read_text() == saved  # written only after the check
  assert not (out / run_guard.LOCK_NAME).exists()  # released on the error


def _write_lock(folder, pid):
  folder.mkdir(parents=True, exist_ok=True)
  info = {"pid": pid, "host": socket.gethostname(), "started": time.time()}
  (folder / run_guard.LOCK_NAME).write_text(json.dumps(info))


def test_a_live_holder_refuses_the_second_run(tmp_path, capsys):
  out = tmp_path / "run"
  _write_lock(out, os.getpid())
  assert cli.main(["unlearn", f"output_dir={out}"]) == 2
  (line,) = _error_lines(capsys)
  assert str(out) in line and f"pid {os.getpid()}" in line and socket.gethostname() in line
  assert json.loads((out / run_guard.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_stale_lock_is_replaced_and_released(tmp_path, capsys):
  dead = subprocess.Popen(["true"])
  dead.wait()
  out = tmp_path / "run"
  _write_lock(out, dead.pid)
  lock = run_guard.RunLock(out)
  lock.acquire()
  assert json.loads(lock.path.read_text())["pid"] == os.getpid()
  (warning,) = [line for line in capsys.readouterr().err.splitlines() if line]
  assert warning.startswith("warning: stale lock") and f"pid {dead.pid}" in warning
  with pytest.raises(ConfigError):  # now held by a live process: this one
    run_guard.RunLock(out).acquire()
  lock.release()
  assert not lock.path.exists()


def test_locked_releases_on_errors(tmp_path):
  with pytest.raises(RuntimeError), run_guard.locked(tmp_path):
    assert (tmp_path / run_guard.LOCK_NAME).exists()
    raise RuntimeError("boom")
  assert not (tmp_path / run_guard.LOCK_NAME).exists()


def test_a_setting_added_since_the_save_counts_as_its_default(tmp_path):
  config = RunConfig(output_dir=str(tmp_path))
  saved = config.to_dict()
  del saved["data"]["overlong"]  # a folder written before data.overlong existed
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  run_guard.check_resume(tmp_path, config)  # the default: no change
  refuse = dataclasses.replace(config, data=dataclasses.replace(config.data, overlong="refuse"))
  with pytest.raises(ConfigError, match=r"data\.overlong: 'truncate' -> 'refuse'"):
    run_guard.check_resume(tmp_path, refuse)
