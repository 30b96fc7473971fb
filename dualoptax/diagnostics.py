"""Diagnostics of a state: how far apart the objectives' updates are (the paper's Figure 2),
and how near DualOptim+'s denominators are to collapsing.

For DualOptim+ the update term of objective ``o`` is its bias-corrected first moment
``Dh_o + Bh``; its preconditioned update is ``(Dh_o + Bh) / (sqrt(|Eh_o + Vh|) + eps)``.
When forget and retain agree, the base explains both and the two terms point the same
way (cosine near 1) with small deltas; when they conflict, the base shrinks and the
deltas carry opposite directions (cosine near -1), which is DualOptim's decoupled regime.
For DualOptim the terms are each objective's own ``m_o`` and ``m_o / (sqrt(v_o) + eps)``.
Conditioning (:func:`dualoptim_plus_conditioning`): where the delta ``Eh_o`` cancels the
base ``Vh``, the denominator ``sqrt(|Eh_o + Vh|)`` collapses and the update explodes.

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


class _PlusTerms(NamedTuple):
  """One leaf's bias-corrected DualOptim+ terms, float32; the objective axis leads."""

  first: jax.Array  # (K, ...) Dh_o + Bh
  second: jax.Array  # (K, ...) |Eh_o + Vh|
  mu_base: jax.Array  # Bh
  nu_base: jax.Array  # Vh


def _plus_terms(s: transform.ScaleByDualOptimPlusState, hp: dict) -> Any:
  """A tree like the params of :class:`_PlusTerms` (8-bit moments dequantized)."""

  def terms(base_mu, base_nu, delta_mu, delta_nu):
    mu_base = _correct(_moments.load(base_mu, s.tables), hp["base_b1"], s.count)
    nu_base = _correct(_moments.load(base_nu, s.tables), hp["base_b2"], s.count)
    k_counts = s.objective_counts.reshape((-1,) + (1,) * mu_base.ndim)
    delta_first = _correct(_moments.load(delta_mu, s.tables, stacked=True), hp["b1"], k_counts)
    delta_second = _correct(_moments.load(delta_nu, s.tables, stacked=True), hp["b2"], k_counts)
    second = jnp.abs(delta_second + nu_base[None])
    return _PlusTerms(delta_first + mu_base[None], second, mu_base, nu_base)

  moments = (s.base_mu, s.base_nu, s.delta_mu, s.delta_nu)
  return jax.tree.map(terms, *moments, is_leaf=_moments.is_8bit)


def _plus_diagnostics(s: transform.ScaleByDualOptimPlusState, hp: dict, a: int, b: int):
  def conflict_terms(x: _PlusTerms):
    return x.first, x.first / (jnp.sqrt(x.second) + hp["eps"]), x.mu_base

  out = jax.tree.map(conflict_terms, _plus_terms(s, hp), is_leaf=_is_terms)
  return _diagnose(out, _param_like(s.base_mu), a, b)


def _is_terms(x: Any) -> bool:
  return isinstance(x, _PlusTerms)


def _param_like(moments: Any) -> Any:
  """A tree like the params (a zero per leaf), from one of their unstacked moments."""
  return jax.tree.map(lambda m: 0, moments, is_leaf=_moments.is_8bit)


