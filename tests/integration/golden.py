"""Reading the authors' golden trajectories (../shared/golden) and replaying them.

The case files are read generically: any ``*.npz`` with a ``meta_json`` whose ``kind`` we
know is replayed, so new cases of the same format are picked up without code changes.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dualoptax

GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "golden"

# Per step, non-sensitive elements must satisfy |p - p_ref| <= PARAM_TOL * (|p_ref| + lr).
PARAM_TOL = 2e-5
MIN_PASS_FRACTION = 0.997
MAX_MEDIAN_SCALED_ERROR = 1e-6
STATE_TOL = 2e-5  # final states: |s - s_ref| <= STATE_TOL * max|s_ref| per tensor


@dataclasses.dataclass(frozen=True)
class GoldenCase:
  """One reference trajectory: initial params, per-step gradients and results."""

  name: str
  kind: str
  meta: dict[str, Any]
  data: Any  # the opened npz

  @property
  def param_names(self) -> list[str]:
    return list(self.meta["param_names"])

  @property
  def steps(self) -> int:
    return int(self.meta["T"])

  def init_params(self) -> dict[str, jax.Array]:
    return {p: jnp.asarray(self.data[f"init/{p}"]) for p in self.param_names}

  def grads(self, t: int) -> dict[str, jax.Array]:
    return {p: jnp.asarray(self.data[f"grads/{p}"][t]) for p in self.param_names}

  def params_after(self, t: int) -> dict[str, np.ndarray]:
    return {p: self.data[f"params/{p}"][t] for p in self.param_names}

  def objectives(self) -> np.ndarray:
    """0-based objective per step (the files use 1 = forget, 2 = retain)."""
    return self.data["mode"].astype(np.int32) - 1


def case_names(kinds: tuple[str, ...]) -> list[str]:
  """Names of the golden cases of the given kinds ([] when the folder is absent)."""
  if not GOLDEN_DIR.is_dir():
    return []
  names = []
  for path in sorted(GOLDEN_DIR.glob("*.npz")):
    with np.load(path, allow_pickle=False) as data:
      if "meta_json" not in data:
        continue
      meta = json.loads(str(data["meta_json"]))
    if meta.get("kind") in kinds:
      names.append(path.stem)
  return names


def case_params(kinds: tuple[str, ...]) -> list[Any]:
  """pytest parameters for the cases of ``kinds``; one skipped entry saying why if none."""
  import pytest  # only the tests use this helper

  names = case_names(kinds)
  if names:
    return names
  return [
    pytest.param(
      None,
      marks=pytest.mark.skip(
        reason=f"no golden cases of kind {kinds} at {GOLDEN_DIR} (the folder lives beside "
        "the project in ../shared/golden and is never copied into the repository)"
      ),
    )
  ]


def load_case(name: str) -> GoldenCase:
  data = np.load(GOLDEN_DIR / f"{name}.npz", allow_pickle=False)
  meta = json.loads(str(data["meta_json"]))
  return GoldenCase(name=name, kind=meta["kind"], meta=meta, data=data)


def optimizer_for(case: GoldenCase, **storage: Any) -> optax.GradientTransformationExtraArgs:
  """The dualoptax optimizer configured with the case's hyperparameters (``storage`` holds
  further ``dualoptax.MomentStorage`` fields, e.g. ``update_in_chunks`` for 8-bit cases)."""
  hp = case.meta["hyperparameters"]
  common = dict(
    eps=hp["eps"],
    weight_decay=hp["weight_decay"],
    forget_lr_ratio=hp["lr_ratio_1"],
    retain_lr_ratio=hp["lr_ratio_2"],
    forget_steps=hp["switch_freq_1"],
    retain_steps=hp["switch_freq_2"],
  )
  betas = hp["betas"]
  if case.meta.get("min_8bit_size"):
    storage.update(
      state_bits=8,
      min_8bit_size=int(case.meta["min_8bit_size"]),
      block_size=int(case.meta["blocksize"]),
    )
  if storage:
    common["storage"] = dualoptax.MomentStorage(**storage)
  if case.kind.startswith("dualoptim_plus"):
    return dualoptax.dualoptim_plus(
      hp["lr"], b1=betas[0], b2=betas[1], base_b1=betas[2], base_b2=betas[3], **common
    )
  if case.kind.startswith("dualoptim"):
    return dualoptax.dualoptim(hp["lr"], b1=betas[0], b2=betas[1], **common)
  raise ValueError(f"golden case {case.name} has unknown kind {case.kind!r}")


@dataclasses.dataclass
class ReplayResult:
  params: list[dict[str, np.ndarray]]  # after each step, [0] = init
  state: Any
  objectives: list[int]  # the objective the schedule chose at each step
  states: list[Any] = dataclasses.field(default_factory=list)  # after each step (if kept)


def replay(
  case: GoldenCase,
  tx: optax.GradientTransformationExtraArgs,
  explicit_objective: bool,
  inner_state: Callable[[Any], Any] = lambda s: s,
  keep_states: bool = False,
) -> ReplayResult:
  """Runs the case's gradients through ``tx``, jitted, one step at a time."""

  @jax.jit
  def step(params, state, grads, objective):
    kwargs = {"objective": objective} if explicit_objective else {}
    updates, state = tx.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state

  params = case.init_params()
  state = tx.init(params)
  history = [jax.tree.map(np.asarray, params)]
  chosen = []
  states = []
  modes = case.objectives()
  for t in range(case.steps):
    chosen.append(
      int(
        dualoptax.scheduled_objective(
          jnp.int32(t),
          (
            case.meta["hyperparameters"]["switch_freq_1"],
            case.meta["hyperparameters"]["switch_freq_2"],
          ),
        )
      )
    )
    params, state = step(params, state, case.grads(t), jnp.int32(modes[t]))
    history.append(jax.tree.map(np.asarray, params))
    if keep_states:
      states.append(jax.tree.map(np.asarray, state))
  return ReplayResult(params=history, state=inner_state(state), objectives=chosen, states=states)


