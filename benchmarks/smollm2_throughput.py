"""Forward+backward tokens/s and peak memory of SmolLM2-135M: ours (JAX) vs transformers (PyTorch).

Run from the project root (it takes several minutes on two cores)::

    python benchmarks/smollm2_throughput.py                    # batch 4 x 256, all variants
    python benchmarks/smollm2_throughput.py --dtypes float32 --remat none,full --rounds 5

SmolLM2-135M-Instruct's GGUF (`python -m models.fetch smollm2`) is loaded by transformers'
GGUF reader for PyTorch and by `models.load_pretrained` for ours (or, before
`models/gguf.py` existed, from a folder transformers saved), so both sides run the same
weights on the same batch of random token ids. One step is the mean next-token
cross-entropy and the gradient of every parameter: PyTorch's `loss.backward()` in eager
mode; ours one `jax.jit`-compiled `value_and_grad`. Variants: float32 and bfloat16
(parameters and compute), each without and with rematerialization (ours: `ModelConfig.remat`
"full" and "dots"; PyTorch: `activation_checkpointing_enable()`, i.e. "full"). After warm-up
every variant is timed in alternating rounds (the order reversed every round), so drift of
a shared machine hits all alike; reported are median and best ms/step and tokens/s.
PyTorch runs on one thread by default (--torch-threads): its OpenMP threads spin-wait when
the cores are shared, and on the project's busy 2-core machine a float32 step took 37 s with
2 threads against 10.7 s with one. XLA uses its own thread pool over every core.

Peak memory of ours is XLA's `memory_analysis()` of the compiled step: `temp` (activations
and every other temporary), the arguments (parameters, batch) and the outputs (loss,
gradients); peak = arguments + outputs + temp. PyTorch's is not measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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
from models import fetch  # noqa: E402

DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}
# XLA:CPU's scheduler for train's steps (train/runtime/compiler.py); --memory-optimized.
MEMORY_OPTIMIZED = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
MIB = 2**20


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
  parser.add_argument("--remat", default="none,full,dots", help="ours: comma-separated")
  parser.add_argument("--no-torch-remat", action="store_true", help="skip torch's checkpointing")
  parser.add_argument("--torch-threads", type=int, default=1, help="0: torch's default")
  parser.add_argument(
    "--memory-optimized", action="store_true", help="compile ours with train's XLA:CPU scheduler"
  )
  return parser.parse_args()


def _gguf_path() -> Path:
  path = fetch.cached_path("smollm2")
  return Path(path) if path is not None else Path(fetch.fetch("smollm2"))


def _load_torch(gguf: Path) -> torch.nn.Module:
  """SmolLM2 in PyTorch (float32), dequantized by transformers' GGUF reader."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
  )
  return model.train()  # dropout rates are 0


def _load_ours(gguf: Path, torch_model: torch.nn.Module, dtype) -> models.CausalLM:
  """Ours from the GGUF file; without models/gguf.py, from a folder transformers saved."""
  try:
    import models.gguf  # noqa: F401
  except ImportError:
    with tempfile.TemporaryDirectory() as folder:
      torch_model.config.quantization_config = None  # a GGUF-loaded model refuses to save
      torch_model.hf_quantizer = None
      torch_model.save_pretrained(folder)
      return models.load_pretrained(folder, dtype=dtype)[0]
  return models.load_pretrained(gguf, dtype=dtype)[0]


def _torch_step(
  model: torch.nn.Module, ids: torch.Tensor, checkpointing: bool
) -> Callable[[], float]:
  def step() -> float:
    # A switch on the model, so one model serves both variants.
    if checkpointing:
      model.activation_checkpointing_enable()
    else:
      model.activation_checkpointing_disable()
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(
      logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
    )
    loss.backward()
    return loss.item()  # .item() waits for the computation

  return step


def _jax_step(model: models.CausalLM, ids: jax.Array, options: dict | None):
  """(step, memory analysis) of one compiled loss-and-gradient step of `model`."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  # The batch is an argument, as in a training step (closed over, XLA would
  # constant-fold the target one-hots into the program).
  def loss_and_grads(params, ids):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params, rest)(ids)
      log_probs = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.take_along_axis(log_probs, ids[:, 1:, None], -1).mean()

    return jax.value_and_grad(loss_fn)(params)

  compiled = jax.jit(loss_and_grads).lower(params, ids).compile(compiler_options=options)

  def step() -> float:
    loss, grads = compiled(params, ids)
    jax.block_until_ready(grads)
    return float(loss)

  return step, compiled.memory_analysis()


def _steps(args: argparse.Namespace):
  """Every variant's step (name -> step) and ours' memory analyses (name -> analysis)."""
  gguf = _gguf_path()
  torch_model = _load_torch(gguf)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, torch_model.config.vocab_size, (args.batch, args.seq))
  options = MEMORY_OPTIMIZED if args.memory_optimized else None
  steps, memory = {}, {}
  for dtype_name in args.dtypes.split(","):
    jax_dtype, torch_dtype = DTYPES[dtype_name]
    ours = _load_ours(gguf, torch_model, jax_dtype)
    for remat in args.remat.split(","):
      ours.set_remat(remat)
      name = f"ours {dtype_name} remat={remat}"
      steps[name], memory[name] = _jax_step(ours, jnp.asarray(ids, jnp.int32), options)
    theirs = _load_torch(gguf).to(torch_dtype)
    for checkpointing in (False, True)[: 1 if args.no_torch_remat else 2]:
      name = f"PyTorch {dtype_name} remat={'full' if checkpointing else 'none'}"
      steps[name] = _torch_step(theirs, torch.from_numpy(ids), checkpointing)
  return steps, memory


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


def _report(args, losses: dict, times: dict, memory: dict, load_before: float) -> None:
  tokens = args.batch * args.seq
  print(f"load average (1 min) before/after timing: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
  print(
    f"SmolLM2-135M-Instruct; batch {args.batch} x {args.seq} = {tokens} tokens/step; "
    f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
    f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; XLA:CPU scheduler "
    f"{'memory-optimized' if args.memory_optimized else 'default'}; "
    f"median of {args.rounds} alternating rounds"
  )
  print(
    f"{'variant':32s} {'loss':>7s} {'median ms':>10s} {'tokens/s':>9s} {'best ms':>8s} "
    f"{'temp MiB':>9s} {'peak MiB':>9s}"
  )
  for name, t in times.items():
    median, best = statistics.median(t), min(t)
    temp = peak = "-"
    if name in memory:
      m = memory[name]
      temp = f"{m.temp_size_in_bytes / MIB:.0f}"
      peak_bytes = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
      peak = f"{(peak_bytes - m.alias_size_in_bytes) / MIB:.0f}"
    print(
      f"{name:32s} {losses[name]:7.4f} {1e3 * median:10.0f} {tokens / median:9.0f} "
      f"{1e3 * best:8.0f} {temp:>9s} {peak:>9s}"
    )


def main() -> None:
  args = _parse_args()
  transformers.logging.set_verbosity_error()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  steps, memory = _steps(args)
  losses = {name: step() for name, step in steps.items()}  # warm-up
  load_before = os.getloadavg()[0]
  times = _time_alternating(steps, args.rounds)
  _report(args, losses, times, memory, load_before)


if __name__ == "__main__":
  main()
