"""The same unlearning run on 8 simulated devices ends where the single-device run ends, on
the meshes (data, fsdp) = (8, 1), (2, 4) and (1, 8), with fp32 and with 8-bit DualOptim+
states (tolerances in tests/integration/cli_runs.py). With 8-bit states a moment on a code's
bin edge can also round the other way, which moves that element by a few percent of one step
(measured: <= 0.25 % of a tensor's elements, at most 3.4e-6 with a learning rate of 1e-4),
so 8-bit asks >= 99.5 % of the elements to agree.

The cost is start-up and compilation, not the 5 steps, so the runs are trimmed where the
property does not depend on them: one decoder block (FSDP shards every block alike; the
embedding, a block and the LM head still hand sharded activations to each other), and the
runs share two interpreters, one per device count (``train.cli.main`` once per run), instead
of one each: eight jax start-ups and model builds become two, and runs on one mesh share the
compiled checkpoint slicing of the parameters. Each sharded run's checkpoint must record its
own mesh, so a run that silently reused another's mesh (or none) fails.
"""

import json

from cli_runs import ROOT, assert_same_model, run_cli, unlearn_args
from safetensors.numpy import load_file

MESHES = {"data8": (8, 1), "data2-fsdp4": (2, 4), "fsdp8": (1, 8)}
STATE_BITS = {"fp32": 32, "8bit": 8}
MIN_CLOSE = {32: 0.999, 8: 0.995}
ONE_BLOCK = ["model.num_layers=1"]

# `python -c RUN_EACH root '[[cli args], ...]'`: the CLI once per argument list, in order;
# the first failure's exit code (its cause is on stderr) ends the process.
RUN_EACH = """
import json, sys
sys.path.insert(0, sys.argv[1])
from train.cli import main
for argv in json.loads(sys.argv[2]):
  code = main(argv)
  if code:
    sys.exit(code)
"""


def _run_each(runs, devices):
  """Runs the CLI once per ``(output folder, state bits, extra args)`` in one process."""
  argvs = [unlearn_args(out, bits)[1:] + ONE_BLOCK + extra for out, bits, extra in runs]
  run_cli(["-c", RUN_EACH, str(ROOT), json.dumps(argvs)], devices=devices)


def _saved_mesh_shapes(run_dir):
  """The mesh shapes of the arrays in the run's last checkpoint (orbax's ``_sharding``)."""
  (sharding_file,) = sorted(run_dir.glob("checkpoints/*/state/_sharding"))[-1:]
  return {tuple(json.loads(s)["shape"]) for s in json.loads(sharding_file.read_text()).values()}


def _model(run_dir):
  return load_file(str(run_dir / "model" / "model.safetensors"))


def test_sharded_runs_match_single_device(tmp_path):
  _run_each([(tmp_path / name, bits, []) for name, bits in STATE_BITS.items()], devices=1)
  sharded = {
    (name, label): (tmp_path / f"{name}-{label}", bits, [f"mesh.data={d}", f"mesh.fsdp={f}"])
    for label, (d, f) in MESHES.items()
    for name, bits in STATE_BITS.items()
  }
  _run_each(list(sharded.values()), devices=8)
  failures = []
  for (name, label), (out, bits, _) in sharded.items():
    try:
      assert _saved_mesh_shapes(out) == {MESHES[label]}, f"{name} {label}: not on its mesh"
      assert_same_model(_model(tmp_path / name), _model(out), f"{name} {label}", MIN_CLOSE[bits])
    except AssertionError as e:  # every case's verdict, not only the first failure's
      failures.append(str(e))
  assert not failures, "\n".join(failures)
