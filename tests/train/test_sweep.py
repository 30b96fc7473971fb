"""The sweep engine (train/sweep.py) and its report (train/report.py): cache keys, resuming,
seed aggregation and plots; no model is trained here (the stages are replaced by fakes)."""

import json
import math
import os
import pathlib

import pytest

from train import report, sweep
from train.config import ConfigError

SWEEP_YAML = """
name: unit
output_root: {root}/out
report_dir: {root}/report
finetune: {{retain_authors: null, epochs: 1}}
base:
  data: {{forget_split: forget10, template: phi, max_length: 32, batch_size: 2}}
  training: {{steps: 2}}
losses:
  - name: NPO+GD
  - name: IDK+AP
    overrides: {{optimizer.learning_rate: 3.0e-4}}
variants:
  - label: adam (joint)
    overrides: {{optimizer.name: adam, training.mode: joint}}
  - label: dualoptim_plus
    overrides: {{optimizer.name: dualoptim_plus}}
seeds: [0, 1]
"""


@pytest.fixture
def sweep_file(tmp_path):
  path = tmp_path / "sweep.yaml"
  path.write_text(SWEEP_YAML.format(root=tmp_path))
  return path


def _keys(planned):
  return [run.key for run in planned["runs"]]


def test_plan_lists_every_loss_variant_and_seed(sweep_file):
  planned = sweep.plan(sweep.load_sweep(sweep_file))
  runs = planned["runs"]
  assert len(runs) == 2 * 2 * 2
  assert len(set(_keys(planned))) == 8
  assert [(r.seed, r.loss) for r in runs[:4]] == [(0, "NPO+GD")] * 2 + [(0, "IDK+AP")] * 2
  run = next(r for r in runs if r.loss == "IDK+AP" and r.variant == "adam (joint)" and r.seed == 1)
  assert run.config.optimizer.name == "adam" and run.config.training.mode == "joint"
  assert run.config.optimizer.learning_rate == 3e-4
  assert run.config.training.seed == 1 and run.config.data.seed == 1
  assert run.config.output_dir == str(run.folder)


def test_keys_are_stable_and_follow_every_setting(sweep_file):
  first = sweep.plan(sweep.load_sweep(sweep_file))
  again = sweep.plan(sweep.load_sweep(sweep_file))
  assert _keys(first) == _keys(again)
  assert first["finetune"] == again["finetune"]
  # An unlearning setting: new run keys, same fine-tuned models.
  changed = sweep.plan(sweep.load_sweep(sweep_file, ["base.training.steps=3"]))
  assert not set(_keys(changed)) & set(_keys(first))
  assert changed["finetune"] == first["finetune"]
  # A fine-tuning setting: new models, hence new references and runs.
  refit = sweep.plan(sweep.load_sweep(sweep_file, ["finetune.epochs=2"]))
  assert refit["finetune"]["target"][0] != first["finetune"]["target"][0]
  assert refit["reference"][0] != first["reference"][0]
  assert not set(_keys(refit)) & set(_keys(first))
  # An evaluation setting: same models, new reference and runs.
  capped = sweep.plan(sweep.load_sweep(sweep_file, ["base.eval.max_items=5"]))
  assert capped["finetune"] == first["finetune"]
  assert capped["reference"][0] != first["reference"][0]
  # A label is not part of a run's identity.
  relabelled = sweep.plan(sweep.load_sweep(sweep_file, ["name=other"]))
  assert _keys(relabelled) == _keys(first)


def test_a_variant_runs_with_the_losses_it_names_only(sweep_file):
  only = "[{label: lmf, losses: [IDK+AP], overrides: {optimizer.name: adam}}]"
  spec = sweep.load_sweep(sweep_file, [f"variants={only}"])
  runs = sweep.plan(spec)["runs"]
  assert [(r.loss, r.variant, r.seed) for r in runs] == [("IDK+AP", "lmf", 0), ("IDK+AP", "lmf", 1)]
  with pytest.raises(ConfigError, match=r"variant 'x': losses \['GA'\] are not among"):
    sweep.load_sweep(sweep_file, ["variants=[{label: x, losses: [GA]}]"])


