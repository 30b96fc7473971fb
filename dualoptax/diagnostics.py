"""Conflict diagnostics (the paper's Figure 2): how far apart the objectives' updates are.

For DualOptim+ the update term of objective ``o`` is its bias-corrected first moment
``Dh_o + Bh``; its preconditioned update is ``(Dh_o + Bh) / (sqrt(|Eh_o + Vh|) + eps)``.
When forget and retain agree, the base explains both and the two terms point the same
way (cosine near 1) with small deltas; when they conflict, the base shrinks and the
deltas carry opposite directions (cosine near -1), which is DualOptim's decoupled regime.
For DualOptim the terms are each objective's own ``m_o`` and ``m_o / (sqrt(v_o) + eps)``.

The functions read a state (a transform's own state or any optax state containing
exactly one of them, e.g. the alias's chain state) and return per-leaf values, shaped like
the params, and totals over all leaves. They are pure and jittable, and accept the state
of an ``nnx.Optimizer`` (``optimizer.opt_state``) as well. The decays and eps
come from the record the alias keeps in its state (:func:`dualoptax.hyperparameters`),
never from the caller, so they cannot disagree with the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp

from dualoptax import _moments, _numerics, _record, objectives, quantization, transform

State = TypeVar("State")


class ConflictDiagnostics(NamedTuple):
  """Cosines and norms of the objectives' update terms; each field per leaf or total.

  For K objectives, ``a`` and ``b`` are the two objectives compared (FORGET and RETAIN
  by default); ``*_norm`` and ``delta_base_cosine`` have a leading axis of size K.
  """

  update_cosine: Any  # cos(first-moment term of a, of b): Dh_a + Bh vs Dh_b + Bh.
  preconditioned_cosine: Any  # cos of the full updates of a and b (before the lr).
  delta_base_cosine: Any  # (K,) cos(Dh_o, Bh); zeros for DualOptim (no base).
  update_norm: Any  # (K,) norm of each objective's first-moment term.
  delta_norm: Any  # (K,) norm of each objective's bias-corrected delta Dh_o.
  base_norm: Any  # norm of the bias-corrected base Bh (zero for DualOptim).


def find_state(opt_state: Any, state_type: type[State]) -> State:
  """Returns the single ``state_type`` inside ``opt_state`` (e.g. a chain's state).

  Raises:
    ValueError: if there is none, or more than one.
  """
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, state_type))
    if isinstance(s, state_type)
  ]
  if len(found) != 1:
    raise ValueError(
      f"expected exactly one {state_type.__name__} in the optimizer state, found {len(found)}"
    )
  return found[0]


def _correct(moment: jax.Array, beta: Any, count: jax.Array) -> jax.Array:
  """Bias-corrects a float32 moment that has absorbed ``count`` values (0 -> unchanged)."""
  denominator = _numerics.one_minus_power(beta, count)
  safe = jnp.where(count > 0, denominator, 1.0)
  return moment / safe


def _gram(stacked: jax.Array) -> jax.Array:
  """(K, K) matrix of dot products between the K rows of a (K, ...) array."""
  rows = stacked.reshape(stacked.shape[0], -1)
  return jnp.matmul(rows, rows.T, precision=jax.lax.Precision.HIGHEST)


def _sums(first, precond, base) -> dict[str, jax.Array]:
  """Sufficient statistics of one leaf: dot products and squared norms (float32)."""
  delta = (first - base[None]).reshape(first.shape[0], -1)
  base = base.reshape(-1)
  return dict(
    first_dot=_gram(first),
    precond_dot=_gram(precond),
    delta_base=delta @ base if base.size else jnp.zeros(first.shape[0]),
    delta_sq=jnp.sum(delta * delta, axis=1),
    base_sq=jnp.sum(base * base),
  )


def _finish(sums: dict[str, jax.Array], a: int, b: int) -> ConflictDiagnostics:
  def cosine(dot, sq_x, sq_y):
    return dot / jnp.maximum(jnp.sqrt(sq_x * sq_y), jnp.finfo(jnp.float32).tiny)

  first_sq = jnp.diagonal(sums["first_dot"])
  precond_sq = jnp.diagonal(sums["precond_dot"])
  return ConflictDiagnostics(
    update_cosine=cosine(sums["first_dot"][a, b], first_sq[a], first_sq[b]),
    preconditioned_cosine=cosine(sums["precond_dot"][a, b], precond_sq[a], precond_sq[b]),
    delta_base_cosine=cosine(sums["delta_base"], sums["delta_sq"], sums["base_sq"]),
    update_norm=jnp.sqrt(first_sq),
    delta_norm=jnp.sqrt(sums["delta_sq"]),
    base_norm=jnp.sqrt(sums["base_sq"]),
  )


def _diagnose(terms_per_leaf, like, a, b):
  """Per-leaf and total diagnostics from a tree of (first, precond, base) tuples."""
  treedef = jax.tree.structure(like)
  leaf_sums = [_sums(*terms) for terms in treedef.flatten_up_to(terms_per_leaf)]
  per_leaf = [_finish(s, a, b) for s in leaf_sums]
  per_leaf = ConflictDiagnostics(
    *(  # one tree per field
      treedef.unflatten([getattr(d, f) for d in per_leaf]) for f in ConflictDiagnostics._fields
    )
  )
  total = _finish(jax.tree.map(lambda *xs: sum(xs), *leaf_sums), a, b)
  return per_leaf, total


def _hyperparameters(opt_state, state_type, given: Mapping[str, Any] | None) -> dict[str, Any]:
  """The state's recorded hyperparameters, or ``given`` for a state without a record."""
  if given is None:
    return _record.hyperparameters(opt_state, state_type)
  if _record.holds_record(opt_state, state_type):
    raise ValueError(
      f"the optimizer state records the hyperparameters of its {state_type.__name__}; "
      "do not pass hyperparams"
    )
  return dict(given)


def dualoptim_plus_diagnostics(
  opt_state: Any,
  *,
  a: int = objectives.FORGET,
  b: int = objectives.RETAIN,
  hyperparams: Mapping[str, Any] | None = None,
) -> tuple[ConflictDiagnostics, ConflictDiagnostics]:
  """Conflict diagnostics of a DualOptim+ state, as of its last step.

  The decays and eps are those the optimizer recorded in its state
  (:func:`dualoptax.hyperparameters`), so they always match the run.

  Args:
    opt_state: the state of :func:`dualoptax.dualoptim_plus` (or its multi-objective
      form), alone or inside any optax state, e.g. a chain or ``inject_hyperparams``,
      also as held by ``flax.nnx.Optimizer`` (its variables are read as their values).
    a, b: the two objectives compared by the cosines.
    hyperparams: only for a state without a record (a chain you built from
      :func:`dualoptax.scale_by_dualoptim_plus`): ``b1, b2, base_b1, base_b2, eps``.

  Returns:
    ``(per_leaf, total)``: per-leaf diagnostics (each field a tree like the params) and
    the same quantities over all leaves together.

  Raises:
    ValueError: if the state holds no single ``ScaleByDualOptimPlusState``, or no record
      of its hyperparameters and ``hyperparams`` is None (or a record and ``hyperparams``).

  Example:
    >>> import jax.numpy as jnp, dualoptax
    >>> tx = dualoptax.dualoptim_plus(1e-3)
    >>> params = {'w': jnp.ones(4)}
    >>> state = tx.init(params)
    >>> for g in (jnp.array([1., 2, 3, 4]), jnp.array([-1., -2, -3, 4])):
    ...   _, state = tx.update({'w': g}, state, params)
    >>> per_leaf, total = dualoptax.dualoptim_plus_diagnostics(state)
    >>> bool(total.update_cosine < 1.0)
    True
  """
  opt_state = _moments.unwrap_variables(opt_state)
  s = find_state(opt_state, transform.ScaleByDualOptimPlusState)
  hp = _hyperparameters(opt_state, transform.ScaleByDualOptimPlusState, hyperparams)
  return _on_auto_axes(_plus_diagnostics, s, hp, a, b)


def _plus_diagnostics(s: transform.ScaleByDualOptimPlusState, hp: dict, a: int, b: int):
  counts = s.objective_counts

  def terms(base_mu, base_nu, delta_mu, delta_nu):
    mu_base = _correct(_moments.load(base_mu, s.tables), hp["base_b1"], s.count)
    nu_base = _correct(_moments.load(base_nu, s.tables), hp["base_b2"], s.count)
    k_counts = counts.reshape((-1,) + (1,) * mu_base.ndim)
    delta_first = _correct(_moments.load(delta_mu, s.tables, stacked=True), hp["b1"], k_counts)
    delta_second = _correct(_moments.load(delta_nu, s.tables, stacked=True), hp["b2"], k_counts)
    first = delta_first + mu_base[None]
    precond = first / (jnp.sqrt(jnp.abs(delta_second + nu_base[None])) + hp["eps"])
    return first, precond, mu_base

  moments = (s.base_mu, s.base_nu, s.delta_mu, s.delta_nu)
  out = jax.tree.map(terms, *moments, is_leaf=_moments.is_8bit)
  return _diagnose(out, jax.tree.map(lambda m: 0, s.base_mu, is_leaf=_moments.is_8bit), a, b)


def _on_auto_axes(diagnose: Any, s: Any, hp: dict, a: int, b: int):
  """``diagnose(s, hp, a, b)``; for a state on explicit mesh axes, with those axes made
  automatic (its reshapes and contractions over sharded axes are then XLA's to
  partition) and replicated results."""

  def replicated():
    for leaf in jax.tree.leaves(s):
      if quantization.explicit_mesh_axes(leaf):
        mesh = quantization.type_sharding(leaf).mesh
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return None

  # Python numbers stay static (as without a mesh); injected arrays become arguments.
  arrays = {k: v for k, v in hp.items() if isinstance(v, jax.Array)}
  run = lambda s, arrays: diagnose(s, {**hp, **arrays}, a, b)
  return quantization.call_with_auto_axes(run, (s, arrays), replicated)


def dualoptim_diagnostics(
  opt_state: Any,
  *,
  a: int = objectives.FORGET,
  b: int = objectives.RETAIN,
  hyperparams: Mapping[str, Any] | None = None,
) -> tuple[ConflictDiagnostics, ConflictDiagnostics]:
  """Conflict diagnostics of a DualOptim state (no base: deltas are the moments).

  Args: as :func:`dualoptim_plus_diagnostics`; ``hyperparams`` holds ``b1, b2, eps``.

  Returns:
    ``(per_leaf, total)`` as :func:`dualoptim_plus_diagnostics`.
  """
  opt_state = _moments.unwrap_variables(opt_state)
  s = find_state(opt_state, transform.ScaleByDualOptimState)
  hp = _hyperparameters(opt_state, transform.ScaleByDualOptimState, hyperparams)
  return _on_auto_axes(_adam_diagnostics, s, hp, a, b)


def _adam_diagnostics(s: transform.ScaleByDualOptimState, hp: dict, a: int, b: int):
  counts = s.objective_counts

  def terms(mu, nu):
    mu = _moments.load(mu, s.tables, stacked=True)
    nu = _moments.load(nu, s.tables, stacked=True)
    k_counts = counts.reshape((-1,) + (1,) * (mu.ndim - 1))
    first = _correct(mu, hp["b1"], k_counts)
    precond = first / (jnp.sqrt(_correct(nu, hp["b2"], k_counts)) + hp["eps"])
    return first, precond, jnp.zeros_like(first[0])

  out = jax.tree.map(terms, s.mu, s.nu, is_leaf=_moments.is_8bit)
  return _diagnose(out, jax.tree.map(lambda m: 0, s.mu, is_leaf=_moments.is_8bit), a, b)


def state_nbytes(opt_state: Any) -> int:
  """Bytes held by an optimizer state (8-bit codes and their absmax included)."""
  return sum(int(x.nbytes) for x in jax.tree.leaves(opt_state))


def bytes_per_parameter(opt_state: Any, params: Any) -> float:
  """``state_nbytes(opt_state)`` divided by the number of parameter elements.

  Float32 states take 8 bytes per parameter for Adam, 16 for DualOptim and 24 for
  DualOptim+; 8-bit DualOptim+ takes about 6.09 on leaves that are quantized, plus a
  fixed 130 KiB for the code tables carried in the state.
  """
  count = sum(int(jnp.size(p)) for p in jax.tree.leaves(params))
  return state_nbytes(opt_state) / max(count, 1)
