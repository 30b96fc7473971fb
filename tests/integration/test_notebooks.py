"""Executes every notebook in notebooks/ (each must run on CPU in well under a minute).

The notebooks are stored without outputs; each is run in a fresh kernel whose working
directory is notebooks/ (they put the project root on sys.path themselves). A failing cell
fails the test with that cell's source and error.
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
REAL_TOFU = NOTEBOOKS_DIR.parent.parent / "shared" / "data" / "tofu"
TIMEOUT_SECONDS = 300  # per cell and per notebook start-up; the notebooks take < 60 s


def test_notebooks_exist():
  assert NOTEBOOKS, f"no notebooks found in {NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs, f"{path.name}: cell {i} has stored outputs"
      assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"


def _execute(nb, name, monkeypatch):
  # Plots render to files in the kernel, never to a window.
  monkeypatch.setenv("MPLBACKEND", "Agg")
  client = nbclient.NotebookClient(
    nb,
    timeout=TIMEOUT_SECONDS,
    startup_timeout=TIMEOUT_SECONDS,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
  )
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{name} failed:\n{e}", pytrace=False)
  except nbclient.exceptions.CellTimeoutError as e:
    pytest.fail(f"{name} timed out after {TIMEOUT_SECONDS} s:\n{e}", pytrace=False)
  return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
  _execute(nbformat.read(path, as_version=4), path.name, monkeypatch)


# The real-TOFU run checks the data path (real files, forget01's task, longer sequences),
# which needs neither the FAST schedule nor gradient diagnostics (04 reads only the
# evaluations; their compilation was a quarter of the run): the default run above already
# executes 04 as stored.
REAL_TOFU_CHANGES = (
  (1, "USE_REAL_TOFU = False", "USE_REAL_TOFU = True"),
  (1, "FINETUNE_STEPS = 120 if FAST", "FINETUNE_STEPS = 30 if FAST"),
  (1, "UNLEARN_STEPS = 24 if FAST", "UNLEARN_STEPS = 6 if FAST"),  # one 1:5 alternation
  (1, "EVAL_ITEMS = 12 if FAST", "EVAL_ITEMS = 4 if FAST"),
  (3, "diagnostics_every=UNLEARN_STEPS,", "diagnostics_every=UNLEARN_STEPS + 1,"),
)


def test_tradeoff_notebook_runs_on_real_tofu(monkeypatch):
  """04's real-TOFU path (forget01, a tiny model fine-tuned on it), where the files exist."""
  if not (REAL_TOFU / "forget01.json").exists():
    pytest.skip(f"real TOFU files not found at {REAL_TOFU} (the shared folder is absent)")
  path = NOTEBOOKS_DIR / "04_tradeoff.ipynb"
  nb = nbformat.read(path, as_version=4)
  for cell, old, new in REAL_TOFU_CHANGES:
    assert old in nb.cells[cell].source, f"{path.name} cell {cell} no longer has {old!r}"
    nb.cells[cell].source = nb.cells[cell].source.replace(old, new)
  nb = _execute(nb, f"{path.name} (USE_REAL_TOFU)", monkeypatch)
  printed = "".join(
    out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
  )
  assert "40 forget /" in printed, "forget01 has 40 questions"  # the real split was used
