"""A run's metric log: one JSON line per step in ``metrics.jsonl``, and TensorBoard scalars.

:class:`MetricsLogger` is the one place a run writes its metrics. On a resumed run it first
drops what a killed run logged after the checkpoint it resumes from, from both logs, so the
logs hold each step once and match the restored state. Only the primary process writes;
every process keeps the records (the run's history) in memory. A failed write (full or
read-only disk) raises an ``OSError`` naming the log's path; the rewrite on resume goes
through a temporary file, so it never truncates the log.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# How often (seconds) the TensorBoard writer's thread flushes its events to disk.
_FLUSH_SECS = 1


class MetricsLogger:
  """Logs a run's per-step records to ``run_dir/metrics.jsonl`` and ``run_dir/tensorboard``.

  Each record is a JSON-serializable dict with an int ``"step"``. The JSONL log gets the
  whole record; TensorBoard gets its float values, under their keys, at that step.

  Args:
    run_dir: The run's folder.
    start_step: The step the run starts after: 0 for a new run, the restored checkpoint's
      step on a resume. Lines of ``metrics.jsonl`` with a later step are dropped, and
      TensorBoard hides the earlier event files' events from step ``start_step + 1`` on.
    write: Whether this process writes the logs (the primary process; the others only
      keep the history).

  Example::

      with MetricsLogger(run_dir, start_step=0) as logger:
        logger.log({"step": 1, "loss": 2.5, "per_leaf": {"w": 0.5}})
  """

  def __init__(self, run_dir: str | os.PathLike[str], start_step: int = 0, write: bool = True):
    self.history: list[dict[str, Any]] = []
    self.path = pathlib.Path(run_dir) / METRICS_FILE
    self._tensorboard = None
    if not write:
      return
    if self.path.exists():  # drop what a killed run logged after its last checkpoint
      _keep_lines_through(self.path, start_step)
    self._tensorboard = _summary_writer(pathlib.Path(run_dir) / TENSORBOARD_DIR, start_step)

  def log(self, record: Mapping[str, Any]) -> None:
    """Appends ``record`` to the history and, on the writing process, to both logs."""
    self.history.append(dict(record))
    if self._tensorboard is None:
      return
    try:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    except OSError as e:  # a full or read-only disk: say which file, not just the errno
      raise OSError(
        e.errno, f"cannot write the metrics log: {e.strerror or e}", str(self.path)
      ) from e
    for tag, value in record.items():
      # Non-finite values (a constraint's bound before the first retain step, NaN until
      # observed; a skipped step's loss, which the non-finite guard reports) stay in the
      # JSON log; TensorBoard's curves skip them.
      if isinstance(value, float) and tag != "step" and math.isfinite(value):
        self._tensorboard.add_scalar(tag, value, record["step"])

  def close(self) -> None:
    """Writes every pending TensorBoard event to disk and closes the event file."""
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None

  def __enter__(self) -> MetricsLogger:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _keep_lines_through(path: pathlib.Path, step: int) -> None:
  """Rewrites the JSONL log at ``path`` without the records after ``step``."""
  kept = [
    line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
  ]
  # Written aside and renamed: a full disk fails the write, not the log it would replace.
  partial = path.with_name(path.name + ".tmp")
  try:
    partial.write_text("".join(line + "\n" for line in kept))
  except OSError as e:
    partial.unlink(missing_ok=True)
    raise OSError(e.errno, f"cannot rewrite the metrics log: {e.strerror or e}", str(path)) from e
  os.replace(partial, path)


def _summary_writer(log_dir: pathlib.Path, start_step: int):
  """A ``tensorboardX.SummaryWriter`` on a new event file in ``log_dir``."""
  # Imported here: tensorboardX imports torch when it is installed (the test extra), which
  # only the writing process of a run should pay for.
  import tensorboardX  # noqa: PLC0415

  earlier = log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*"))
  # tensorboardX names event files by the second and host and truncates an existing one:
  # the nanoseconds (which keep files of the same second in order) and the pid make each
  # writer's file new.
  suffix = f".{time.time_ns() % 10**9:09d}.{os.getpid()}"
  return tensorboardX.SummaryWriter(
    str(log_dir),
    # TensorBoard hides earlier files' events from this step on (a killed run's tail).
    purge_step=start_step + 1 if earlier else None,
    flush_secs=_FLUSH_SECS,
    filename_suffix=suffix,
  )
