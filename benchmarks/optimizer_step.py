"""Wall-clock cost of one optimizer step: dualoptax vs ``optax.adamw``.

Run from the project root::

    python benchmarks/optimizer_step.py                # 12 x 1024x2048 (~25M params)
    python benchmarks/optimizer_step.py --size small   # 12 x 256x512, a quick check

Every optimizer gets one jitted, AOT-compiled step

    step(params, opt_state, grads, objective) -> (params, opt_state)

doing ``tx.update(grads, opt_state, params, objective=objective)`` and
``optax.apply_updates``, with params and state donated (grads are shared and not). The
optimizers are compiled and warmed up first, then timed in alternation inside one process
(round r times one step of each optimizer, the starting optimizer rotating every round) so
that drift of a shared, noisy machine hits all of them alike. Ours are passed FORGET and
RETAIN alternately. Reported: median ms/step, the ratio of medians to ``optax.adamw``,
the median of the per-round ratios, and the optimizer state in bytes per parameter.

Memory-traffic model (float32): an Adam step reads params, grads, m, v and writes params,
m, v (7 arrays of the parameter size); DualOptim moves the same 7 (one row of each
stacked moment); DualOptim+ reads params, grads, B, V, D_o, E_o and writes params, B, V,
D_o, E_o (11 arrays). A memory-bound step should therefore cost about 1.0x and 11/7 =
1.57x Adam.

To add a variant (e.g. 8-bit states), append an ``OptimizerSpec`` to ``OPTIMIZERS`` (or
call ``register``): a name, a factory returning an optax transformation and whether its
``update`` takes ``objective=``. ``--only`` selects entries by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

# Runnable as `python benchmarks/optimizer_step.py` without installing the package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dualoptax  # noqa: E402

REFERENCE = "optax.adamw"
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01

SIZES = {
    # name: (number of matrices, rows, cols)
    "full": (12, 1024, 2048),   # 25,165,824 params, ~100 MB per float32 copy
    "small": (12, 256, 512),    # 1,572,864 params
}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One benchmarked optimizer.

  Attributes:
    name: label in the table (and for ``--only``).
    factory: builds the optax transformation (called once).
    takes_objective: whether ``update`` accepts ``objective=`` (dualoptax transforms);
      if False the step ignores the objective argument.
    expected_state_bytes: optional expected state bytes/param, printed for comparison.
  """

  name: str
  factory: Callable[[], optax.GradientTransformation]
  takes_objective: bool = True
  expected_state_bytes: Optional[float] = None


