"""How large DualOptim+'s updates get where a delta cancels the base second moment.

Run from the project root::

    python benchmarks/conditioning.py                  # 30 steps, 5 seeds
    python benchmarks/conditioning.py --single-leaf    # one 3x64x128 leaf instead
    python benchmarks/conditioning.py --steps 60 --seeds 10

DualOptim+ divides by ``sqrt(|Eh_o + Vh|) + eps``; where the objective's delta ``Eh_o``
nearly cancels the shared base ``Vh``, the update entry explodes. The trial: a tree of
three 64x128 float32 parameters (or one 3x64x128), i.i.d. N(0, 1) gradients, learning rate
1e-2, no weight decay, the paper's schedule of 1 forget step then 5 retain steps, with
float32 and 8-bit states, unguarded and with ``denominator_floor`` 0.01 and 0.1.

Per configuration (over all steps and seeds):

* ``max |u|/lr``: the largest update entry in units of the learning rate (the largest
  over seeds, and the median over seeds of each run's largest); an Adam step on such
  gradients stays near 1;
* ``max, t_o>1``: the largest over steps that are not their objective's first. At an
  objective's first step (t_o = 1, t > 1) ``Eh_o + Vh`` is ``g^2`` in exact arithmetic
  (and ``u = sign(g)``), but float32 computes it as ``(g^2 - Vh)(1 - b2) / (1 - b2^1) +
  Vh``: an absolute error of order ``1e-7 Vh`` (the float32 scalars ``1 - b2`` and
  ``1 - b2^1`` alone differ by 7.45e-8 relative for b2 = 0.95), so for ``|g|`` below
  about ``3e-4 sqrt(Vh)`` the denominator can vanish and ``|u|`` reach ``|g| / eps``.
  Whether it does depends on how XLA rounds and contracts the expression (it differs
  between the float32 and 8-bit paths, jit and eager, and leaf layouts). The state
  before that step cannot show it (``E_o`` is still zero), so the diagnostic misses it;
* ``share >10``: the share of update entries above 10 lr, from the updates themselves;
* ``diag cancelled``: :func:`dualoptax.dualoptim_plus_conditioning`'s
  ``cancelled_fraction`` (default fraction 0.01) of the objective about to step, taken
  from the state before each step, averaged over steps: the diagnostic's estimate of how
  often the denominator collapses, for comparison with ``share >10`` (an entry whose
  delta cancels 99 % of the base can reach 10x);
* ``diag floored``: the share where the floor acts (the diagnostic's
  ``floored_fraction``), averaged likewise.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualoptax

LEAVES = {"a": (64, 128), "b": (64, 128), "c": (64, 128)}
SINGLE_LEAF = {"w": (3, 64, 128)}
FLOORS = (None, 0.01, 0.1)


def run(floor, state_bits, steps, seed, lr, shapes):
  """One trial: largest |u|/lr (all steps; not first steps), share of entries > 10 lr,
  mean cancelled and floored fractions of the diagnostic."""
  tx = dualoptax.dualoptim_plus(lr, retain_steps=5, denominator_floor=floor, state_bits=state_bits)
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  diagnose = jax.jit(dualoptax.dualoptim_plus_conditioning)
  largest, later, above, entries, cancelled, floored, seen = 0.0, 0.0, 0, 0, [], [], set()
  for t in range(steps):
    objective = int(dualoptax.scheduled_objective(jnp.int32(t), (1, 5)))
    _, total = diagnose(state)
    cancelled.append(float(total.cancelled_fraction[objective]))
    floored.append(float(total.floored_fraction[objective]))
    grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    u = np.concatenate([np.abs(np.asarray(x)).ravel() for x in jax.tree.leaves(updates)]) / lr
    largest = max(largest, float(u.max()))
    if objective in seen:
      later = max(later, float(u.max()))
    seen.add(objective)
    above += int((u > 10).sum())
    entries += u.size
  return largest, later, above / entries, float(np.mean(cancelled)), float(np.mean(floored))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--single-leaf", action="store_true", help="one 3x64x128 parameter")
  args = parser.parse_args(argv)
  shapes = SINGLE_LEAF if args.single_leaf else LEAVES
  print(f"{args.steps} steps (1 forget : 5 retain), {args.seeds} seeds, lr {args.lr:g}, ", end="")
  print(f"params {' + '.join('x'.join(map(str, s)) for s in shapes.values())}, N(0,1) grads")
  header = (
    f"{'states':<7}{'floor':<7}{'max |u|/lr':>11}{'median max':>12}{'max, t_o>1':>12}"
    f"{'share >10':>11}"
    f"{'diag cancelled':>16}{'diag floored':>14}"
  )
  print(header)
  print("-" * len(header))
  for state_bits, name in ((None, "fp32"), (8, "8-bit")):
    for floor in FLOORS:
      results = [run(floor, state_bits, args.steps, s, args.lr, shapes) for s in range(args.seeds)]
      largest, later, share, cancelled, floored = zip(*results)
      print(
        f"{name:<7}{str(floor):<7}{max(largest):>11.1f}{statistics.median(largest):>12.1f}"
        f"{max(later):>12.1f}"
        f"{np.mean(share):>11.2e}{np.mean(cancelled):>16.2e}{np.mean(floored):>14.2e}"
      )


if __name__ == "__main__":
  main()
