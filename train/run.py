"""``python train/run.py ...``: the unlearning program from a checkout, installed or not.

The command line itself is :mod:`train.cli` (installed as the ``dualoptax-unlearn``
console script); this file only makes the checkout importable when run as a script.
"""

import pathlib
import sys

if __name__ == "__main__":
  # Python puts the script's folder (train/) on sys.path, not the project root above it.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from train.cli import main

  sys.exit(main())
