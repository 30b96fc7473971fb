"""Checkpoints of a run: arrays (params, optimizer state, RNG) plus JSON metadata.

One orbax ``CheckpointManager`` per run folder. A checkpoint holds two items: ``state``,
any pytree of arrays (restored with the shardings of an abstract target, so a checkpoint
saved under one mesh restores under another), and ``meta``, a JSON dict for the plain
Python values a resume needs (the data sampler's position, the step, the config). An
unlearning run saves what it trains: the trained weights (with LoRA, the adapters only; the
frozen base is read again from ``model.path``) and their optimizer state.

What survives faults (orbax 0.12 on a local or network file system):

* A save writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` when
  every item is written; orbax ignores unrenamed folders, so a run killed mid-save leaves
  the previous checkpoints intact.
* Orbax's own ``max_to_keep`` deletes old steps in its finalize thread even when the new
  save failed (it logs the failure and deletes anyway), so this class keeps every step in
  orbax and deletes old ones itself, only after ``wait_until_finished`` returned without
  error and the new step's folder is finalized (:meth:`RunCheckpointer.save`).
* A resume (:meth:`RunCheckpointer.restore_latest_good`) restores the newest step that
  restores completely, warns about each newer one it could not read and moves those to
  ``<step>.corrupt-<time>`` (kept for inspection; the run saves that step again).
* Failures are :class:`CheckpointError`: one line naming the folder, the step and the
  cause (the innermost error, e.g. tensorstore's), never a chain of tracebacks.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

# Test hook (tests/integration/test_faults_run.py): the process SIGKILLs itself inside the
# save of this step, after orbax started its asynchronous writes and before they finish.
KILL_IN_SAVE_ENV = "DUALOPTAX_TEST_KILL_IN_SAVE"


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved or none could be restored; the message is one line
  naming the checkpoint folder, the step(s) and the cause."""


def describe_error(error: BaseException, limit: int = 300) -> str:
  """``"Type: first line"`` of the innermost cause of ``error`` (orbax wraps tensorstore's
  read errors in an exception whose text is a whole TensorStore spec)."""
  root = error
  while (root.__cause__ or root.__context__) is not None:
    root = root.__cause__ or root.__context__
  lines = str(root).strip().splitlines() or [""]
  text = lines[0][:limit]
  return f"{type(root).__name__}: {text}" if text else type(root).__name__


