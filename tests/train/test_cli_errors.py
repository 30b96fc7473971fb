"""A failed command prints one line naming the cause and exits non-zero; the traceback goes
to the run folder's error.log (or a temporary file when that folder cannot be written)."""

import pathlib
import re
import shutil

from train import cli


def _error_lines(capsys):
  return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_bad_data_is_one_line_and_the_traceback_is_logged(tmp_path, data_dir, capsys):
  bad = tmp_path / "data"
  shutil.copytree(data_dir, bad)
  forget = bad / "forget10.json"
  lines = forget.read_text().splitlines()
  forget.write_text("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
  out = tmp_path / "run"
  code = cli.main(["unlearn", f"data.path={bad}", f"output_dir={out}", "training.steps=1"])
  assert code == 1
  (line,) = _error_lines(capsys)
  assert line.startswith("error: TofuFormatError: ") and "forget10.json" in line
  assert "line 2" in line and f"(traceback: {out / cli.ERROR_LOG})" in line
  assert "Traceback (most recent call last)" in (out / cli.ERROR_LOG).read_text()


def test_an_unwritable_run_folder_still_reports_the_cause(tmp_path, capsys):
  blocker = tmp_path / "not_a_folder"
  blocker.write_text("a file where the run folder should be")
  code = cli.main(["evaluate", f"output_dir={blocker / 'run'}"])
  assert code == 1
  (line,) = _error_lines(capsys)
  assert line.startswith("error: ") and "not_a_folder" in line
  log = pathlib.Path(re.search(r"\(traceback: (.+)\)$", line).group(1))
  assert log.parent != blocker and "Traceback" in log.read_text()
  log.unlink()


def test_config_errors_keep_exit_code_2(tmp_path, capsys):
  assert cli.main(["unlearn", "training.steps=0", f"output_dir={tmp_path}"]) == 2
  (line,) = _error_lines(capsys)
  assert "training.steps must be positive, got 0" in line


def test_a_stage_the_scenario_lacks_names_the_command_that_runs_it(tmp_path, capsys):
  assert cli.main(["unlearn", "scenario=multitask", f"output_dir={tmp_path}"]) == 2
  (line,) = _error_lines(capsys)
  assert "scenario=multitask has no unlearn stage" in line and "experiment CONFIG" in line
  assert cli.main(["continual", f"output_dir={tmp_path}", "--fresh"]) == 2
  (line,) = _error_lines(capsys)
  assert "use a new output_dir" in line
