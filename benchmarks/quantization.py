"""Wall-clock cost of block-wise 8-bit quantize and dequantize.

Run from the project root::

    python benchmarks/quantization.py              # 25M float32 values, median of 10
    python benchmarks/quantization.py --size 1000000 --repeats 20

Times three jitted, AOT-compiled functions over ``size`` float32 values (a (size,)
vector; its length need not be a multiple of the block size):

* ``quantize``: x -> (codes, absmax); reads 4 bytes and writes ~1 byte per value;
* ``dequantize``: (codes, absmax) -> x; reads ~1 byte and writes 4 bytes per value;
* ``round trip``: x -> dequantize(quantize(x)), one program (XLA may keep the codes in
  registers).

each in two variants: ``args``, the lookup tables enter the compiled function as
parameters (the way the 8-bit optimizer carries them in its state), and ``const``, the
same tables closed over so that XLA embeds them in the program.

Reported: median and min ms over ``repeats`` timed calls after a warm-up, and the median's
throughput in float32 values per nanosecond.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

# Runnable as `python benchmarks/quantization.py` without installing the package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dualoptax import quantization  # noqa: E402


def _quantize(x, tables):
  return quantization.quantize_blockwise(x, tables)


def _dequantize(codes, absmax, tables):
  return quantization.dequantize_blockwise(codes, absmax, tables)


def _round_trip(x, tables):
  return _dequantize(*_quantize(x, tables), tables)


def _time_ms(fn, *args, repeats: int) -> list[float]:
  jax.block_until_ready(fn(*args))  # Warm-up (allocations, caches).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return times


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=25_000_000, help="float32 values")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--signed", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args(argv)

  tables = quantization.tables_for(args.signed)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(args.size, dtype=np.float32))

  codes, absmax = jax.jit(_quantize)(x, tables)
  data = {
    "quantize": (_quantize, (x,)),
    "dequantize": (_dequantize, (codes, absmax)),
    "round trip": (_round_trip, (x,)),
  }

  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform} "
    f"({platform.machine()}, {os.cpu_count()} cpus); {args.size:,} float32 values, "
    f"{'signed' if args.signed else 'unsigned'} map, block 256, {args.repeats} runs"
  )
  for name, (fn, fn_args) in data.items():
    as_arguments = jax.jit(fn).lower(*fn_args, tables).compile()
    as_constants = jax.jit(lambda *a, fn=fn: fn(*a, tables)).lower(*fn_args).compile()
    for variant, compiled, call_args in (
      ("args", as_arguments, (*fn_args, tables)),
      ("const", as_constants, fn_args),
    ):
      times = _time_ms(compiled, *call_args, repeats=args.repeats)
      median = statistics.median(times)
      print(
        f"  {name:10s} {variant:5s}  median {median:7.1f} ms   min {min(times):7.1f} ms"
        f"   {args.size / (median * 1e6):5.2f} values/ns"
      )


if __name__ == "__main__":
  main()
