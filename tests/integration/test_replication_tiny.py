"""configs/replication_tiny.yaml end to end through the CLI (a fresh process: the sweep
turns on JAX's persistent compilation cache, a process-wide setting): fine-tuning of the
target and oracle, every optimizer variant, evaluation, the report; then a restart that
finds every stage cached. About 2.5 minutes on the project's 2-core CPU."""

import json
import pathlib

import yaml
from cli_runs import ROOT, run_cli

CONFIG = ROOT / "configs" / "replication_tiny.yaml"


def test_replication_tiny_sweep_end_to_end(tmp_path):
  spec = yaml.safe_load(CONFIG.read_text())
  variants = [v["label"] for v in spec["variants"]]
  losses = [loss["name"] for loss in spec["losses"]]
  out, report_dir = tmp_path / "out", tmp_path / "report"
  args = [
    str(ROOT / "train" / "run.py"),
    "sweep",
    str(CONFIG),
    f"output_root={out}",
    f"report_dir={report_dir}",
    f"compilation_cache={tmp_path / 'jax_cache'}",
  ]
  done = run_cli(args, devices=1, timeout=900)
  assert "complete in" in done.stdout and "report failed" not in done.stdout

  summaries = sorted(out.glob("unlearn/*/eval/tofu_eval_summary.json"))
  assert len(summaries) == len(variants) * len(losses) * len(spec["seeds"])
  for path in summaries:
    summary = json.loads(path.read_text())
    assert summary["model_utility"] is not None and summary["forget_quality"] is not None
  assert not list(out.glob("unlearn/*/checkpoints"))  # dropped once evaluated
  assert (out / "finetune").is_dir() and len(list(out.glob("finetune/*/model"))) == 2

  results = json.loads((report_dir / "results.json").read_text())
  rows = {(r["loss"], r["variant"]) for r in results["aggregated"]}
  assert rows == {(loss, v) for loss in losses for v in variants}
  markdown = (report_dir / "report.md").read_text()
  for variant in variants:
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {variant} | 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    numbers = [c for c in cells if c.replace(".", "", 1).replace(",", "").isdigit()]
    assert len(numbers) >= 3 and " ± " not in row  # one seed: values without a spread
  plots = {p.name for p in (report_dir / "plots").glob("*.png")}
  assert {"tradeoff_npo_gd.png", "cosines_npo_gd.png", "layer_cosines_npo_gd.png"} <= plots
  histories = [
    [json.loads(line) for line in p.read_text().splitlines()]
    for p in out.glob("unlearn/*/metrics.jsonl")
  ]
  assert all(any("gradient_cosine_per_leaf" in h for h in hist) for hist in histories)

  again = run_cli(args[:3] + args[3:] + ["--dry-run"], devices=1)
  assert f"{len(summaries)} of {len(summaries)} unlearning runs cached" in again.stdout
  assert pathlib.Path(report_dir / "report.md").exists()
