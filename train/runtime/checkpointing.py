"""Checkpoints of a run: arrays (params, optimizer state, RNG) plus JSON metadata.

One orbax ``CheckpointManager`` per run folder. A checkpoint holds two items: ``state``,
any pytree of arrays (restored with the shardings of an abstract target, so a checkpoint
saved under one mesh restores under another), and ``meta``, a JSON dict for the plain
Python values a resume needs (the data sampler's position, the step, the config). An
unlearning run saves what it trains: the trained weights (with LoRA, the adapters only; the
frozen base is read again from ``model.path``) and their optimizer state. Saves
are atomic (orbax writes to a temporary folder and renames), so a run killed mid-save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class RunCheckpointer:
  """Saves and restores ``(state, meta)`` pairs under ``directory``.

  Args:
    directory: the run's checkpoint folder (created if missing).
    max_to_keep: how many most recent checkpoints to keep.
  """

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep!r}")
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_names=("state", "meta"),
    )

  def save(self, step: int, state: Any, meta: dict[str, Any], wait: bool = True) -> None:
    """Writes checkpoint ``step``; with ``wait`` it is complete on disk when this returns."""
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    if wait:
      self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

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

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