def test_a_sweep_file_extends_another(sweep_file, tmp_path):
  child = tmp_path / "child.yaml"
  child.write_text("extends: sweep.yaml\nname: child\nseeds: [7]\nbase: {training: {steps: 5}}\n")
  spec, parent = sweep.load_sweep(child), sweep.load_sweep(sweep_file)
  assert (spec.name, spec.seeds) == ("child", (7,))
  assert spec.base["training"] == {"steps": 5} and spec.base["data"] == parent.base["data"]
  assert spec.variants == parent.variants and spec.output_root == parent.output_root
  loop = tmp_path / "loop.yaml"
  loop.write_text("extends: loop.yaml\n")
  with pytest.raises(ConfigError, match="extends itself"):
    sweep.load_sweep(loop)


def test_constraint_runs_get_a_multiplier_plot(tmp_path):
  history = [
    {"step": s, "objective": 1, "loss": 1.0, "nll": 1.0, "multiplier": 1.0 + s, "slack": -0.1}
    for s in (1, 2, 3)
  ]
  histories = {"primal-dual": [history]}
  assert report.constraint_keys(histories) == ["multiplier", "slack"]
  assert report.constraint_keys({"plain": [[{"step": 1, "loss": 1.0}]]}) == []
  path = report.write(tmp_path, [], {"primal-dual": history})
  assert "plots/constraint.png" in path.read_text()
  assert (tmp_path / "plots" / "constraint.png").stat().st_size > 1000


def test_load_sweep_rejects_unknown_keys_and_bad_seeds(sweep_file):
  with pytest.raises(ConfigError, match="unknown sweep key"):
    sweep.load_sweep(sweep_file, ["colour=red"])
  with pytest.raises(ConfigError, match="seeds"):
    sweep.load_sweep(sweep_file, ["seeds=[]"])
  with pytest.raises(ConfigError, match="unknown config key"):
    sweep.plan(sweep.load_sweep(sweep_file, ["base.training.nonsense=1"]))


def test_cached_stage_computes_once_and_redoes_partial_stages(tmp_path):
  calls = []

  def compute(folder):
    calls.append(folder)
    (folder / "artifact").write_text("x")
    return {"value": len(calls)}

  folder = tmp_path / "stage"
  first = sweep.cached_stage(folder, {"a": 1}, compute)
  assert first["value"] == 1 and first["code"]  # the code version is recorded too
  assert sweep.cached_stage(folder, {"a": 1}, compute) == first
  assert len(calls) == 1
  # A stage killed before its marker: redone from an empty folder.
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / "leftover").write_text("stale")
  assert sweep.cached_stage(partial, {}, compute)["value"] == 2
  assert not (partial / "leftover").exists()


def _fake_stages(monkeypatch, calls, fail_at=None):
  """Replaces the model stages by bookkeeping: every call is recorded; the unlearning run
  number ``fail_at`` raises (an interrupted sweep)."""

  def finetune(ctx, role, folder):
    calls.append(("finetune", role))
    return {"role": role, "questions": 4, "steps": 2, "seconds": 1.0}

  def reference(ctx, models, folder):
    calls.append(("reference",))
    summary = {"forget_quality": 0.01, "model_utility": 0.5, "forget_efficacy": 0.2}
    return {"target": {"summary": summary}, "oracle": {"summary": summary}, "reference": None}

  def unlearn(ctx, run, target, reference, folder):
    if fail_at is not None and sum(c[0] == "unlearn" for c in calls) == fail_at:
      raise KeyboardInterrupt
    calls.append(("unlearn", run.key))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "update_cosine": 0.1}) + "\n")
    summary = {"forget_quality": 0.1 * (run.seed + 1), "model_utility": 0.4, "sets": {}}
    return {"summary": summary, "unlearn_seconds": 2.0, "eval_seconds": 1.0, "state_bytes": 8}

  monkeypatch.setattr(sweep, "make_context", lambda spec, base: None)
  monkeypatch.setattr(sweep, "finetune_stage", finetune)
  monkeypatch.setattr(sweep, "reference_stage", reference)
  monkeypatch.setattr(sweep, "unlearn_stage", unlearn)


