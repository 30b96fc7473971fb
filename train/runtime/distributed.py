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
  # CPU processes need a cross-process collectives library (GPUs use NCCL, TPUs their ICI);
  # this setting only concerns the CPU backend, so it is harmless on accelerator hosts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
    num_processes=int(env["JAX_NUM_PROCESSES"]),
    process_id=int(env["JAX_PROCESS_ID"]),
  )
  return True


def host_rows(batch_size: int) -> slice:
  """The rows of each global batch that this process loads (its share, in order)."""
  count, index = jax.process_count(), jax.process_index()
  if batch_size % count:
    raise ValueError(f"data.batch_size={batch_size} must be divisible by the {count} processes")
  share = batch_size // count
  return slice(index * share, (index + 1) * share)


def is_primary() -> bool:
  """Whether this process writes the run's shared files (metrics, config, exported model)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (a no-op in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


def fetch_global(tree):
  """The full value of every array of ``tree`` as numpy, on every process.

  Sharded arrays of a multi-process mesh are not addressable from one host; this gathers
  them (one collective). In one process it is a plain ``jax.device_get``.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return multihost_utils.process_allgather(tree, tiled=True)
