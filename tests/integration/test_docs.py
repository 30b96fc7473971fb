"""The README example and the docstring examples run as written."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import dualoptax

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_readme_python_examples_run():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README.md has no python example"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})


MODULES = sorted(f"dualoptax.{m.name}" for m in pkgutil.iter_modules(dualoptax.__path__))


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
  module = importlib.import_module(module_name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} doctest(s) failed in {module_name}"
