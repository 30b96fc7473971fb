"""Fidelity of DualOptim+ 8-bit: replay the authors' 8-bit trajectories code for code."""

import golden
import numpy as np
import pytest

import dualoptax

CASES = golden.case_names(("dualoptim_plus_8bit",))
MIN_EQUAL_CODES = 0.999


def test_golden_8bit_cases_are_found():
  if not golden.GOLDEN_DIR.is_dir():
    pytest.skip(f"golden reference data not found at {golden.GOLDEN_DIR}")
  assert CASES, f"expected dualoptim_plus_8bit cases in {golden.GOLDEN_DIR}"


def _moments(state, p):
  """Our quantized moments of ``p`` under the reference's names: (codes, absmax)."""
  s = dualoptax.find_state(state, dualoptax.ScaleByDualOptimPlusState)
  f, r = dualoptax.FORGET, dualoptax.RETAIN
  return {
    "1_base": (s.base_mu[p].codes, s.base_mu[p].absmax),
    "2_base": (s.base_nu[p].codes, s.base_nu[p].absmax),
    "1_1": (s.delta_mu[p].codes[f], s.delta_mu[p].absmax[f]),
    "1_2": (s.delta_mu[p].codes[r], s.delta_mu[p].absmax[r]),
    "2_1": (s.delta_nu[p].codes[f], s.delta_nu[p].absmax[f]),
    "2_2": (s.delta_nu[p].codes[r], s.delta_nu[p].absmax[r]),
  }


@pytest.mark.parametrize("update_in_chunks", [True, False], ids=["chunk_loop", "whole_array"])
@pytest.mark.parametrize("name", golden.case_params(("dualoptim_plus_8bit",)))
def test_8bit_replay_matches_reference(name, update_in_chunks):
  case = golden.load_case(name)
  tx = golden.optimizer_for(case, update_in_chunks=update_in_chunks)
  result = golden.replay(case, tx, explicit_objective=False, keep_states=True)
  np.testing.assert_array_equal(result.objectives, case.objectives())

  # Parameters: the fp32 tolerance on elements the case does not flag.
  cmp = golden.compare_params(case, result)
  report = (
    f"{name}: params {cmp.failed}/{cmp.checked} element-steps outside tolerance, "
    f"worst step {cmp.worst_step_pass_fraction:.4%}, median {cmp.median_scaled_error:.1e}"
  )
  print(report)
  assert cmp.worst_step_pass_fraction >= golden.MIN_PASS_FRACTION, report
  assert cmp.median_scaled_error <= golden.MAX_MEDIAN_SCALED_ERROR, report

  # Codes after every step: >= 99.9 % equal, the rest off by one.
  for p in case.meta["quantized_params"]:
    total = equal = 0
    for t, state in enumerate(result.states, start=1):
      for key, (codes, absmax) in _moments(state, p).items():
        ref = case.data[f"traj/{p}/state{key}"][t]
        diff = np.abs(np.asarray(codes, np.int32) - ref.astype(np.int32))
        assert diff.max() <= 1, f"{name}/{p}/state{key} step {t}: codes differ by {diff.max()}"
        total += diff.size
        equal += int(np.sum(diff == 0))
        ref_absmax = case.data[f"traj/{p}/absmax{key}"][t]
        np.testing.assert_allclose(
          absmax, ref_absmax, rtol=1e-5, atol=0, err_msg=f"{name}/{p}/absmax{key} step {t}"
        )
    print(f"{name}/{p}: {equal}/{total} codes equal ({total - equal} off by one)")
    assert equal / total >= MIN_EQUAL_CODES
