"""How many CPU cores XLA:CPU uses for loops and for whole-array kernels.

Run from the project root::

    python benchmarks/xla_cpu_threads.py

The 8-bit optimizers rewrite their states in a ``lax.fori_loop`` over cache-sized chunks
on one CPU device (``_moments.update_quantized``). This script measures what that costs in
parallelism, on the same elementwise work (``sin(x) * 1.0001 + cos(x)`` over 4M float32
values, in place in a donated buffer):

* ``whole array``: one kernel over all values, which XLA:CPU splits over its threads;
* ``loop, chunk C``: a ``fori_loop`` over chunks of C values: every iteration's kernels
  run on one thread, whatever C;
* ``K independent loops``: K loops over K different arrays in one program; XLA:CPU never
  runs them concurrently (cpu/wall stays 1.00), although nothing orders them.

For each it prints the median wall time and ``cpu/wall``, the process CPU time over the
wall time (the number of cores busy on average; at most the machine's core count).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

SIZE = 1 << 22
STEPS = 10


def _work(x: jax.Array) -> jax.Array:
  return jnp.sin(x) * 1.0001 + jnp.cos(x)


def looped(chunk: int):
  def body(i, x):
    piece = jax.lax.dynamic_slice(x, (i * chunk,), (chunk,))
    return jax.lax.dynamic_update_slice(x, _work(piece), (i * chunk,))

  return lambda x: jax.lax.fori_loop(0, x.shape[0] // chunk, body, x)


def measure(fn, arrays: list) -> tuple[float, float]:
  """(median ms, cpu/wall) of the jitted ``fn`` with every argument donated."""
  as_list = lambda *xs: list(jax.tree.leaves(fn(*xs)))
  compiled = jax.jit(as_list, donate_argnums=tuple(range(len(arrays)))).lower(*arrays).compile()
  arrays = jax.block_until_ready(compiled(*arrays))
  times = []
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for _ in range(STEPS):
    start = time.perf_counter()
    arrays = jax.block_until_ready(compiled(*arrays))
    times.append(time.perf_counter() - start)
  ratio = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
  return statistics.median(times) * 1e3, ratio


def main() -> int:
  rng = np.random.default_rng(0)
  fresh = lambda n: [jnp.asarray(rng.normal(size=SIZE), jnp.float32) for _ in range(n)]
  print(
    f"jax {jax.__version__}, {jax.default_backend()} with {os.cpu_count()} CPUs; "
    f"{SIZE:,} float32 values per array, median of {STEPS} runs"
  )
  print("| program | ms | cpu/wall |")
  print("|---|---:|---:|")
  rows = [("whole array", lambda x: _work(x), 1)]
  rows += [(f"loop, chunk {chunk:,}", looped(chunk), 1) for chunk in (1 << 14, 1 << 16, 1 << 20)]
  many_loops = lambda *xs: [looped(1 << 14)(x) for x in xs]
  rows += [(f"{k} independent loops, chunk 16,384", many_loops, k) for k in (2, 4)]
  for name, fn, arrays in rows:
    ms, ratio = measure(fn, fresh(arrays))
    print(f"| {name} | {ms:.1f} | {ratio:.2f} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