OPTIMIZERS: list[OptimizerSpec] = [
    OptimizerSpec(REFERENCE, lambda: optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
                  takes_objective=False, expected_state_bytes=8),
    OptimizerSpec("dualoptax.adamw",
                  lambda: dualoptax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
                  expected_state_bytes=8),
    OptimizerSpec("dualoptax.dualoptim",
                  lambda: dualoptax.dualoptim(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
                  expected_state_bytes=16),
    OptimizerSpec("dualoptax.dualoptim_plus",
                  lambda: dualoptax.dualoptim_plus(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
                  expected_state_bytes=24),
    # Hook for later variants, e.g.:
    # OptimizerSpec("dualoptax.dualoptim_plus (8-bit)",
    #               lambda: dualoptax.dualoptim_plus(..., state_dtype=...),
    #               expected_state_bytes=6),
]


def register(spec: OptimizerSpec) -> None:
  """Adds an optimizer to the benchmark (before ``main`` runs)."""
  if any(s.name == spec.name for s in OPTIMIZERS):
    raise ValueError(f"an optimizer named {spec.name!r} is already registered")
  OPTIMIZERS.append(spec)


# --------------------------------------------------------------------------- data


def make_tree(key: jax.Array, num: int, rows: int, cols: int, scale: float) -> dict:
  """A dict of ``num`` float32 (rows, cols) matrices, normal * scale, fixed by ``key``."""
  keys = jax.random.split(key, num)
  return {f"layer_{i:02d}": scale * jax.random.normal(k, (rows, cols), jnp.float32)
          for i, k in enumerate(keys)}


def num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def tree_nbytes(tree) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def copy_tree(tree):
  """A fresh device copy (each optimizer donates, so owns, its own params)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# --------------------------------------------------------------------------- steps


def make_step(spec: OptimizerSpec, tx: optax.GradientTransformation) -> Callable:
  """The un-jitted step ``(params, opt_state, grads, objective) -> (params, opt_state)``."""
  if spec.takes_objective:
    def step(params, opt_state, grads, objective):
      updates, opt_state = tx.update(grads, opt_state, params, objective=objective)
      return optax.apply_updates(params, updates), opt_state
  else:
    def step(params, opt_state, grads, objective):
      del objective
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
  return step


def compile_step(step: Callable, params, opt_state, grads, objective):
  """AOT-compiles ``step`` with params and state donated."""
  return jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt_state, grads, objective).compile()


@dataclasses.dataclass
class Runner:
  spec: OptimizerSpec
  compiled: Callable
  params: object
  opt_state: object
  state_bytes: int
  times: list = dataclasses.field(default_factory=list)

  def run(self, grads, objective) -> float:
    """One step, blocked until its outputs are ready; returns seconds."""
    t0 = time.perf_counter()
    self.params, self.opt_state = self.compiled(self.params, self.opt_state, grads, objective)
    jax.block_until_ready((self.params, self.opt_state))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="full")
  parser.add_argument("--steps", type=int, default=30,
                      help="timed steps per optimizer (rounds); default 30")
  parser.add_argument("--warmup", type=int, default=3,
                      help="untimed steps per optimizer after compilation; default 3")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                      help=f"benchmark only these optimizers ({REFERENCE} is always kept)")
  parser.add_argument("--dump-hlo", default=None, metavar="DIR",
                      help="write each optimizer's optimized (compiled) HLO to DIR")
  return parser.parse_args(argv)


def _fmt_ratio(x: Optional[float]) -> str:
  return "-" if x is None else f"{x:.2f}x"


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.steps < 1:
    raise SystemExit("--steps must be >= 1")
  specs = list(OPTIMIZERS)
  if args.only:
    wanted = set(args.only) | {REFERENCE}
    unknown = wanted - {s.name for s in specs}
    if unknown:
      raise SystemExit(f"unknown optimizer(s) {sorted(unknown)}; "
                       f"known: {[s.name for s in specs]}")
    specs = [s for s in specs if s.name in wanted]

  num, rows, cols = SIZES[args.size]
  key_p, key_g = jax.random.split(jax.random.PRNGKey(args.seed))
  params0 = make_tree(key_p, num, rows, cols, 0.02)
  grads = make_tree(key_g, num, rows, cols, 1e-3)
  jax.block_until_ready((params0, grads))
  n = num_params(params0)
  objectives = [jnp.asarray(dualoptax.FORGET, jnp.int32),
                jnp.asarray(dualoptax.RETAIN, jnp.int32)]

  device = jax.devices()[0]
  print(f"jax {jax.__version__}, optax {optax.__version__}, "
        f"device {device.platform}:{getattr(device, 'device_kind', '?')} "
        f"({jax.device_count()} device(s)), host {platform.machine()} with "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}")
  print(f"pytree: {num} x ({rows}, {cols}) float32 = {n:,} params "
        f"({n * 4 / 2**20:.0f} MiB per copy); steps {args.steps}, warmup {args.warmup}")

  # Build, compile and warm up every optimizer.
  runners: list[Runner] = []
  for spec in specs:
    tx = spec.factory()
    params = copy_tree(params0)
    opt_state = tx.init(params)
    state_bytes = tree_nbytes(opt_state)
    step = make_step(spec, tx)
    t0 = time.perf_counter()
    compiled = compile_step(step, params, opt_state, grads, objectives[0])
    compile_s = time.perf_counter() - t0
    if args.dump_hlo:
      os.makedirs(args.dump_hlo, exist_ok=True)
      path = os.path.join(args.dump_hlo, spec.name.replace(" ", "_") + ".hlo.txt")
      with open(path, "w") as f:
        f.write(compiled.as_text())
    runner = Runner(spec, compiled, params, opt_state, state_bytes)
    for i in range(args.warmup):
      runner.run(grads, objectives[i % 2])
    print(f"  compiled {spec.name} in {compile_s:.1f}s")
    runners.append(runner)
  del params0
  gc.collect()

  # Alternate: every round times one step of each optimizer; the start rotates.
  for r in range(args.steps):
    objective = objectives[r % 2]
    for i in range(len(runners)):
      runner = runners[(r + i) % len(runners)]
      runner.times.append(runner.run(grads, objective))

  # Sanity: every optimizer kept finite params.
  for runner in runners:
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(runner.params))
    if not finite:
      print(f"WARNING: {runner.spec.name} produced non-finite params", file=sys.stderr)

  ref = next(r for r in runners if r.spec.name == REFERENCE)
  ref_median = statistics.median(ref.times)
  print()
  print("| optimizer | ms/step (median) | ratio to optax.adamw | median per-round ratio "
        "| min ms | state bytes/param |")
  print("|---|---:|---:|---:|---:|---:|")
  for runner in runners:
    med = statistics.median(runner.times)
    per_round = statistics.median(t / t_ref for t, t_ref in zip(runner.times, ref.times))
    bpp = runner.state_bytes / n
    expected = runner.spec.expected_state_bytes
    bpp_text = f"{bpp:.2f}" + ("" if expected is None or abs(bpp - expected) < 0.01
                               else f" (expected {expected})")
    print(f"| {runner.spec.name} | {med * 1e3:.2f} | {_fmt_ratio(med / ref_median)} | "
          f"{_fmt_ratio(per_round)} | {min(runner.times) * 1e3:.2f} | {bpp_text} |")
  print()
  print(f"ratio = median(ms/step) / median(ms/step of {REFERENCE}); per-round ratio = "
        f"median over rounds of t/t_{REFERENCE} within the round. "
        f"{args.steps} timed steps each.")

  # Free every optimizer's buffers before returning.
  for runner in runners:
    jax.tree.map(lambda x: x.delete(), (runner.params, runner.opt_state))
  runners.clear()
  return 0


if __name__ == "__main__":
  sys.exit(main())
