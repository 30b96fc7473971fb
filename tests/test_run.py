"""`python train/run.py` runs its experiment end to end (shortened)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_default_experiment_runs_and_reports_every_optimizer():
  out = subprocess.run(
      [sys.executable, str(ROOT / "train" / "run.py"), "--steps", "60"],
      capture_output=True, text=True, timeout=600, check=True).stdout
  assert "target model: forget acc 1.000" in out, out
  rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
  names = [row.split("|")[1].strip() for row in rows[1:]]
  assert names == ["adam (joint)", "dualoptim", "dualoptim_plus"], out
  for row in rows[1:]:
    forget_acc, retain_acc = (float(x) for x in row.split("|")[2:4])
    assert 0.0 <= forget_acc <= 1.0 and 0.0 <= retain_acc <= 1.0
