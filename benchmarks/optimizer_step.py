"""Wall-clock cost of one optimizer step: dualoptax vs ``optax.adamw``.

Run from the project root::

    python benchmarks/optimizer_step.py                # 12 x 1024x2048 (~25M params)
    python benchmarks/optimizer_step.py --size small   # 12 x 256x512, a quick check
    python benchmarks/optimizer_step.py --include-8bit --devices 2  # over 2 CPU devices

Every optimizer gets one jitted, AOT-compiled step

    step(params, opt_state, grads, objective) -> (params, opt_state)

doing ``tx.update(grads, opt_state, params, objective=objective)`` and
``optax.apply_updates``, with params and state donated (grads are shared and not). The
optimizers are compiled and warmed up first, then timed in alternation inside one process
(round r times one step of each optimizer, the starting optimizer rotating every round) so
that drift of a shared, noisy machine hits all of them alike. Ours are passed FORGET and
RETAIN alternately. Reported: median ms/step, the ratio of medians to ``optax.adamw``,
the median of the per-round ratios, and the optimizer state in bytes per parameter.

Memory-traffic model (float32, arrays of the parameter size). Fused into one pass, an
Adam step reads params, grads, m, v and writes params, m, v (7 arrays); DualOptim moves
the same 7 (one row of each stacked moment) and DualOptim+ 11 (params, grads, B, V, D_o,
E_o in; params, B, V, D_o, E_o out), i.e. 1.0x and 1.57x Adam. XLA:CPU does not fuse
several outputs into one loop: each updated array gets its own pass, so optax.adamw
itself moves 11 arrays (m: 3, v: 3, params: 5) and the floor for DualOptim+ is about
20-24 (1.8-2.2x). The "XLA temp buffer" printed per optimizer should be 0 for the
float32 states: a temporary array means a copy or an unfused intermediate, and on
Linux/glibc every temp buffer over 32 MiB is a fresh mmap each step, whose page faults can
cost more than the copy itself. (The 8-bit states' chunk loops hand each parameter's
update direction out in a parameter-sized buffer: ~4.4 bytes per parameter of temp, all
live at once unless ``--compiler-option
xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`` lets one buffer serve them
in turn: 17 MiB instead of 110 for the full tree.) The project's recommended options are
``train.runtime.compiler.XLA_CPU_STEP_OPTIONS``. ``--dump-hlo DIR`` writes the optimized HLO (look
for ``copy(`` of the state); ``--compiler-option KEY=VALUE`` passes XLA options to every
step. ``--devices N`` splits
every array over an N-device ``fsdp`` mesh (simulated host devices on CPU) the way
``train/runtime/sharding.py`` does: each matrix and its moments by rows, 8-bit absmax and code
tables along their last axis.

To add a variant, append an ``OptimizerSpec`` to ``OPTIMIZERS`` (or call ``register``):
a name, a factory returning an optax transformation, whether its ``update`` takes
``objective=`` and optionally the expected state bytes/param. The 8-bit-state variants
live in ``OPTIMIZERS_8BIT`` (``--include-8bit``). ``--only NAME ...`` selects entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence


def _requested_devices(argv: Sequence[str]) -> int:
  """``--devices N`` from the command line, read before jax starts (XLA fixes the number
  of host devices when it initializes)."""
  value = "1"
  for i, arg in enumerate(argv):
    if arg == "--devices" and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith("--devices="):
      value = arg.split("=", 1)[1]
  if not value.isdigit() or int(value) < 1:
    raise SystemExit(f"--devices expects a positive integer, got {value!r}")
  return int(value)


if __name__ == "__main__" and _requested_devices(sys.argv[1:]) > 1:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
    f"device_count={_requested_devices(sys.argv[1:])}"
  ).strip()

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
  "full": (12, 1024, 2048),  # 25,165,824 params, ~100 MB per float32 copy
  "small": (12, 256, 512),  # 1,572,864 params
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
  expected_state_bytes: float | None = None


OPTIMIZERS: list[OptimizerSpec] = [
  OptimizerSpec(
    REFERENCE,
    lambda: optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
    takes_objective=False,
    expected_state_bytes=8,
  ),
  OptimizerSpec(
    "dualoptax.adamw",
    lambda: dualoptax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
    expected_state_bytes=8,
  ),
  OptimizerSpec(
    "dualoptax.dualoptim",
    lambda: dualoptax.dualoptim(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
    expected_state_bytes=16,
  ),
  OptimizerSpec(
    "dualoptax.dualoptim_plus",
    lambda: dualoptax.dualoptim_plus(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
    expected_state_bytes=24,
  ),
]

# 8-bit states: one uint8 code per value plus one float32 absmax per 256-value block
# (~1.016 bytes per moment value) and the code tables (~130 KiB, shared). Opt-in with
# --include-8bit; skipped if the installed dualoptax has no `state_bits` argument yet.
OPTIMIZERS_8BIT: list[OptimizerSpec] = [
  OptimizerSpec(
    "dualoptax.dualoptim (8-bit)",
    lambda: dualoptax.dualoptim(LEARNING_RATE, weight_decay=WEIGHT_DECAY, state_bits=8),
    expected_state_bytes=4 * (1 + 4 / 256),
  ),
  OptimizerSpec(
    "dualoptax.dualoptim_plus (8-bit)",
    lambda: dualoptax.dualoptim_plus(LEARNING_RATE, weight_decay=WEIGHT_DECAY, state_bits=8),
    expected_state_bytes=6 * (1 + 4 / 256),
  ),
]


def _dualoptim_plus_8bit_forced(update_in_chunks: bool) -> OptimizerSpec:
  form = "chunk loop" if update_in_chunks else "whole-array"
  return OptimizerSpec(
    f"dualoptax.dualoptim_plus (8-bit, {form})",
    lambda: dualoptax.dualoptim_plus(
      LEARNING_RATE,
      weight_decay=WEIGHT_DECAY,
      storage=dualoptax.MomentStorage(state_bits=8, update_in_chunks=update_in_chunks),
    ),
    expected_state_bytes=6 * (1 + 4 / 256),
  )


# The default picks the chunk loop on one CPU device and whole-array updates otherwise;
# --include-8bit also times the form the default did not pick, for comparison. Keyed by
# whether the default picks the loop.
OPTIMIZERS_8BIT_OTHER_FORM = {
  True: _dualoptim_plus_8bit_forced(update_in_chunks=False),
  False: _dualoptim_plus_8bit_forced(update_in_chunks=True),
}


def _supports_state_bits() -> bool:
  try:
    return "state_bits" in inspect.signature(dualoptax.dualoptim_plus).parameters
  except (TypeError, ValueError):
    return False


def register(spec: OptimizerSpec) -> None:
  """Adds an optimizer to the benchmark (before ``main`` runs)."""
  if any(s.name == spec.name for s in OPTIMIZERS):
    raise ValueError(f"an optimizer named {spec.name!r} is already registered")
  OPTIMIZERS.append(spec)


# --------------------------------------------------------------------------- data


def make_tree(key: jax.Array, num: int, rows: int, cols: int, scale: float) -> dict:
  """A dict of ``num`` float32 (rows, cols) matrices, normal * scale, fixed by ``key``."""
  keys = jax.random.split(key, num)
  return {
    f"layer_{i:02d}": scale * jax.random.normal(k, (rows, cols), jnp.float32)
    for i, k in enumerate(keys)
  }


def num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def tree_nbytes(tree) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def copy_tree(tree):
  """A fresh device copy (each optimizer donates, so owns, its own params)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def make_placer(devices: int, matrix_shape: tuple[int, int]) -> Callable:
  """``place(tree)``: the tree's arrays split over a ``devices``-wide ``fsdp`` mesh (the
  identity for one device), as ``train/runtime/sharding.py`` places an FSDP-sharded model: the
  parameter matrices and every moment of their shape (stacked per objective too) by rows;
  other float arrays (8-bit absmax, code tables) along their last axis when it divides;
  integer counters replicated."""
  if devices == 1:
    return lambda tree: tree
  if jax.device_count() != devices:
    raise SystemExit(f"--devices {devices}: jax sees {jax.device_count()} devices")
  mesh = jax.make_mesh((devices,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

  def spec(x) -> jax.sharding.PartitionSpec:
    axes = [None] * x.ndim
    if tuple(x.shape[-2:]) == tuple(matrix_shape):
      axis = x.ndim - 2
    elif x.ndim and jnp.issubdtype(x.dtype, jnp.floating):
      axis = x.ndim - 1
    else:
      return jax.sharding.PartitionSpec()
    if x.shape[axis] % devices == 0:
      axes[axis] = "fsdp"
    return jax.sharding.PartitionSpec(*axes)

  return lambda tree: jax.tree.map(
    lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(x))), tree
  )


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


