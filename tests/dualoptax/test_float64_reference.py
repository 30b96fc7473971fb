"""DualOptim+ and DualOptim against float64 numpy implementations written here from the
specification (design/ALGORITHM.md)."""

from __future__ import annotations

import numpy as np
import pytest
from composition_helpers import DUAL_STATE, PARAMS0, PLUS_STATE, Run, _grads, _np, _objectives, run

import dualoptax

# ---------------------------------------------------------------------------------------
# Float64 numpy references, written from design/ALGORITHM.md.


def reference_dualoptim_plus(params0, grads, objectives, lr, ratios, b1, b2, bb1, bb2, eps, wd):
  """DualOptim+ for K objectives in float64. Returns (params trajectory, final state)."""
  k_obj = len(ratios)
  p = {k: np.asarray(v, np.float64) for k, v in params0.items()}
  zeros = lambda: {k: np.zeros_like(v) for k, v in p.items()}  # noqa: E731
  base_m, base_v = zeros(), zeros()
  delta_m = [zeros() for _ in range(k_obj)]
  delta_v = [zeros() for _ in range(k_obj)]
  t, t_obj = 0, [0] * k_obj
  trajectory = [dict(p)]
  for g, o in zip(grads, objectives):
    t += 1
    t_obj[o] += 1
    eta = lr * ratios[o]
    new_p = {}
    for k in p:
      gk = np.asarray(g[k], np.float64)
      bh = base_m[k] / (1 - bb1 ** (t - 1)) if t > 1 else base_m[k]
      vh = base_v[k] / (1 - bb2 ** (t - 1)) if t > 1 else base_v[k]
      delta_m[o][k] = b1 * delta_m[o][k] + (1 - b1) * (gk - bh)
      delta_v[o][k] = b2 * delta_v[o][k] + (1 - b2) * (gk * gk - vh)
      dh = delta_m[o][k] / (1 - b1 ** t_obj[o])
      eh = delta_v[o][k] / (1 - b2 ** t_obj[o])
      u = (dh + bh) / (np.sqrt(np.abs(eh + vh)) + eps)
      new_p[k] = p[k] * (1 - eta * wd) - eta * u
      base_m[k] = bb1 * base_m[k] + (1 - bb1) * gk
      base_v[k] = bb2 * base_v[k] + (1 - bb2) * gk * gk
    p = new_p
    trajectory.append(dict(p))
  state = dict(
    count=t,
    objective_counts=t_obj,
    base_mu=base_m,
    base_nu=base_v,
    delta_mu={k: np.stack([d[k] for d in delta_m]) for k in p},
    delta_nu={k: np.stack([d[k] for d in delta_v]) for k in p},
  )
  return trajectory, state


def reference_dualoptim(params0, grads, objectives, lr, ratios, b1, b2, eps, wd):
  """DualOptim (an AdamW state per objective) in float64."""
  k_obj = len(ratios)
  p = {k: np.asarray(v, np.float64) for k, v in params0.items()}
  m = [{k: np.zeros_like(v) for k, v in p.items()} for _ in range(k_obj)]
  v2 = [{k: np.zeros_like(v) for k, v in p.items()} for _ in range(k_obj)]
  t_obj = [0] * k_obj
  trajectory = [dict(p)]
  for g, o in zip(grads, objectives):
    t_obj[o] += 1
    eta = lr * ratios[o]
    new_p = {}
    for k in p:
      gk = np.asarray(g[k], np.float64)
      m[o][k] = b1 * m[o][k] + (1 - b1) * gk
      v2[o][k] = b2 * v2[o][k] + (1 - b2) * gk * gk
      u = (m[o][k] / (1 - b1 ** t_obj[o])) / (np.sqrt(v2[o][k] / (1 - b2 ** t_obj[o])) + eps)
      new_p[k] = p[k] * (1 - eta * wd) - eta * u
    p = new_p
    trajectory.append(dict(p))
  return trajectory, dict(
    mu={k: np.stack([x[k] for x in m]) for k in p},
    nu={k: np.stack([x[k] for x in v2]) for k in p},
    objective_counts=t_obj,
  )


