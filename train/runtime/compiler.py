"""XLA compiler options for the training steps."""

from __future__ import annotations

from typing import Any

import jax

# XLA:CPU options for the optimizer steps (README, Performance; measured by
# benchmarks/optimizer_step.py --compiler-option ...). Region analysis stops copy insertion
# from copying DualOptim+'s base moments every step (6.35x -> 2.11x adamw); the
# memory-optimized scheduler lets the 8-bit chunk loops hand their update directions to
# the parameter update through 17 MiB of temporaries instead of 110 MiB for 25 M params
# (DualOptim+ 8-bit 9.1x -> 7.6x adamw, DualOptim 8-bit 6.3x -> 4.2-4.5x).
XLA_CPU_STEP_OPTIONS = {
  "xla_cpu_copy_insertion_use_region_analysis": True,
  "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}


def step_compiler_options() -> dict[str, Any] | None:
  """``compiler_options`` for ``jax.jit`` of a training step: XLA_CPU_STEP_OPTIONS on a CPU
  backend, None elsewhere (the options are XLA:CPU's)."""
  return dict(XLA_CPU_STEP_OPTIONS) if jax.default_backend() == "cpu" else None
