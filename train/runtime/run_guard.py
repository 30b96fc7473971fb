"""Guards of a run folder: one process at a time (:class:`RunLock`), and no silent resume
under a changed configuration (:func:`check_resume`).

A resumed run continues the checkpoint's parameters, optimizer state and sampler position;
resuming them under another optimizer, loss or data would mix two experiments in one
folder, with nothing in the results to show it. Two processes in one folder would
overwrite each other's checkpoints and metrics."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from train.config import ConfigError, RunConfig, deep_merge, flatten_dotted

LOCK_NAME = ".lock"
CONFIG_NAME = "config.yaml"
GUARD_LOG = "run_guard.log"  # in the run folder: overrides and fresh starts, one line each
# Keys that may change between a run and its resumption: the mesh (same run, other
# hardware), the number of steps (extending a run), checkpoint / diagnostics cadence,
# evaluation and where the run lives.
RESUMABLE = ("mesh.", "eval.", "output_dir")
RESUMABLE_KEYS = (
  "training.steps",
  "training.checkpoint_every",
  "training.diagnostics_every",
  "training.keep_checkpoints",
)


def _allowed(key: str) -> bool:
  return key in RESUMABLE_KEYS or any(key.startswith(p) or key == p for p in RESUMABLE)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """``"key: old -> new"`` for each setting that differs and may not change on resume."""
  before, after = flatten_dotted(old), flatten_dotted(new)
  changes = []
  for key in sorted(set(before) | set(after)):
    if _allowed(key):
      continue
    if before.get(key, "<unset>") != after.get(key, "<unset>"):
      changes.append(f"{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}")
  return changes


def has_checkpoint(run_dir: pathlib.Path) -> bool:
  """Whether ``run_dir/checkpoints`` holds a step folder (one a resume would restore)."""
  folder = run_dir / "checkpoints"
  return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def _log(run_dir: pathlib.Path, message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)
  with open(run_dir / GUARD_LOG, "a", encoding="utf-8") as f:
    f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")


def check_resume(
  run_dir: pathlib.Path, config: RunConfig, fresh: bool = False, override: bool = False
) -> None:
  """Refuses to resume ``run_dir``'s checkpoints under a changed configuration.

  With ``fresh`` the checkpoints are moved aside to ``checkpoints.old-<time>`` (never
  deleted) and the run starts at step 0; with ``override`` it resumes anyway and the
  override is recorded in ``run_guard.log``. Call before the new ``config.yaml`` is written.

  Raises:
    ConfigError: The saved config differs outside :data:`RESUMABLE` / :data:`RESUMABLE_KEYS`
      and a checkpoint exists; the message lists each key with its old and new value.
  """
  if fresh:
    folder = run_dir / "checkpoints"
    if folder.exists():
      moved = run_dir / f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}"
      folder.rename(moved)
      _log(run_dir, f"--fresh: moved {folder} to {moved.name}; starting at step 0")
    return
  saved = run_dir / CONFIG_NAME
  if not saved.is_file() or not has_checkpoint(run_dir):
    return
  # A setting added since the folder's config was saved had its default then.
  old = deep_merge(RunConfig().to_dict(), yaml.safe_load(saved.read_text()) or {})
  changes = config_changes(old, config.to_dict())
  if not changes:
    return
  if override:
    _log(run_dir, f"--override: resuming {run_dir} under a changed config: {'; '.join(changes)}")
    return
  raise ConfigError(
    f"{run_dir} has checkpoints of another config ({'; '.join(changes)}); "
    "resume with the saved settings, or pass --fresh (move the checkpoints aside, start at "
    "step 0) or --override (resume anyway)"
  )


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


class RunLock:
  """``<run_dir>/.lock``: the pid, host and start time of the process that runs the folder.

  Created atomically (``O_CREAT | O_EXCL``); a live holder's lock refuses the run; a stale
  one (same host, process gone) is reported in one warning line and replaced.
  """

  def __init__(self, run_dir: pathlib.Path):
    self.path = pathlib.Path(run_dir) / LOCK_NAME
    self.held = False

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    with os.fdopen(fd, "w") as f:
      json.dump(info, f)
    self.held = True
    return True

  def _holder(self) -> dict[str, Any]:
    try:
      return json.loads(self.path.read_text())
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    """Takes the lock.

    Raises:
      ConfigError: Another live process (or one on another host) holds it.
    """
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self._create():
      return
    holder = self._holder()
    pid, host = holder.get("pid"), holder.get("host")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    who = f"pid {pid} on {host}, started {started}"
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
      print(f"warning: stale lock {self.path} ({who}; process gone) replaced", file=sys.stderr)
      self.path.unlink(missing_ok=True)
      if self._create():
        return
      holder = self._holder()
      who = f"pid {holder.get('pid')} on {holder.get('host')}"
    raise ConfigError(
      f"{self.path.parent} is in use by another run ({who}); wait for it, or remove "
      f"{self.path} if that process is gone"
    )

  def release(self) -> None:
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False


@contextlib.contextmanager
def locked(run_dir: pathlib.Path, take: bool = True) -> Iterator[None]:
  """Holds ``run_dir``'s :class:`RunLock` for the block (released on errors too); with
  ``take=False`` (processes other than 0 of a multi-host job) it does nothing."""
  lock = RunLock(run_dir)
  if take:
    lock.acquire()
  try:
    yield
  finally:
    lock.release()