def compile_step(
  step: Callable, params, opt_state, grads, objective, compiler_options: dict | None = None
):
  """AOT-compiles ``step`` with params and state donated (and kept where they are)."""
  keep = jax.tree.map(lambda x: x.sharding, (params, opt_state))
  return (
    jax.jit(step, donate_argnums=(0, 1), out_shardings=keep)
    .lower(params, opt_state, grads, objective)
    .compile(compiler_options or None)
  )


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


def build_runner(
  spec: OptimizerSpec,
  params0,
  grads,
  objectives,
  args,
  compiler_options: dict,
  place: Callable = lambda tree: tree,
) -> Runner:
  """Builds, AOT-compiles and warms up one optimizer on its own copy of the params."""
  tx = spec.factory()
  params = place(copy_tree(params0))
  opt_state = place(tx.init(params))
  state_bytes = tree_nbytes(opt_state)
  step = make_step(spec, tx)
  t0 = time.perf_counter()
  compiled = compile_step(step, params, opt_state, grads, objectives[0], compiler_options)
  compile_s = time.perf_counter() - t0
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in spec.name)
    with open(os.path.join(args.dump_hlo, safe + ".hlo.txt"), "w") as f:
      f.write(compiled.as_text())
  runner = Runner(spec, compiled, params, opt_state, state_bytes)
  for i in range(args.warmup):
    runner.run(grads, objectives[i % 2])
  temp_mib = _temp_mib(compiled)
  print(
    f"  compiled {spec.name} in {compile_s:.1f}s"
    + ("" if temp_mib is None else f" (XLA temp buffer {temp_mib:.0f} MiB)")
  )
  return runner