def test_an_interrupted_sweep_resumes_with_the_runs_left(sweep_file, monkeypatch, capsys):
  spec = sweep.load_sweep(sweep_file)
  calls = []
  _fake_stages(monkeypatch, calls, fail_at=3)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(spec)
  assert [c[0] for c in calls] == ["finetune", "finetune", "reference"] + ["unlearn"] * 3
  done = {c[1] for c in calls if c[0] == "unlearn"}
  calls.clear()
  _fake_stages(monkeypatch, calls)
  sweep.run_sweep(spec)
  resumed = [c[1] for c in calls if c[0] == "unlearn"]
  assert len(resumed) == 5 and not set(resumed) & done
  assert all(c[0] == "unlearn" for c in calls)  # fine-tuning and references were cached
  calls.clear()
  sweep.run_sweep(spec, dry_run=True)
  out = capsys.readouterr().out
  assert calls == [] and "8 of 8 unlearning runs cached" in out
  assert "report failed" not in out, out
  results = json.loads((pathlib.Path(spec.report_dir) / "results.json").read_text())
  rows = {(r["loss"], r["variant"]): r for r in results["aggregated"]}
  quality = rows[("NPO+GD", "dualoptim_plus")]["forget_quality"]
  assert quality[0] == pytest.approx(0.15) and quality[2] == 2
  assert quality[1] == pytest.approx(math.sqrt(0.005))  # sample std of 0.1 and 0.2


def _record(loss, variant, seed, quality, utility, efficacy, **extra):
  summary = {
    "forget_quality": quality,
    "model_utility": utility,
    "forget_efficacy": efficacy,
    "paper_model_utility": utility / 2,
    "sets": {"forget": {"probability": efficacy, "rouge_l_recall": None, "truth_ratio": 0.5}},
    **extra,
  }
  return {"loss": loss, "variant": variant, "seed": seed, "summary": summary, "state_bytes": 4}


def test_aggregate_mean_and_sample_std_by_hand():
  records = [
    _record("NPO+GD", "a", 0, 0.1, 0.30, 0.5),
    _record("NPO+GD", "a", 1, 0.3, 0.50, 0.7),
    _record("NPO+GD", "a", 2, 0.2, 0.40, 0.9),
    _record("NPO+GD", "b", 0, None, 0.25, 0.1),
  ]
  out = report.aggregate(records)
  a, b = out[("NPO+GD", "a")], out[("NPO+GD", "b")]
  assert a["forget_quality"][0] == pytest.approx(0.2)
  assert a["forget_quality"][1] == pytest.approx(0.1)  # sqrt(((-.1)^2 + .1^2 + 0) / 2)
  assert a["model_utility"] == pytest.approx((0.4, 0.1, 3))
  assert a["paper_model_utility"] == pytest.approx((0.2, 0.05, 3))
  assert a["forget/probability"] == pytest.approx((0.7, 0.2, 3))
  assert a["forget/rouge_l_recall"] == (None, None, 0)
  assert a["seeds"] == [0, 1, 2]
  assert b["forget_quality"] == (None, None, 0) and b["model_utility"] == (0.25, 0.0, 1)
  keys = report.headline_keys([r["summary"] for r in records])
  assert keys[:3] == ["forget_quality", "model_utility", "forget_efficacy"]
  assert "paper_model_utility" in keys
  table = report.seed_table(out, "NPO+GD", keys)
  assert "| a | 3 | 0.200 ± 0.100 | 0.400 ± 0.100 |" in table
  assert "| b | 1 | – | 0.250 | 0.100 |" in table


def test_plots_are_written(tmp_path):
  records = [
    _record("NPO+GD", v, s, 0.1 + s / 10, 0.3 + s / 10, 0.5) for v in ("a", "b") for s in (0, 1)
  ]
  aggregated = report.aggregate(records)
  path = tmp_path / "tradeoff.png"
  report.plot_tradeoff_errorbars(
    aggregated, "NPO+GD", path, {"target": {"model_utility": 0.5, "forget_efficacy": 0.1}}
  )
  assert path.stat().st_size > 1000
  leaf = "['model']['layers'][{}]['mlp']['w'].value"
  history = [
    {
      "step": s,
      "update_cosine": 0.1 * s,
      "gradient_cosine": -0.1,
      "ill_conditioned_fraction": 0.01,
      "gradient_cosine_per_leaf": {leaf.format(i): 0.1 * i - 0.05 * s for i in range(3)},
    }
    for s in (2, 4)
  ]
  steps, layers, matrix = report.layer_cosines(history + [{"step": 5}])
  assert steps == [2, 4] and layers == [0, 1, 2]
  assert matrix[2, 1] == pytest.approx(0.0)
  histories = {"a": [history, history], "b": [history]}
  report.plot_cosines_over_steps(histories, tmp_path / "cos.png", "t")
  report.plot_layer_cosines(histories, tmp_path / "layers.png", "t")
  assert (tmp_path / "cos.png").stat().st_size > 1000
  assert (tmp_path / "layers.png").stat().st_size > 1000
  assert report.conditioning_keys(histories) == ["ill_conditioned_fraction"]
  histories["b"][0][0]["forget_max_update"] = 2.0
  assert report.conditioning_keys(histories)[0] == "forget_max_update"
  keys = report.conditioning_keys(histories)
  report.plot_scalars_over_steps(histories, keys, tmp_path / "cond.png", "t")
  assert (tmp_path / "cond.png").stat().st_size > 1000


