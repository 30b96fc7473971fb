"""The multi-task scenario end to end on a tiny model: three embedded tasks trained from one
initial model with Adam on the summed loss, DualOptim and DualOptim+ (K = 3 objectives),
each evaluated; the schedule, the optimizer states, the gradient-cosine matrices and the
per-task learning-rate ratios."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dualoptax
from train.config import load_config
from train.scenarios import multitask

SHORT = [
  "training.steps=4",
  "training.diagnostics_every=2",
  "multitask.steps=[1, 2, 1]",
  "model.hidden_size=32",
  "model.num_layers=1",
  "model.num_heads=2",
  "data.batch_size=4",
  "optimizer.warmup_steps=0",
  "eval.max_items=3",
  "eval.max_new_tokens=4",
  "eval.batch_size=4",
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  out = tmp_path_factory.mktemp("multitask")
  config = load_config("configs/multitask_tiny.yaml", [f"output_dir={out}", *SHORT])
  return out, config, multitask.run(config)


def test_every_optimizer_trains_and_is_evaluated_per_task(experiment):
  out, config, result = experiment
  rows, tasks = result["rows"], list(config.multitask.tasks)
  assert list(rows) == ["initial", *multitask.OPTIMIZERS]
  for label, summary in rows.items():
    assert list(summary["tasks"]) == tasks
    for key in multitask.HEADLINE:
      values = [summary["tasks"][t][key] for t in tasks]
      assert all(np.isfinite(values)), (label, key)
      assert summary["average"][key] == pytest.approx(np.mean(values))
    assert all(summary["tasks"][t]["size"] == 3 for t in tasks)
    assert 0.0 <= summary["average"]["exact_match"] <= 1.0
  for name in multitask.OPTIMIZERS:  # four steps at 1e-3 lower the held-out NLL
    assert rows[name]["average"]["nll"] < rows["initial"]["average"]["nll"], name
    stored = json.loads((out / name / multitask.SUMMARY_FILE).read_text())
    assert {"question", "answer", "generation", "exact_match"} <= set(stored["items"]["facts"][0])
  report = (out / multitask.REPORT_FILE).read_text()
  assert report.count("\n| ") == 1 + 4 + 1 + 3  # two tables: a header and a row per model
  for name in ("results.json", "multitask_results.png", "multitask_cosines.png"):
    assert (out / name).stat().st_size > 0, name
  assert (out / "data" / "strings_eval.json").exists()


def test_the_schedule_alternates_tasks_and_adam_sums_them(experiment):
  out, config, result = experiment
  tasks = config.multitask.tasks
  plus = result["results"]["dualoptim_plus"]
  assert [r["task_id"] for r in plus.history] == [0, 1, 1, 2]
  assert [r["task"] for r in plus.history] == ["facts", "arithmetic", "arithmetic", "strings"]
  state = dualoptax.find_state(plus.opt_state, dualoptax.ScaleByDualOptimPlusState)
  assert state.objective_counts.tolist() == [1, 2, 1]
  adam = result["results"]["adam"].history
  assert {r["task_id"] for r in adam} == {-1}
  assert {"nll/facts", "nll/arithmetic", "nll/strings"} <= set(adam[0])
  assert adam[0]["loss"] == pytest.approx(sum(adam[0][f"nll/{t}"] for t in tasks))  # coeffs 1
  logged = [
    json.loads(line) for line in (out / "dualoptim" / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["task_id"] for r in logged if "task_id" in r] == [0, 1, 1, 2]


def test_k_objective_states_hold_k_deltas_and_adam_one_state(experiment):
  _, _, result = experiment
  params = result["results"]["adam"].params
  shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
  adam = dualoptax.find_state(result["results"]["adam"].opt_state, optax.ScaleByAdamState)
  assert [leaf.shape for leaf in jax.tree.leaves(adam.mu)] == shapes
  plus = dualoptax.find_state(
    result["results"]["dualoptim_plus"].opt_state, dualoptax.ScaleByDualOptimPlusState
  )
  assert [leaf.shape for leaf in jax.tree.leaves(plus.base_mu)] == shapes
  assert [leaf.shape for leaf in jax.tree.leaves(plus.delta_mu)] == [(3, *s) for s in shapes]
  dual = dualoptax.find_state(
    result["results"]["dualoptim"].opt_state, dualoptax.ScaleByDualOptimState
  )
  assert [leaf.shape for leaf in jax.tree.leaves(dual.mu)] == [(3, *s) for s in shapes]


def test_cosine_matrices_are_k_by_k_symmetric_with_unit_diagonal(experiment):
  _, _, result = experiment
  for name, records in result["cosines"].items():
    assert [r["step"] for r in records] == [0, 2, 4], name
    for record in records:
      matrix = np.asarray(record["matrix"])
      assert matrix.shape == (3, 3)
      np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
      np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-4)
      assert np.all(np.abs(matrix) <= 1.0 + 1e-5)
  # At the shared initial parameters every optimizer measures the same matrix.
  first = [np.asarray(r[0]["matrix"]) for r in result["cosines"].values()]
  np.testing.assert_allclose(first[0], first[1], atol=1e-5)


@pytest.mark.parametrize("name", ["dualoptim", "dualoptim_plus"])
def test_lr_ratios_scale_the_update_of_their_task(name):
  base = load_config("configs/multitask_tiny.yaml", [f"optimizer.name={name}", *SHORT])
  config = dataclasses.replace(base, optimizer=dataclasses.replace(base.optimizer, clip_norm=None))
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
  grads = {"w": jnp.arange(6.0).reshape(2, 3) - 2.5}

  def update(ratios, objective):
    mt = dataclasses.replace(config.multitask, lr_ratios=ratios)
    tx = multitask.make_multitask_optimizer(dataclasses.replace(config, multitask=mt))
    updates, _ = tx.update(grads, tx.init(params), params, objective=jnp.int32(objective))
    return np.asarray(updates["w"])

  plain = update((1.0, 1.0, 1.0), 1)
  assert np.abs(plain).max() > 0
  np.testing.assert_allclose(update((1.0, 3.0, 1.0), 1), 3.0 * plain, rtol=1e-6)
  np.testing.assert_allclose(update((1.0, 3.0, 1.0), 0), plain, rtol=1e-6)