def _temp_mib(compiled) -> float | None:
  try:
    return compiled.memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # noqa: BLE001 -- not every backend reports it
    return None


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  # No abbreviations: --devices is read before argparse runs (see _requested_devices).
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  parser.add_argument("--size", choices=sorted(SIZES), default="full")
  parser.add_argument(
    "--steps", type=int, default=30, help="timed steps per optimizer (rounds); default 30"
  )
  parser.add_argument(
    "--warmup", type=int, default=3, help="untimed steps per optimizer after compilation; default 3"
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--only",
    nargs="+",
    default=None,
    metavar="NAME",
    help=f"benchmark only these optimizers ({REFERENCE} is always kept)",
  )
  parser.add_argument(
    "--include-8bit",
    action="store_true",
    help="also benchmark the 8-bit-state variants (OPTIMIZERS_8BIT)",
  )
  parser.add_argument(
    "--devices",
    type=int,
    default=1,
    help="split every array over this many (simulated CPU) devices",
  )
  parser.add_argument(
    "--dump-hlo",
    default=None,
    metavar="DIR",
    help="write each optimizer's optimized (compiled) HLO to DIR",
  )
  parser.add_argument(
    "--compiler-option",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="XLA compiler option for every step, e.g. "
    "xla_cpu_copy_insertion_use_region_analysis=true (repeatable)",
  )
  return parser.parse_args(argv)


def _compiler_options(pairs: Sequence[str]) -> dict:
  options = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise SystemExit(f"--compiler-option expects KEY=VALUE, got {pair!r}")
    lowered = value.lower()
    options[key] = True if lowered == "true" else False if lowered == "false" else value
  return options


def _fmt_ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}x"


def _select_specs(args: argparse.Namespace) -> list[OptimizerSpec]:
  """The optimizers to time: the default list, the 8-bit variants if asked, ``--only``."""
  specs = list(OPTIMIZERS)
  if args.include_8bit:
    if _supports_state_bits():
      specs += [s for s in OPTIMIZERS_8BIT if s.name not in {t.name for t in specs}]
      default_loops = jax.default_backend() == "cpu" and jax.device_count() == 1
      specs.append(OPTIMIZERS_8BIT_OTHER_FORM[default_loops])
    else:
      print("note: this dualoptax has no `state_bits` argument; 8-bit variants skipped")
  if args.only:
    wanted = set(args.only) | {REFERENCE}
    unknown = wanted - {s.name for s in specs}
    if unknown:
      raise SystemExit(f"unknown optimizer(s) {sorted(unknown)}; known: {[s.name for s in specs]}")
    specs = [s for s in specs if s.name in wanted]
  return specs


