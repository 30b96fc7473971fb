"""Fidelity: replay the authors' PyTorch trajectories through dualoptax and match them."""

import golden
import numpy as np
import pytest

import dualoptax

FP32_KINDS = ("dualoptim_plus_fp32", "dualoptim_fp32")
CASES = golden.case_names(FP32_KINDS)


def _skip_if_absent():
  if not golden.GOLDEN_DIR.is_dir():
    pytest.skip(f"golden reference data not found at {golden.GOLDEN_DIR}")


def test_golden_cases_are_found():
  _skip_if_absent()
  assert len(CASES) >= 2, f"expected fp32 golden cases in {golden.GOLDEN_DIR}, found {CASES}"


def _our_states(case, state, p):
  """Our final state of parameter ``p`` under the reference's names."""
  forget, retain = dualoptax.FORGET, dualoptax.RETAIN
  if case.kind.startswith("dualoptim_plus"):
    s = dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState)
    moments = {
      "state1_1": s.delta_mu[p][forget],
      "state1_2": s.delta_mu[p][retain],
      "state2_1": s.delta_nu[p][forget],
      "state2_2": s.delta_nu[p][retain],
      "state1_base": s.base_mu[p],
      "state2_base": s.base_nu[p],
    }
  else:
    s = dualoptax.find_state(state, dualoptax.ScaleByDualOptimState)
    moments = {
      "state1_1": s.mu[p][forget],
      "state1_2": s.mu[p][retain],
      "state2_1": s.nu[p][forget],
      "state2_2": s.nu[p][retain],
    }
  counters = {
    "step": s.count,
    "step1": s.objective_counts[forget],
    "step2": s.objective_counts[retain],
  }
  return moments, counters


@pytest.mark.parametrize("explicit_objective", [False, True], ids=["schedule", "explicit"])
@pytest.mark.parametrize("name", golden.case_params(FP32_KINDS))
def test_replay_matches_reference(name, explicit_objective):
  case = golden.load_case(name)
  result = golden.replay(case, golden.optimizer_for(case), explicit_objective)

  # The alternating schedule chooses the reference's objective at every step.
  np.testing.assert_array_equal(result.objectives, case.objectives())

  cmp = golden.compare_params(case, result)
  report = (
    f"{name}: {cmp.failed}/{cmp.checked} non-sensitive element-steps outside "
    f"{golden.PARAM_TOL}*(|p|+lr); worst step passes {cmp.worst_step_pass_fraction:.4%}; "
    f"median scaled error {cmp.median_scaled_error:.2e}"
  )
  print(report)
  assert cmp.worst_step_pass_fraction >= golden.MIN_PASS_FRACTION, report
  assert cmp.median_scaled_error <= golden.MAX_MEDIAN_SCALED_ERROR, report
  assert cmp.sensitive_sign_mismatches == 0, (
    f"{name}: {cmp.sensitive_sign_mismatches} ill-conditioned elements moved the other way "
    "or became non-finite"
  )

  for p in case.param_names:
    reference = golden.golden_states(case, p)
    moments, counters = _our_states(case, result.state, p)
    for key, ours in counters.items():
      assert int(ours) == int(reference[key]), f"{name}/{p}/{key}: {int(ours)} != {reference[key]}"
    for key, ours in moments.items():
      ref = reference[key].astype(np.float64)
      err = np.max(np.abs(np.asarray(ours, np.float64) - ref))
      bound = golden.STATE_TOL * np.max(np.abs(ref))
      assert err <= bound, f"{name}/{p}/{key}: max error {err:.3e} > {bound:.3e}"
