"""Bad data and models fail in one line naming the file, the row or tensor, and the value:
an empty forget or retain set, an over-long sequence (data.overlong=refuse; with truncate
one warning per set naming the file), a tokenizer larger than the model's vocabulary, and
a model folder with a missing or extra tensor."""

import json
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import models
from train import cli, program
from train.config import ModelConfig, load_config
from train.program.modeling import tiny_hf_config


def _error_line(capsys):
  (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  return line


def _unlearn(capsys, tmp_path, *overrides):
  code = cli.main(["unlearn", f"output_dir={tmp_path / 'run'}", "training.steps=1", *overrides])
  return code, _error_line(capsys)


def test_a_task_id_with_no_rows_names_the_file_and_the_task_ids(tmp_path, data_dir, capsys):
  code, line = _unlearn(capsys, tmp_path, f"data.path={data_dir}", "data.task_id=7")
  assert code == 1 and "forget10.json" in line
  assert "task_id=7" in line and "task ids [1, 2, 3]" in line


def test_an_empty_retain_set_names_both_files(tmp_path, data_dir, capsys):
  bad = tmp_path / "data"
  shutil.copytree(data_dir, bad)
  forget_rows = [
    json.loads(row) for row in (bad / "forget10.json").read_text().splitlines() if row.strip()
  ]
  retain = [{"question": r["question"], "answer": r["answer"]} for r in forget_rows]
  retain = [r for r, f in zip(retain, forget_rows) if int(f["task_id"]) == 1]
  (bad / "retain90.json").write_text("".join(json.dumps(r) + "\n" for r in retain))
  code, line = _unlearn(capsys, tmp_path, f"data.path={bad}", "data.retain_other_tasks=false")
  assert code == 1 and "empty retain set" in line
  assert str(bad / "retain90.json") in line and str(bad / "forget10.json") in line
  assert f"{len(retain)} questions" in line


def test_overlong_refuse_names_file_line_and_length(tmp_path, data_dir, capsys):
  code, line = _unlearn(
    capsys, tmp_path, f"data.path={data_dir}", "data.max_length=30", "data.overlong=refuse"
  )
  assert code == 1 and line.startswith("error: OverlongError: ")
  assert "forget10.json line " in line and "data.max_length=30" in line
  length = int(line.split("sequence has ")[1].split()[0])
  assert length > 30


def test_overlong_truncate_warns_once_per_set_with_the_file(data_dir, trained_tokenizer, capsys):
  config = load_config(None, [f"data.path={data_dir}", "data.max_length=34"])
  splits = program.load_splits(config, str(data_dir))
  forget, retain = program.make_streams(config, splits, trained_tokenizer, config.loss.build())
  warnings = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning:")]
  cut = [s.dataset for s in (forget, retain) if s.dataset.num_truncated]
  assert forget.dataset.num_truncated > 0 and len(warnings) == len(cut)
  assert f"{forget.dataset.num_truncated} of {len(forget.dataset)} forget" in warnings[0]
  assert "forget10.json" in warnings[0] and "data.max_length=34" in warnings[0]


def _model_folder(path, tokenizer, vocab_size):
  """A tiny llama Hugging Face folder with ``vocab_size`` embedding rows and ``tokenizer``."""
  hf = tiny_hf_config(
    ModelConfig(hidden_size=32, num_layers=1, num_heads=2),
    vocab_size,
    tokenizer.bos_token_id or 0,
    tokenizer.eos_token_id,
    tokenizer.pad_token_id,
  )
  config = models.ModelConfig.from_hf(hf)
  models.save_pretrained(models.CausalLM(config, rngs=nnx.Rngs(0)), config, path, tokenizer)
  return path


def test_a_tokenizer_larger_than_the_vocabulary_names_both_sizes(
  tmp_path, data_dir, trained_tokenizer, capsys
):
  folder = _model_folder(tmp_path / "model", trained_tokenizer, vocab_size=64)
  code, line = _unlearn(capsys, tmp_path, f"data.path={data_dir}", f"model.path={folder}")
  assert code == 1 and line.startswith("error: VocabularyError: ")
  assert f"{len(trained_tokenizer)} tokens" in line and "vocab_size=64" in line


@pytest.mark.parametrize("fault", ["missing", "extra"])
def test_a_missing_or_extra_tensor_is_named_in_one_line(
  tmp_path, data_dir, trained_tokenizer, capsys, fault
):
  folder = _model_folder(tmp_path / "model", trained_tokenizer, len(trained_tokenizer))
  weights = folder / "model.safetensors"
  tensors = load_file(weights)
  name = sorted(k for k in tensors if "layers.0" in k)[0]
  if fault == "missing":
    del tensors[name]
  else:
    name = "model.layers.9.extra.weight"
    tensors[name] = np.zeros(3, np.float32)
  save_file(tensors, weights, metadata={"format": "pt"})
  code, line = _unlearn(capsys, tmp_path, f"data.path={data_dir}", f"model.path={folder}")
  assert code == 1 and name.split(".weight")[0] in line