def _print_setup(args: argparse.Namespace, compiler_options: dict, n: int) -> None:
  num, rows, cols = SIZES[args.size]
  device = jax.devices()[0]
  print(
    f"jax {jax.__version__}, optax {optax.__version__}, "
    f"device {device.platform}:{getattr(device, 'device_kind', '?')} "
    f"({jax.device_count()} device(s)), host {platform.machine()} with "
    f"{os.cpu_count()} CPUs, python {platform.python_version()}"
  )
  if compiler_options:
    print(f"compiler options: {compiler_options}")
  print(
    f"pytree: {num} x ({rows}, {cols}) float32 = {n:,} params "
    f"({n * 4 / 2**20:.0f} MiB per copy); steps {args.steps}, warmup {args.warmup}"
  )


def _build_runners(specs, params0, grads, objectives, args, compiler_options, place):
  """Builds, compiles and warms up every optimizer: ``(runners, names that failed)``."""
  runners: list[Runner] = []
  failed: list[str] = []
  for spec in specs:
    try:
      runner = build_runner(spec, params0, grads, objectives, args, compiler_options, place)
    except Exception as e:  # noqa: BLE001 -- report and benchmark the others
      if spec.name == REFERENCE:
        raise
      print(f"  SKIPPED {spec.name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      failed.append(spec.name)
      continue
    runners.append(runner)
  return runners, failed


def _time_rounds(runners: list[Runner], grads, objectives, steps: int) -> None:
  """Alternates: every round times one step of each optimizer; the start rotates."""
  for r in range(steps):
    objective = objectives[r % 2]
    for i in range(len(runners)):
      runner = runners[(r + i) % len(runners)]
      runner.times.append(runner.run(grads, objective))
  for runner in runners:  # Sanity: every optimizer kept finite params.
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(runner.params)):
      print(f"WARNING: {runner.spec.name} produced non-finite params", file=sys.stderr)


def _state_bytes_text(runner: Runner, n: int) -> str:
  bpp = runner.state_bytes / n
  expected = runner.spec.expected_state_bytes
  # Small extras (step counters, 8-bit code tables) may add a few hundredths.
  tolerance = 0.05 if expected is None else max(0.05, 0.02 * expected)
  if expected is None or abs(bpp - expected) <= tolerance:
    return f"{bpp:.2f}"
  return f"{bpp:.2f} (expected {expected:.2f})"


def _print_table(runners: list[Runner], n: int, failed: list[str], steps: int) -> None:
  ref = next(r for r in runners if r.spec.name == REFERENCE)
  ref_median = statistics.median(ref.times)
  print()
  print(
    "| optimizer | ms/step (median) | ratio to optax.adamw | median per-round ratio "
    "| min ms | state bytes/param |"
  )
  print("|---|---:|---:|---:|---:|---:|")
  for runner in runners:
    med = statistics.median(runner.times)
    per_round = statistics.median(t / t_ref for t, t_ref in zip(runner.times, ref.times))
    print(
      f"| {runner.spec.name} | {med * 1e3:.2f} | {_fmt_ratio(med / ref_median)} | "
      f"{_fmt_ratio(per_round)} | {min(runner.times) * 1e3:.2f} | "
      f"{_state_bytes_text(runner, n)} |"
    )
  print()
  if failed:
    print(f"not benchmarked (failed to build/compile): {', '.join(failed)}")
  print(
    f"ratio = median(ms/step) / median(ms/step of {REFERENCE}); per-round ratio = "
    f"median over rounds of t/t_{REFERENCE} within the round. {steps} timed steps each."
  )


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.steps < 1:
    raise SystemExit("--steps must be >= 1")
  specs = _select_specs(args)
  compiler_options = _compiler_options(args.compiler_option)
  num, rows, cols = SIZES[args.size]
  key_p, key_g = jax.random.split(jax.random.PRNGKey(args.seed))
  place = make_placer(args.devices, (rows, cols))
  params0 = make_tree(key_p, num, rows, cols, 0.02)
  grads = place(make_tree(key_g, num, rows, cols, 1e-3))
  jax.block_until_ready((params0, grads))
  n = num_params(params0)
  objectives = [jnp.asarray(dualoptax.FORGET, jnp.int32), jnp.asarray(dualoptax.RETAIN, jnp.int32)]
  _print_setup(args, compiler_options, n)

  runners, failed = _build_runners(specs, params0, grads, objectives, args, compiler_options, place)
  del params0
  gc.collect()
  _time_rounds(runners, grads, objectives, args.steps)
  _print_table(runners, n, failed, args.steps)

  # Free every optimizer's buffers before returning.
  for runner in runners:
    jax.tree.map(lambda x: x.delete(), (runner.params, runner.opt_state))
  runners.clear()
  return 0


if __name__ == "__main__":
  sys.exit(main())
