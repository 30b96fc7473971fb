"""Two-stream samplers: the alternating (forget/retain) schedule and the joint one, with
a small state that resumes them exactly."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from dualoptax import FORGET, scheduled_objective
from train.data.batches import QABatch
from train.data.streams import BatchStream, StreamPosition


@dataclasses.dataclass(frozen=True)
class SamplerState:
  """Everything needed to resume a sampler exactly.

  Attributes:
    step: Steps taken so far (the index of the next step, over both objectives; the
      optimizer's step count).
    forget: The forget stream's position.
    retain: The retain stream's position.
  """

  step: int = 0
  forget: StreamPosition = StreamPosition()
  retain: StreamPosition = StreamPosition()

  def to_dict(self) -> dict[str, int]:
    """A flat dict of ints (JSON-serializable)."""
    return {
      "step": self.step,
      "forget_epoch": self.forget.epoch,
      "forget_offset": self.forget.offset,
      "retain_epoch": self.retain.epoch,
      "retain_offset": self.retain.offset,
    }

  @classmethod
  def from_dict(cls, state: Mapping[str, Any]) -> SamplerState:
    """Inverse of :meth:`to_dict`.

    Raises:
      ValueError: A key is missing or a value is not an integer.
    """
    keys = ("step", "forget_epoch", "forget_offset", "retain_epoch", "retain_offset")
    missing = [k for k in keys if k not in state]
    if missing:
      raise ValueError(f"sampler state lacks {missing}; got keys {sorted(state)}")
    values = {}
    for k in keys:
      if isinstance(state[k], bool) or not isinstance(state[k], (int, np.integer)):
        raise ValueError(f"sampler state {k!r} must be an integer, got {state[k]!r}")
      values[k] = int(state[k])
    return cls(
      values["step"],
      StreamPosition(values["forget_epoch"], values["forget_offset"]),
      StreamPosition(values["retain_epoch"], values["retain_offset"]),
    )


class _TwoStreamSampler:
  """Shared by the samplers: the two streams, the step count and the state."""

  def __init__(self, forget: BatchStream, retain: BatchStream, state: SamplerState | None):
    if forget is retain:
      raise ValueError("forget and retain must be two different BatchStream objects")
    self.forget = forget
    self.retain = retain
    self.step = 0
    if state is not None:
      self.restore(state)

  @property
  def state(self) -> SamplerState:
    """The current state; pass it to :meth:`restore` or a new sampler's ``state``."""
    return SamplerState(self.step, self.forget.position, self.retain.position)

  def restore(self, state: SamplerState) -> None:
    """Moves the sampler (and its streams) to ``state``.

    Raises:
      ValueError: A negative step or a position outside a stream.
    """
    if state.step < 0:
      raise ValueError(f"sampler state step must be >= 0, got {state.step}")
    self.forget.position = state.forget
    self.retain.position = state.retain
    self.step = state.step

  def __iter__(self):
    return self


class AlternatingSampler(_TwoStreamSampler):
  """Yields ``(objective, batch)``: ``forget_steps`` forget batches, then ``retain_steps``
  retain batches.

  Step ``s`` (0-based, counted over both objectives) is a forget step iff
  ``s mod (forget_steps + retain_steps) < forget_steps``: the same schedule as
  :func:`dualoptax.dualoptim_plus`'s, so with a sampler and an optimizer that start at the
  same step the objective of each batch is the one the optimizer expects. Each stream moves
  only on its own steps and restarts (next epoch, reshuffled) when it runs out.

  Example::

      sampler = AlternatingSampler(forget_stream, retain_stream, forget_steps=1, retain_steps=5)
      for objective, batch in itertools.islice(sampler, num_steps):
        ...
      checkpoint["sampler"] = sampler.state.to_dict()
      # later:
      sampler = AlternatingSampler(forget_stream, retain_stream, 1, 5,
                                   state=SamplerState.from_dict(checkpoint["sampler"]))
  """

  def __init__(
    self,
    forget: BatchStream,
    retain: BatchStream,
    forget_steps: int = 1,
    retain_steps: int = 5,
    *,
    state: SamplerState | None = None,
  ):
    """Creates the sampler.

    Args:
      forget: The forget batches.
      retain: The retain batches.
      forget_steps: ``F_f``, forget steps per cycle (>= 0).
      retain_steps: ``F_r``, retain steps per cycle (>= 0; ``F_f + F_r >= 1``).
      state: Resume from here (overrides the streams' positions); ``None`` starts at step 0
        with the streams where they are.

    Raises:
      ValueError: Bad step counts or state.
    """
    for name, value in (("forget_steps", forget_steps), ("retain_steps", retain_steps)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if forget_steps + retain_steps < 1:
      raise ValueError("forget_steps + retain_steps must be >= 1, got 0 + 0")
    self.forget_steps = forget_steps
    self.retain_steps = retain_steps
    super().__init__(forget, retain, state)

  def objective_at(self, step: int) -> int:
    """The objective of step ``step`` (a Python int), by :func:`dualoptax.scheduled_objective`."""
    return int(scheduled_objective(step, (self.forget_steps, self.retain_steps)))

  def __next__(self) -> tuple[int, QABatch]:
    objective = self.objective_at(self.step)
    batch = next(self.forget if objective == FORGET else self.retain)
    self.step += 1
    return objective, batch


class JointSampler(_TwoStreamSampler):
  """Yields ``(forget_batch, retain_batch)`` every step, for joint-loss optimizers (e.g. Adam).

  Args:
    forget: The forget batches.
    retain: The retain batches.
    state: Resume from here; ``None`` starts at step 0 with the streams where they are.
  """

  def __init__(
    self, forget: BatchStream, retain: BatchStream, *, state: SamplerState | None = None
  ):
    super().__init__(forget, retain, state)

  def __next__(self) -> tuple[QABatch, QABatch]:
    batches = next(self.forget), next(self.retain)
    self.step += 1
    return batches
