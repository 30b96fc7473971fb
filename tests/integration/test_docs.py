"""The README example and the docstring examples run as written."""

import doctest
import importlib
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import dualoptax

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_readme_python_examples_run():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README.md has no python example"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})


def test_readme_mesh_example_runs_on_two_devices():
  """The README's mesh example (guarded by the device count, so a no-op in this process)
  runs on 2 simulated CPU devices and keeps the codes sharded."""
  text = (ROOT / "README.md").read_text()
  blocks = [
    b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "device_count() >= 2" in b
  ]
  assert len(blocks) == 1, "README.md should have one mesh example guarded by the device count"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", blocks[0]], env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "P(None, None, 'model')" in result.stdout, result.stdout


MODULES = sorted(f"dualoptax.{m.name}" for m in pkgutil.iter_modules(dualoptax.__path__))


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
  module = importlib.import_module(module_name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} doctest(s) failed in {module_name}"
