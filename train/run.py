"""The default experiment: unlearn memorized facts with Adam, DualOptim and DualOptim+.

Until the language-model program lands (models/, TOFU data, evaluation), the default run
is a small but complete unlearning experiment that needs nothing from outside:

1. generate a synthetic "fact" dataset (random keys, each with a random answer class);
2. train a 2-layer MLP until it memorizes every fact (the target model);
3. unlearn the forget split (10 % of facts) from that same start with each optimizer:
   forget loss = KL to the uniform distribution (ME), retain loss = cross-entropy (GD),
   alternating 1 forget step and 5 retain steps (the paper's schedule); Adam takes the
   joint weighted loss, as in the paper's baseline;
4. print forget accuracy (lower is better), retain accuracy (higher is better), the
   forget/retain update cosine from the optimizer's diagnostics, time and state bytes.

Usage: ``python train/run.py [--steps N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualoptax

NUM_FACTS, KEY_DIM, HIDDEN, CLASSES, FORGET_FRACTION = 512, 32, 256, 16, 0.1


def make_facts(seed: int):
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(NUM_FACTS, KEY_DIM)).astype(np.float32)
  answers = rng.integers(0, CLASSES, size=NUM_FACTS).astype(np.int32)
  is_forget = np.zeros(NUM_FACTS, bool)
  is_forget[rng.permutation(NUM_FACTS)[: int(FORGET_FRACTION * NUM_FACTS)]] = True
  return (jnp.asarray(keys[is_forget]), jnp.asarray(answers[is_forget])), (
      jnp.asarray(keys[~is_forget]), jnp.asarray(answers[~is_forget]))


def init_mlp(seed: int):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
      "hidden": {"w": jax.random.normal(k1, (KEY_DIM, HIDDEN)) / np.sqrt(KEY_DIM),
                 "b": jnp.zeros(HIDDEN)},
      "out": {"w": jax.random.normal(k2, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
              "b": jnp.zeros(CLASSES)},
  }


def logits_of(params, x):
  h = jax.nn.gelu(x @ params["hidden"]["w"] + params["hidden"]["b"])
  return h @ params["out"]["w"] + params["out"]["b"]


def retain_loss(params, data):  # GD: cross-entropy on retain facts
  x, y = data
  return optax.softmax_cross_entropy_with_integer_labels(logits_of(params, x), y).mean()


def forget_loss(params, data):  # ME: KL(uniform || p) on forget facts, up to a constant
  x, _ = data
  return -jax.nn.log_softmax(logits_of(params, x)).mean()


def accuracy(params, data) -> float:
  x, y = data
  return float(jnp.mean(jnp.argmax(logits_of(params, x), -1) == y))


def memorize(params, retain, forget, steps=400):
  data = (jnp.concatenate([forget[0], retain[0]]), jnp.concatenate([forget[1], retain[1]]))
  tx = optax.adam(3e-3)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(retain_loss)(params, data)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params


def state_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state))


def unlearn(name, params, retain, forget, steps, lr=1e-3):
  schedule = dict(forget_steps=1, retain_steps=5)
  joint = name == "adam (joint)"
  tx = {
      "adam (joint)": lambda: dualoptax.adam(lr),
      "dualoptim": lambda: dualoptax.dualoptim(lr, **schedule),
      "dualoptim_plus": lambda: dualoptax.dualoptim_plus(lr, **schedule),
  }[name]()
  state = tx.init(params)

  @jax.jit
  def step(params, state, objective):
    if joint:
      grads = jax.grad(lambda p: forget_loss(p, forget) + retain_loss(p, retain))(params)
    else:
      grads = jax.lax.cond(
          objective == dualoptax.FORGET,
          lambda: jax.grad(forget_loss)(params, forget),
          lambda: jax.grad(retain_loss)(params, retain))
    updates, state = tx.update(grads, state, params, objective=objective)
    return optax.apply_updates(params, updates), state

  start = time.perf_counter()
  for s in range(steps):
    objective = dualoptax.scheduled_objective(jnp.int32(s), (1, 5))
    params, state = step(params, state, objective)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  cosine = float("nan")
  if name == "dualoptim_plus":
    cosine = float(dualoptax.dualoptim_plus_diagnostics(state)[1].update_cosine)
  elif name == "dualoptim":
    cosine = float(dualoptax.dualoptim_diagnostics(state)[1].update_cosine)
  return dict(forget_acc=accuracy(params, forget), retain_acc=accuracy(params, retain),
              cosine=cosine, seconds=seconds, state_bytes=state_bytes(state))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300, help="unlearning steps per optimizer")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  forget, retain = make_facts(args.seed)
  target = memorize(init_mlp(args.seed), retain, forget)
  print(f"target model: forget acc {accuracy(target, forget):.3f}, "
        f"retain acc {accuracy(target, retain):.3f} "
        f"({len(forget[1])} forget / {len(retain[1])} retain facts)")
  print(f"\n| optimizer | forget acc (lower better) | retain acc | forget/retain update "
        f"cosine | seconds | state bytes |\n|---|---|---|---|---|---|")
  for name in ("adam (joint)", "dualoptim", "dualoptim_plus"):
    r = unlearn(name, target, retain, forget, args.steps)
    print(f"| {name} | {r['forget_acc']:.3f} | {r['retain_acc']:.3f} | {r['cosine']:.3f} | "
          f"{r['seconds']:.2f} | {r['state_bytes']:,} |")


if __name__ == "__main__":
  main()