@dataclasses.dataclass
class ParamComparison:
  checked: int  # non-sensitive element-steps compared
  failed: int  # of those, outside the tolerance
  worst_step_pass_fraction: float
  median_scaled_error: float
  max_scaled_error_sensitive: float
  sensitive_sign_mismatches: int


def compare_params(case: GoldenCase, result: ReplayResult) -> ParamComparison:
  """Scaled errors |p - p_ref| / (|p_ref| + max lr) over every step."""
  max_lr = float(np.max(case.data["lr_eff"]))
  checked = failed = sign_mismatch = 0
  worst_fraction = 1.0
  scaled_all = []
  max_sensitive = 0.0
  for t in range(1, case.steps + 1):
    step_checked = step_failed = 0
    golden = case.params_after(t)
    for p in case.param_names:
      ref = golden[p].astype(np.float64)
      ours = result.params[t][p].astype(np.float64)
      scaled = np.abs(ours - ref) / (np.abs(ref) + max_lr)
      sensitive = case.data[f"sensitive/{p}"]
      ok = scaled[~sensitive]
      scaled_all.append(ok.ravel())
      step_checked += ok.size
      step_failed += int(np.sum(ok > PARAM_TOL))
      if sensitive.any():
        max_sensitive = max(max_sensitive, float(np.max(scaled[sensitive])))
        if t == case.steps:
          init = case.data[f"init/{p}"].astype(np.float64)
          moved_ref = np.sign(ref - init)[sensitive]
          moved_ours = np.sign(ours - init)[sensitive]
          sign_mismatch += int(np.sum(moved_ref != moved_ours))
          if not np.all(np.isfinite(ours[sensitive])):
            sign_mismatch += int(np.sum(~np.isfinite(ours[sensitive])))
    checked += step_checked
    failed += step_failed
    worst_fraction = min(worst_fraction, 1.0 - step_failed / step_checked)
  return ParamComparison(
    checked=checked,
    failed=failed,
    worst_step_pass_fraction=worst_fraction,
    median_scaled_error=float(np.median(np.concatenate(scaled_all))),
    max_scaled_error_sensitive=max_sensitive,
    sensitive_sign_mismatches=sign_mismatch,
  )


def golden_states(case: GoldenCase, p: str) -> dict[str, np.ndarray]:
  """The reference's final states of parameter ``p``, keyed by the file's names."""
  prefix = f"final/{p}/"
  return {k[len(prefix) :]: case.data[k] for k in case.data.files if k.startswith(prefix)}
