"""Device mesh and the ONE table of logical-axis rules that places every array.

Parameters carry logical axis names (``models/sharding.py``). ``LOGICAL_AXIS_RULES`` maps
each name to a mesh axis (or None: replicated along it). Optimizer states follow their
parameters by ``dualoptax.state_shardings``: a moment (also stacked per objective, or as
8-bit codes) gets its parameter's placement; per-block absmax and code tables are split
over the axes that shard the parameters (``fsdp``); counters are replicated. Batches are
split over every mesh axis along the batch dimension (data parallel and FSDP both consume
batch shards).

On one device every placement is trivial, and the same code runs on 8 GPUs or a TPU pod
by changing the mesh sizes in the config.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import dualoptax
from train.config import MeshConfig

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch dimension is split over all of them

# Logical parameter axis -> mesh axis. FSDP shards the model width; everything else is
# replicated (add a "tensor" mesh axis and map heads / mlp / vocab to it for tensor
# parallelism).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
  ("embed", "fsdp"),
  ("vocab", None),
  ("heads", None),
  ("kv_heads", None),
  ("mlp", None),
  ("position", None),
  ("head_dim", None),
)


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: all); -1 takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = config.data, config.fsdp
  if data == -1 and fsdp == -1:
    raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
  if data == -1:
    data = len(devices) // fsdp
  if fsdp == -1:
    fsdp = len(devices) // data
  if data * fsdp != len(devices):
    raise ValueError(
      f"mesh data={config.data} x fsdp={config.fsdp} does not cover the {len(devices)} devices"
    )
  return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES)


def _mesh_spec(logical: Any, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Logical names -> mesh axes, replicating a dimension its mesh axis does not divide."""
  rules = dict(LOGICAL_AXIS_RULES)
  axes = []
  for name, size in zip(tuple(logical), shape):
    axis = rules.get(name) if name is not None else None
    axes.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
  return P(*axes)


def param_shardings(params: Any, mesh: Mesh) -> Any:
  """NamedShardings for an ``nnx.State`` of parameters, from their logical axis names."""
  logical = nnx.get_partition_spec(params)
  return jax.tree.map(
    lambda spec, x: NamedSharding(mesh, _mesh_spec(spec, x.shape, mesh)),
    logical,
    params,
    is_leaf=lambda s: isinstance(s, P),
  )


def state_shardings(opt_state: Any, params: Any, param_sharding: Any, mesh: Mesh) -> Any:
  """NamedShardings for an optimizer state: each moment follows its parameter.

  The rule is dualoptax's (:func:`dualoptax.state_shardings`): moments take their
  parameter's placement, 8-bit absmax and code tables are split over the mesh axes that
  shard the parameters when those divide them, and counters are replicated.
  """
  return dualoptax.state_shardings(opt_state, params, param_sharding, mesh)


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
  """Batch arrays ``[grad_accum, B, T]``: rows split over every mesh axis."""
  return NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (ndim - 2))))


def place_batch(local_batch: Any, sharding: NamedSharding, axis: int = 1) -> Any:
  """Builds global batch arrays from each process's rows of them.

  Every process passes its own contiguous share of the rows
  (``train.runtime.distributed.host_rows``) as host arrays; the result holds
  ``process_count`` times as many rows along ``axis``, placed by ``sharding`` without any
  process loading another's rows. In one process this is a plain ``device_put`` of the whole batch.

  Args:
    local_batch: A pytree of numpy arrays, this process's rows along ``axis``.
    sharding: Where the global arrays go (e.g. :func:`batch_sharding`).
    axis: The batch (row) axis.

  Returns:
    The pytree of global ``jax.Array`` values.
  """

  def place(local):
    local = np.asarray(local)
    global_shape = list(local.shape)
    global_shape[axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))

  return jax.tree.map(place, local_batch)


def per_device_bytes(tree: Any) -> dict[Any, int]:
  """Bytes of ``tree``'s arrays held by each device (its addressable shards)."""
  totals: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals
