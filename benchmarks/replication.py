"""The DualOptim+ replication sweep on SmolLM2-135M-Instruct and real TOFU, with its table
and wall time.

Run from the project root (fetches the model on first use; resumes an interrupted sweep)::

    python benchmarks/replication.py                                   # the full sweep
    python benchmarks/replication.py --config configs/replication_tiny.yaml
    python benchmarks/replication.py data_path=/data/tofu 'seeds=[0]'  # overrides

It is ``python train/run.py sweep configs/replication_smollm2.yaml`` (see ``train/sweep.py``
and the sweep file's comments for every choice), then prints the report's tables. Stages
already complete are loaded, not recomputed, so the printed wall time is this
invocation's; the report also gives the compute summed over every stage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import sweep  # noqa: E402


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/replication_smollm2.yaml")
  parser.add_argument("overrides", nargs="*", help="sweep-file key.path=value overrides")
  args = parser.parse_args(argv)
  spec = sweep.load_sweep(args.config, args.overrides)
  began = time.perf_counter()
  sweep.run_sweep(spec)
  report = Path(spec.report_dir) / "report.md"
  tables = [line for line in report.read_text().splitlines() if line.startswith(("|", "#"))]
  print("\n".join(tables))
  print(f"\nwall time {time.perf_counter() - began:.0f} s; report {report}")


if __name__ == "__main__":
  main()
