"""Forward+backward tokens/s of a tiny Phi: our Flax NNX model vs transformers' PyTorch.

Run from the project root::

    python benchmarks/model_throughput.py                      # 4 layers, d=256, batch 8 x 128
    python benchmarks/model_throughput.py --batch 4 --seq 256

One random `PhiForCausalLM` is built with transformers, saved with
`save_pretrained` and loaded by `models.load_pretrained`, so both sides run
the same weights on the same batch. One step is the mean next-token
cross-entropy and the gradient of every parameter (PyTorch: `loss.backward()`
in eager mode with its default attention; ours: one `jax.jit`-compiled
`value_and_grad`). After warm-up the two are timed in alternating rounds, so
drift of a shared machine hits both alike; reported are median and best
ms/step, tokens/s and the ratio ours / PyTorch (target >= 1.0). The 1-minute
load average is printed before and after: on a busy machine PyTorch's
OpenMP threads degrade far more than XLA's, so compare runs on an idle box
(the "best" column is the least disturbed step of each).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=15)
  return parser.parse_args()


def _torch_step(model: torch.nn.Module, ids: torch.Tensor):
  def step() -> float:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(
      logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    return loss.item()  # .item() waits for the computation

  return step


def _jax_step(model: models.CausalLM, ids: jax.Array):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  # The batch is an argument, as in a training step (closed over, XLA would
  # constant-fold the target one-hots into the program).
  @jax.jit
  def loss_and_grads(params, ids):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params, rest)(ids)
      log_probs = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.take_along_axis(log_probs, ids[:, 1:, None], -1).mean()

    return jax.value_and_grad(loss_fn)(params)

  def step() -> float:
    loss, grads = loss_and_grads(params, ids)
    jax.block_until_ready(grads)
    return float(loss)

  return step


def _models(args: argparse.Namespace):
  """A random tiny Phi in transformers (PyTorch) and the same weights in our Flax model."""
  torch.manual_seed(0)
  hf_config = transformers.PhiConfig(
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    intermediate_size=4 * args.hidden,
    num_hidden_layers=args.layers,
    num_attention_heads=args.heads,
    max_position_embeddings=max(2048, args.seq),
    partial_rotary_factor=0.5,
  )
  torch_model = transformers.PhiForCausalLM(hf_config).train()  # dropout rates are 0
  with tempfile.TemporaryDirectory() as tmp:
    torch_model.save_pretrained(tmp)
    our_model, _ = models.load_pretrained(tmp, dtype=jnp.float32)
  return torch_model, our_model


def _time_alternating(steps: dict, rounds: int) -> dict[str, list[float]]:
  """Seconds per call of each step, alternating their order every round."""
  times: dict[str, list[float]] = {name: [] for name in steps}
  for r in range(rounds):
    order = list(steps) if r % 2 == 0 else list(reversed(steps))
    for name in order:
      start = time.perf_counter()
      steps[name]()
      times[name].append(time.perf_counter() - start)
  return times


def _report(args, losses: dict, times: dict, load_before: float) -> None:
  tokens = args.batch * args.seq
  print(f"load average (1 min) before/after timing: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
  print(
    f"Phi: {args.layers} layers, d={args.hidden}, {args.heads} heads, vocab {args.vocab}; "
    f"batch {args.batch} x {args.seq} = {tokens} tokens/step; float32; "
    f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
    f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; "
    f"median of {args.rounds} alternating rounds"
  )
  header = ("implementation", "loss", "median ms", "tokens/s", "best ms", "tokens/s")
  widths = (30, 7, 10, 9, 8, 9)
  print(
    " ".join(f"{h:>{w}s}" if i else f"{h:{w}s}" for i, (h, w) in enumerate(zip(header, widths)))
  )
  medians = {name: statistics.median(t) for name, t in times.items()}
  bests = {name: min(t) for name, t in times.items()}
  for name in times:
    median, best = medians[name], bests[name]
    print(
      f"{name:30s} {losses[name]:7.4f} {1e3 * median:10.1f} {tokens / median:9.0f} "
      f"{1e3 * best:8.1f} {tokens / best:9.0f}"
    )
  torch_name, ours_name = list(times)
  print(
    f"ratio ours / PyTorch tokens/s: median {medians[torch_name] / medians[ours_name]:.2f}x, "
    f"best {bests[torch_name] / bests[ours_name]:.2f}x"
  )


def main() -> None:
  args = _parse_args()
  transformers.logging.set_verbosity_error()
  torch_model, our_model = _models(args)
  ids_np = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
  steps = {
    "transformers (PyTorch eager)": _torch_step(torch_model, torch.from_numpy(ids_np)),
    "ours (JAX jit, Flax NNX)": _jax_step(our_model, jnp.asarray(ids_np, jnp.int32)),
  }
  losses = {name: step() for name, step in steps.items()}  # warm-up and compile
  for step in steps.values():
    step()
  load_before = os.getloadavg()[0]
  times = _time_alternating(steps, args.rounds)
  _report(args, losses, times, load_before)


if __name__ == "__main__":
  main()