def _is_abandoned_read(unraisable: Any) -> bool:
  """Whether an unraisable exception comes from an orbax coroutine (a read abandoned by a
  failed restore, finalized after its event loop closed)."""
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def silence_abandoned_reads() -> None:
  """Drops the "Exception ignored in <coroutine ...>" tracebacks of a failed restore.

  When a step fails to restore, orbax leaves its other reads as pending coroutines; when
  the garbage collector finalizes them (any time later, often after their event loop
  closed) each raises inside its ``except`` and Python prints a screen of traceback for a
  failure already reported in one line. Installed once, after the first failed restore,
  in front of the process's hook; every other unraisable exception still reaches it."""
  previous = sys.unraisablehook
  if getattr(previous, "_dualoptax_orbax_filter", False):
    return

  def hook(unraisable: Any) -> None:
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook._dualoptax_orbax_filter = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class RunCheckpointer:
  """Saves and restores ``(state, meta)`` pairs under ``directory``.

  Args:
    directory: the run's checkpoint folder (created if missing).
    max_to_keep: how many most recent checkpoints to keep (older ones are deleted once a
      newer save is verified complete).
    warn: where one-line warnings go (default: stderr, on the primary process).
  """

  def __init__(
    self, directory: str | pathlib.Path, max_to_keep: int = 2, warn: Callable[[str], None] = _warn
  ):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep!r}")
    self.directory = pathlib.Path(directory).absolute()
    self.max_to_keep = max_to_keep
    self._warn = warn
    self._pending: int | None = None  # a save not yet verified complete
    self._manager = ocp.CheckpointManager(
      self.directory,
      # No max_to_keep: old steps are deleted here, after the new one is verified.
      options=ocp.CheckpointManagerOptions(create=True),
      item_names=("state", "meta"),
    )

  def save(self, step: int, state: Any, meta: dict[str, Any], wait: bool = True) -> None:
    """Writes checkpoint ``step``; with ``wait`` it is complete on disk when this returns.

    A step folder already there (a broken checkpoint a resume skipped, or an earlier run's
    with ``resume=False``) is moved aside first. Older checkpoints beyond ``max_to_keep``
    are deleted only once this one is verified (here with ``wait``, else at the next
    ``save`` or ``close``).

    Raises:
      CheckpointError: if writing failed (e.g. a full disk); earlier checkpoints are intact.
    """
    self._finish_pending()
    if step in self._manager.all_steps():
      moved = self._set_aside(step)
      self._warn(
        f"checkpoint step {step} in {self.directory} moved to {moved.name}: saving it anew"
      )
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    try:
      self._manager.save(step, args=args)
    except Exception as e:  # noqa: BLE001 (any orbax/tensorstore/OS failure)
      raise self._save_error(step, e) from e
    self._pending = step
    if os.environ.get(KILL_IN_SAVE_ENV) == str(step):  # test hook: die with writes in flight
      os.kill(os.getpid(), signal.SIGKILL)
    if wait:
      self._finish_pending()

  def _finish_pending(self) -> None:
    """Waits for the pending save, checks it is finalized, then deletes old steps."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(step, e) from e
    self._manager.reload()
    if step not in self._manager.all_steps() or not (self.directory / str(step)).is_dir():
      raise self._save_error(step, RuntimeError("orbax did not finalize the step folder"))
    for old in sorted(self._manager.all_steps())[: -self.max_to_keep]:
      self._manager.delete(old)

  def _save_error(self, step: int, error: BaseException) -> CheckpointError:
    self._manager.reload()
    kept = sorted(s for s in self._manager.all_steps() if s != step)
    return CheckpointError(
      f"saving checkpoint step {step} in {self.directory} failed ({describe_error(error)}); "
      f"the earlier checkpoints {kept} are intact"
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
    """Restores checkpoint ``step`` (default: the latest) into ``abstract_state``'s layout.

    Args:
      abstract_state: a pytree like the saved state; its leaves may be arrays or
        ``jax.ShapeDtypeStruct`` with shardings, which the restored arrays take.
      step: which checkpoint; None for the latest.

    Returns:
      ``(step, state, meta)``.

    Raises:
      FileNotFoundError: if there is no checkpoint in the folder.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
    return step, restored.state, dict(restored.meta)

  def restore_latest_good(
    self, abstract_state: Any, check: Callable[[dict], None] | None = None
  ) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that restores completely (see :meth:`restore`).

    Each newer step that fails (unreadable or missing data, unparsable metadata, or
    ``check(meta)`` raising) gets a one-line warning and is moved to
    ``<step>.corrupt-<time>``, so the run can save that step again.

    Returns:
      ``(step, state, meta)``, or None if the folder has no checkpoint.

    Raises:
      CheckpointError: if no checkpoint restores; it names each step's problem, and
        nothing is moved or deleted.
    """
    problems: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(abstract_state, step)
        if check is not None:
          check(restored[2])
      except Exception as e:  # noqa: BLE001 (any reason the step cannot be resumed)
        problems.append((step, describe_error(e)))
        silence_abandoned_reads()
        continue
      for bad, why in problems:
        moved = self._set_aside(bad)
        self._warn(
          f"checkpoint step {bad} in {self.directory} is unreadable ({why}); moved it to "
          f"{moved.name}; resuming from step {step}"
        )
      return restored
    if not problems:
      return None
    listed = "; ".join(f"step {s}: {why}" for s, why in problems)
    raise CheckpointError(
      f"no checkpoint in {self.directory} can be restored ({listed}); nothing was deleted: "
      "repair them, or move the folder away to start the run over"
    )

  def _set_aside(self, step: int) -> pathlib.Path:
    """Renames step folder ``step`` to ``<step>.corrupt-<time>`` (the primary process)."""
    moved = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(moved)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._manager.reload()
    return moved

  def close(self) -> None:
    """Finishes (and verifies) a pending save, then closes orbax's threads."""
    try:
      self._finish_pending()
    finally:
      self._manager.close()