def _on_auto_axes(diagnose: Any, s: Any, hp: dict, *static: Any):
  """``diagnose(s, hp, *static)``; for a state on explicit mesh axes, with those axes made
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
  run = lambda s, arrays: diagnose(s, {**hp, **arrays}, *static)
  return quantization.call_with_auto_axes(run, (s, arrays), replicated)


# Default of ``fraction`` in :func:`dualoptim_plus_conditioning`: an element counts as
# cancelled when its delta removes at least 99 % of its base second moment, which lets
# its update entry grow to 10x what the base alone would give.
DEFAULT_CANCELLATION_FRACTION = 0.01
_FRACTION = "cancellation fraction"  # its key in the hp dict of _plus_conditioning


class ConditioningDiagnostics(NamedTuple):
  """How near DualOptim+'s denominators are to collapsing; each field per leaf or total.

  Every field has a leading axis of size K: entry ``o`` describes objective ``o``'s next
  step (see :func:`dualoptim_plus_conditioning`).
  """

  cancelled_fraction: Any  # (K,) share of elements with |Eh_o + Vh| < fraction * Vh.
  floored_fraction: Any  # (K,) share where the run's denominator_floor acts (0 without).
  max_update: Any  # (K,) largest |u_o| entry the optimizer would apply, in units of lr_o.
  max_unguarded_update: Any  # (K,) largest entry by the paper's formula (no floor).


def dualoptim_plus_conditioning(
  opt_state: Any,
  *,
  fraction: float = DEFAULT_CANCELLATION_FRACTION,
  hyperparams: Mapping[str, Any] | None = None,
) -> tuple[ConditioningDiagnostics, ConditioningDiagnostics]:
  r"""How often DualOptim+'s denominator nearly vanishes, and how large updates get.

  DualOptim+ divides by ``sqrt(|Eh_o + Vh|) + eps``, where the base second moment
  ``Vh >= 0`` is shared and the delta ``Eh_o`` (an EMA of ``g^2 - Vh``) may be negative.
  Where ``Eh_o ~ -Vh`` the delta cancels the base, the denominator collapses and the
  update entry ``|Dh_o + Bh| / (sqrt(|Eh_o + Vh|) + eps)`` can reach ``|Dh_o + Bh| / eps``.
  For each objective ``o`` this reports, from the moments as they stand (the base
  bias-corrected as the next step will read it, ``Eh_o`` and ``Dh_o`` with ``o``'s own
  count), over the elements of each leaf and of all leaves:

  * ``cancelled_fraction``: the share of elements with ``|Eh_o + Vh| < fraction * Vh``,
    i.e. where the delta cancels at least ``1 - fraction`` of the base (with the default
    0.01 the entry is then over 10x ``|Dh_o + Bh| / sqrt(Vh)``);
  * ``floored_fraction``: the share with ``|Eh_o + Vh| < f Vh`` for the run's
    ``denominator_floor`` ``f`` (where the floor sets the denominator; 0 without one);
  * ``max_update``: ``max |Dh_o + Bh| / (sqrt(max(|Eh_o + Vh|, f Vh)) + eps)``, the
    largest entry of ``o``'s direction (the update divided by ``lr_o``, before weight
    decay), with the run's floor if it has one; ``max_unguarded_update``: the same by the
    paper's formula. Elements with ``Vh = 0`` never count as cancelled.

  The next step on ``o`` moves ``E_o`` and ``D_o`` by a ``1 - b2`` (``1 - b1``) share of
  its gradient's terms first, so these describe the conditioning that step starts from
  (the quantities of :func:`dualoptim_plus_diagnostics`' preconditioned update). Call it
  after every step (it is pure and jittable, and dequantizes 8-bit states as the update
  does) to measure how often cancellation happens in a run. It cannot see cancellation
  that the next gradient itself creates: at an objective's first step ``Eh_o + Vh`` is
  ``g^2`` exactly, but float32 forms it as ``(g^2 - Vh) + Vh``, which for ``|g|`` far
  below ``sqrt(Vh)`` can round to nearly zero (``benchmarks/conditioning.py``); the
  largest ``|update| / lr_o`` of the step itself shows that.

  Args:
    opt_state: a DualOptim+ state, alone or inside any optax state (as
      :func:`dualoptim_plus_diagnostics`).
    fraction: the threshold in (0, 1], relative to ``Vh``.
    hyperparams: only for a state without a record: ``b1, b2, base_b1, base_b2, eps``
      and optionally ``denominator_floor``.

  Returns:
    ``(per_leaf, total)``: each field a tree like the params of (K,) arrays, and the
    same over all leaves (fractions of all elements, maxima over all leaves).

  Raises:
    ValueError: as :func:`dualoptim_plus_diagnostics`, or for ``fraction`` outside (0, 1].

  Example:
    >>> import jax.numpy as jnp, dualoptax
    >>> tx = dualoptax.dualoptim_plus(1e-3, denominator_floor=0.01)
    >>> params = {'w': jnp.ones(4)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.array([1., 2, 3, 4])}, state, params)
    >>> per_leaf, total = dualoptax.dualoptim_plus_conditioning(state)
    >>> total.cancelled_fraction.shape
    (2,)
  """
  _check_fraction(fraction)
  opt_state = _moments.unwrap_variables(opt_state)
  s = find_state(opt_state, transform.ScaleByDualOptimPlusState)
  hp = _hyperparameters(opt_state, transform.ScaleByDualOptimPlusState, hyperparams)
  return _on_auto_axes(_plus_conditioning, s, {**hp, _FRACTION: fraction})


def _check_fraction(fraction: Any) -> None:
  """A number in (0, 1], or a traced scalar (its value is unknown here)."""
  if isinstance(fraction, jax.Array) and not _numerics.is_concrete_number(fraction):
    valid = fraction.ndim == 0
  else:
    number = _numerics.is_concrete_number(fraction) and not isinstance(fraction, (str, bool))
    valid = number and 0.0 < float(fraction) <= 1.0
  if not valid:
    raise ValueError(f"fraction must be in (0, 1], got fraction={fraction!r}")


def _conditioning_sums(x: _PlusTerms, hp: dict) -> dict[str, Any]:
  """Per objective: counts of cancelled and floored elements, largest update entries."""
  floor = hp.get("denominator_floor")
  base, magnitude = x.nu_base[None], jnp.abs(x.first)
  axes = tuple(range(1, x.first.ndim))
  count = lambda mask: jnp.sum(mask, axis=axes, dtype=jnp.int32).astype(jnp.float32)
  largest = lambda second: jnp.max(
    magnitude / (jnp.sqrt(second) + hp["eps"]), axis=axes, initial=0.0
  )
  unguarded = largest(x.second)
  sums = dict(
    cancelled=count(x.second < hp[_FRACTION] * base),
    floored=jnp.zeros_like(unguarded),
    max_update=unguarded,
    max_unguarded_update=unguarded,
    size=jnp.float32(x.mu_base.size),
  )
  if floor is not None:
    sums["floored"] = count(x.second < floor * base)
    sums["max_update"] = largest(jnp.maximum(x.second, floor * base))
  return sums


def _conditioning_finish(sums: dict[str, Any]) -> ConditioningDiagnostics:
  size = jnp.maximum(sums["size"], 1.0)
  return ConditioningDiagnostics(
    cancelled_fraction=sums["cancelled"] / size,
    floored_fraction=sums["floored"] / size,
    max_update=sums["max_update"],
    max_unguarded_update=sums["max_unguarded_update"],
  )


def _plus_conditioning(s: transform.ScaleByDualOptimPlusState, hp: dict):
  terms = jax.tree.map(lambda x: _conditioning_sums(x, hp), _plus_terms(s, hp), is_leaf=_is_terms)
  treedef = jax.tree.structure(_param_like(s.base_mu))
  leaf_sums = treedef.flatten_up_to(terms)
  per_leaf = [_conditioning_finish(x) for x in leaf_sums]
  per_leaf = ConditioningDiagnostics(
    *(treedef.unflatten([getattr(d, f) for d in per_leaf]) for f in ConditioningDiagnostics._fields)
  )
  zeros = jnp.zeros(s.objective_counts.shape, jnp.float32)
  total = dict.fromkeys(("cancelled", "floored", "max_update", "max_unguarded_update"), zeros)
  total["size"] = jnp.float32(0.0)
  for sums in leaf_sums:  # Counts and sizes add up; maxima (all >= 0) combine by max.
    total = {
      k: (jnp.maximum if k.startswith("max") else jnp.add)(v, sums[k]) for k, v in total.items()
    }
  return per_leaf, _conditioning_finish(total)


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
