"""Multi-process start-up: one JAX process per host, all driving one global mesh.

On a TPU VM pod slice, ``jax.distributed.initialize()`` discovers the slice by itself; on
GPU hosts (or anywhere else) set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on every host. With none of these, and no TPU
pod, the run stays single-process and nothing is initialized.
"""

from __future__ import annotations

import os

import jax

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_from_env(environ: dict[str, str] | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` when the environment describes several processes.

  Returns:
    True if this process joined a multi-process job.

  Raises:
    ValueError: if only some of the variables are set (the message names the missing ones).
  """
  env = os.environ if environ is None else environ
  present = [name for name in _ENV if env.get(name)]
  if env.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 and not present:
    jax.distributed.initialize()  # TPU pod slice: everything is discovered
    return True
  if not present:
    return False
  missing = [name for name in _ENV if name not in present]
  if missing:
    raise ValueError(f"multi-process start needs {list(_ENV)}; missing {missing}")
  if int(env["JAX_NUM_PROCESSES"]) <= 1:
    return False
  jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                             num_processes=int(env["JAX_NUM_PROCESSES"]),
                             process_id=int(env["JAX_PROCESS_ID"]))
  return True


def host_rows(batch_size: int) -> slice:
  """The rows of each global batch that this process loads (its share, in order)."""
  count, index = jax.process_count(), jax.process_index()
  if batch_size % count:
    raise ValueError(f"data.batch_size={batch_size} must be divisible by the {count} processes")
  share = batch_size // count
  return slice(index * share, (index + 1) * share)