def test_cli_dry_run_lists_the_stages(sweep_file, capsys):
  from train import cli

  assert cli.main(["sweep", str(sweep_file), "seeds=[3]", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "finetune target  todo" in out and "0 of 4 unlearning runs cached" in out
  assert "NPO+GD / dualoptim_plus / seed 3" in out
  assert not (sweep_file.parent / "out").exists()  # nothing computed or written
  assert cli.main(["sweep", str(sweep_file), "colour=red", "--dry-run"]) == 2


def _complete(folder, payload):
  folder.mkdir(parents=True)
  (folder / "stage.json").write_text(json.dumps(payload))
  (folder / sweep.MARKER).write_text("{}")


def test_a_stage_from_before_a_new_field_is_adopted(sweep_file):
  spec = sweep.load_sweep(sweep_file)
  planned = sweep.plan(spec)
  run = planned["runs"][0]
  older = json.loads(json.dumps(run.payload))
  del older["config"]["mesh"]  # fields the code has since gained, now at their defaults
  del older["config"]["training"]["keep_checkpoints"]
  _complete(run.folder.parent / "0123456789abcdef", older)
  changed = json.loads(json.dumps(older))
  changed["config"]["training"]["steps"] = 99  # another setting: never adopted
  _complete(run.folder.parent / "fedcba9876543210", changed)
  again = sweep.plan(spec)
  assert again["runs"][0].folder.name == "0123456789abcdef" and again["runs"][0].complete
  assert again["runs"][0].config.output_dir.endswith("0123456789abcdef")
  assert [r.folder for r in again["runs"][1:]] == [r.folder for r in planned["runs"][1:]]
  defaults = sweep._defaults()
  assert not sweep.compatible({"a": 1, "gone": 2}, {"a": 1}, {})
  assert not sweep.compatible(older["config"], run.payload["config"] | {"new": 1}, defaults)


def test_given_target_and_oracle_skip_fine_tuning(sweep_file, monkeypatch, tmp_path, capsys):
  target, oracle = tmp_path / "released" / "target", tmp_path / "released" / "oracle"
  overrides = [f"finetune.target_path={target}", f"finetune.oracle_path={oracle}"]
  spec = sweep.load_sweep(sweep_file, overrides)
  planned = sweep.plan(spec)
  assert planned["finetune"]["target"][1] == target
  assert all(run.config.model.path == str(target) for run in planned["runs"])
  other = sweep.plan(sweep.load_sweep(sweep_file, [f"finetune.target_path={oracle}"]))
  assert not set(_keys(other)) & set(_keys(planned))
  calls = []
  _fake_stages(monkeypatch, calls)
  sweep.run_sweep(spec)
  assert ("finetune", "target") not in calls and ("finetune", "oracle") not in calls
  assert "finetune target  given" in capsys.readouterr().out
  assert f"given ({target})" in (pathlib.Path(spec.report_dir) / "report.md").read_text()


def test_embedding_model_path_is_made_absolute_or_fetched_by_name(sweep_file, monkeypatch):
  spec = sweep.load_sweep(sweep_file)
  assert sweep.base_config(spec).eval.embedding_model is None  # neither given nor fetched
  given = sweep.load_sweep(sweep_file, ["base.eval.embedding_model=enc/minilm"])
  assert sweep.base_config(given).eval.embedding_model == os.path.abspath("enc/minilm")
  from models import fetch

  monkeypatch.setattr(fetch, "cached_path", lambda name: pathlib.Path(f"/cache/{name}"))
  fetched = sweep.load_sweep(sweep_file, ["embedding_fetch=minilm"])
  assert sweep.base_config(fetched).eval.embedding_model == "/cache/minilm"