def _assert_trajectory_close(got: Run, ref_traj, rtol):
  """Compares each step's update with the reference's, then each step's displacement from
  the initial params. Params are float32 of size O(1), so the displacement is also allowed
  a few of their ulps of accumulated rounding."""
  for i in range(len(got.updates)):
    for k in ref_traj[0]:
      ref_update = ref_traj[i + 1][k] - ref_traj[i][k]
      np.testing.assert_allclose(
        np.asarray(got.updates[i][k], np.float64),
        ref_update,
        rtol=rtol,
        atol=rtol * 1e-2 * np.max(np.abs(ref_update)),
        err_msg=f"update {i} leaf {k}",
      )
      d_got = np.asarray(got.params[i + 1][k], np.float64) - np.asarray(got.params[0][k])
      d_ref = ref_traj[i + 1][k] - ref_traj[0][k]
      ulps = 8 * np.finfo(np.float32).eps * np.max(np.abs(ref_traj[0][k]))
      np.testing.assert_allclose(
        d_got, d_ref, rtol=rtol, atol=ulps, err_msg=f"step {i + 1} leaf {k}"
      )


def _assert_state_close(got, ref, rtol):
  for k, ref_leaf in ref.items():
    scale = float(np.max(np.abs(ref_leaf)))
    np.testing.assert_allclose(
      np.asarray(got[k], np.float64), ref_leaf, rtol=rtol, atol=rtol * scale, err_msg=k
    )


@pytest.mark.parametrize(
  "objective_steps,ratios", [((2, 3), (0.5, 1.0)), ((1, 2, 1), (1.0, 0.5, 2.0))]
)
def test_dualoptim_plus_matches_float64_reference(objective_steps, ratios):
  n, lr, wd = 30, 1e-2, 0.1
  hp = dict(b1=0.9, b2=0.95, base_b1=0.8, base_b2=0.9, eps=1e-8)
  objs = _objectives(objective_steps, n)
  grads = _grads(n, seed=3, objectives=objs)
  tx = dualoptax.multi_objective_dualoptim_plus(lr, objective_steps, ratios, weight_decay=wd, **hp)
  got = run(tx, grads)
  ref_traj, ref_state = reference_dualoptim_plus(
    _np(PARAMS0),
    grads,
    objs,
    lr,
    ratios,
    hp["b1"],
    hp["b2"],
    hp["base_b1"],
    hp["base_b2"],
    hp["eps"],
    wd,
  )
  _assert_trajectory_close(got, ref_traj, rtol=1e-4)
  s = dualoptax.find_state(got.states[-1], PLUS_STATE)
  assert int(s.count) == ref_state["count"] == n
  np.testing.assert_array_equal(s.objective_counts, ref_state["objective_counts"])
  for name in ("base_mu", "base_nu", "delta_mu", "delta_nu"):
    _assert_state_close(getattr(s, name), ref_state[name], rtol=1e-4)


def test_dualoptim_matches_float64_reference():
  n, lr, wd, ratios, steps = 30, 1e-2, 0.1, (0.5, 1.0), (2, 3)
  objs = _objectives(steps, n)
  grads = _grads(n, seed=4, objectives=objs)
  tx = dualoptax.dualoptim(
    lr,
    b1=0.9,
    b2=0.99,
    eps=1e-8,
    weight_decay=wd,
    forget_lr_ratio=0.5,
    forget_steps=2,
    retain_steps=3,
  )
  got = run(tx, grads)
  ref_traj, ref_state = reference_dualoptim(
    _np(PARAMS0), grads, objs, lr, ratios, 0.9, 0.99, 1e-8, wd
  )
  _assert_trajectory_close(got, ref_traj, rtol=1e-4)
  s = dualoptax.find_state(got.states[-1], DUAL_STATE)
  np.testing.assert_array_equal(s.objective_counts, ref_state["objective_counts"])
  _assert_state_close(s.mu, ref_state["mu"], rtol=1e-4)
  _assert_state_close(s.nu, ref_state["nu"], rtol=1e-4)


def test_first_step_is_sign_of_gradient_times_objective_lr():
  """At t = 1 the spec gives u = g / (|g| + eps): a step of lr * ratio, sign of g."""
  g = _grads(1, seed=5, scale=1e-6)[0]  # small enough for eps = 1e-8 to show
  tx = dualoptax.multi_objective_dualoptim_plus(0.1, (1, 1), (0.25, 1.0), eps=1e-8)
  updates = run(tx, [g]).updates[0]
  for k in g:
    g64 = np.asarray(g[k], np.float64)
    np.testing.assert_allclose(updates[k], -0.025 * g64 / (np.abs(g64) + 1e-8), rtol=1e-6)
    assert np.all(np.abs(updates[k]) < 0.025 * (1 - 4e-3))
