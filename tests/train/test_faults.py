"""Faults a run survives, each injected: broken checkpoints on resume, failed saves and
metric writes (full disk), and non-finite steps (skipped, counted, then a stop)."""

import dataclasses
import errno
import hashlib
import importlib
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import dualoptax
from train.runtime.checkpointing import CheckpointError, RunCheckpointer
from train.runtime.metrics import MetricsLogger


def _state(step):
  return {"x": jnp.arange(1000.0) + step, "y": jnp.full(3, float(step))}


def _abstract():
  return {"x": jnp.zeros(1000), "y": jnp.zeros(3)}


def _saved(directory, steps=(4, 6)):
  warnings = []
  checkpointer = RunCheckpointer(directory, max_to_keep=2, warn=warnings.append)
  for step in steps:
    checkpointer.save(step, _state(step), {"step": step})
  checkpointer.close()
  return warnings


def _largest_data_file(step_dir):
  return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def _overwrite_bytes(step_dir):
  path = _largest_data_file(step_dir)
  data = bytearray(path.read_bytes())
  data[8:108] = os.urandom(100)
  path.write_bytes(bytes(data))


BREAKS = {
  "overwritten bytes": (_overwrite_bytes, "ocdbt|zstd|decompress|corrupt|tensorstore"),
  "missing data file": (lambda d: _largest_data_file(d).unlink(), "ocdbt|truncated|not found"),
  "unparsable meta": (lambda d: (d / "meta" / "metadata").write_text("{oops"), "JSONDecodeError"),
  "unparsable array metadata": (
    lambda d: (d / "state" / "_METADATA").write_text("{oops"),
    "JSONDecodeError",
  ),
}


def _snapshot(directory):
  return {
    str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(directory.rglob("*"))
    if p.is_file()
  }


@pytest.mark.parametrize("kind", list(BREAKS))
def test_resume_skips_a_broken_newest_checkpoint_and_saves_it_anew(tmp_path, kind):
  directory = tmp_path / "ckpt"
  _saved(directory)
  breaker, cause = BREAKS[kind]
  breaker(directory / "6")
  warnings = []
  checkpointer = RunCheckpointer(directory, max_to_keep=2, warn=warnings.append)
  step, state, meta = checkpointer.restore_latest_good(_abstract())
  assert step == 4 and meta == {"step": 4}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(4))):
    np.testing.assert_array_equal(a, b)
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert f"checkpoint step 6 in {directory} is unreadable" in warnings[0]
  assert "resuming from step 4" in warnings[0]
  assert re.search(cause, warnings[0], re.I), warnings[0]
  aside = [p.name for p in directory.iterdir() if p.name.startswith("6.corrupt-")]
  assert len(aside) == 1 and aside[0] in warnings[0]
  # The run goes on: step 6 saves again (the broken one is kept aside), then 8 drops 4.
  checkpointer.save(6, _state(6), {"step": 6})
  checkpointer.save(8, _state(8), {"step": 8})
  assert checkpointer.all_steps() == [6, 8]
  assert (directory / aside[0]).is_dir()
  assert checkpointer.restore(_abstract())[0] == 8
  checkpointer.close()


def test_no_restorable_checkpoint_is_one_error_and_nothing_moves(tmp_path):
  directory = tmp_path / "ckpt"
  _saved(directory)
  _overwrite_bytes(directory / "6")
  (directory / "4" / "meta" / "metadata").write_text("{oops")
  before = _snapshot(directory)
  checkpointer = RunCheckpointer(directory, max_to_keep=2, warn=pytest.fail)
  with pytest.raises(CheckpointError) as caught:
    checkpointer.restore_latest_good(_abstract())
  message = str(caught.value)
  assert "\n" not in message and str(directory) in message
  assert "step 6: " in message and "step 4: JSONDecodeError" in message
  assert "nothing was deleted" in message
  checkpointer.close()
  assert _snapshot(directory) == before
  assert RunCheckpointer(tmp_path / "empty").restore_latest_good(_abstract()) is None


def test_a_step_folder_left_by_a_killed_save_is_ignored(tmp_path):
  directory = tmp_path / "ckpt"
  _saved(directory)
  (directory / "6").rename(directory / "6.orbax-checkpoint-tmp-1234")  # never finalized
  checkpointer = RunCheckpointer(directory, max_to_keep=2, warn=pytest.fail)
  assert checkpointer.restore_latest_good(_abstract())[0] == 4
  checkpointer.save(6, _state(6), {"step": 6})
  assert checkpointer.restore(_abstract(), 6)[2] == {"step": 6}
  checkpointer.close()


def _enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device", "/fake/ckpt")


@pytest.mark.parametrize("where", ["save", "wait_until_finished"])
def test_a_failed_save_names_the_step_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, where):
  """A full disk during a save (orbax's call raising ENOSPC, at its start or when its
  background writes are awaited): one error naming the folder and step; the earlier
  checkpoints stay and restore; once space is back the run saves again."""
  directory = tmp_path / "ckpt"
  checkpointer = RunCheckpointer(directory, max_to_keep=2)
  for step in (2, 4):
    checkpointer.save(step, _state(step), {"step": step})
  before = {s: _snapshot(directory / str(s)) for s in (2, 4)}
  with monkeypatch.context() as patch:
    patch.setattr(ocp.CheckpointManager, where, _enospc)
    with pytest.raises(CheckpointError) as caught:
      checkpointer.save(6, _state(6), {"step": 6})
  message = str(caught.value)
  assert f"saving checkpoint step 6 in {directory} failed" in message
  assert "No space left on device" in message and "[2, 4] are intact" in message
  assert {s: _snapshot(directory / str(s)) for s in (2, 4)} == before
  checkpointer.close()
  resumed = RunCheckpointer(directory, max_to_keep=2, warn=lambda m: None)
  step, state, _ = resumed.restore_latest_good(_abstract())
  np.testing.assert_array_equal(state["x"], _state(step)["x"])
  resumed.save(6, _state(6), {"step": 6})
  assert resumed.all_steps() == [4, 6]
  resumed.close()


def test_a_failed_metrics_write_names_the_log_and_keeps_it(tmp_path, monkeypatch):
  with MetricsLogger(tmp_path, start_step=0) as logger:
    logger.log({"step": 1, "loss": 1.0})
    logger.log({"step": 2, "loss": 2.0})
  real_open = pathlib.Path.open

  def full_disk(self, mode="r", *args, **kwargs):
    if "a" in mode or "w" in mode:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_open(self, mode, *args, **kwargs)

  logger = MetricsLogger(tmp_path, start_step=2)
  with monkeypatch.context() as patch:
    patch.setattr(pathlib.Path, "open", full_disk)
    with pytest.raises(OSError, match="cannot write the metrics log") as caught:
      logger.log({"step": 3, "loss": 3.0})
    logger.close()
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(tmp_path / "metrics.jsonl")
    with pytest.raises(OSError, match="cannot rewrite the metrics log"):
      MetricsLogger(tmp_path, start_step=1)  # a resume's rewrite fails: the log stays whole
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


# --- Non-finite steps ---------------------------------------------------------------------


def _poisonable(logits_fn):
  """``logits_fn`` whose logits turn NaN on a batch whose attention mask holds a 2."""

  def logits(weights, ids, mask):
    return logits_fn(weights, ids, mask) * jnp.where(jnp.max(mask) > 1, jnp.nan, 1.0)

  return logits


def _poison(inputs):
  answers = dataclasses.replace(inputs.answers, attention_mask=inputs.answers.attention_mask * 2)
  return inputs._replace(answers=answers)


def test_a_non_finite_step_leaves_params_and_state_bit_identical():
  from tests.train.test_step import _inputs, _logits_fn, _params
  from train import losses
  from train.config import OptimizerConfig
  from train.program.step import StepShardings, TrainStep, compile_steps

  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = _params()
  shardings = StepShardings(jax.tree.map(lambda _: one, params), None, one, one, ref_params=one)
  for mode in ("alternating", "joint"):
    step = TrainStep(
      _poisonable(_logits_fn), dualoptax.dualoptim_plus(1e-2), losses.LossConfig.from_spec("GA+GD")
    )
    opt_state = step.tx.init(params)
    shardings = shardings._replace(opt_state=jax.tree.map(lambda _: one, opt_state))
    train = compile_steps(step, shardings, OptimizerConfig(), alternating=mode == "alternating")
    p, s = jax.tree.map(jnp.copy, params), opt_state
    for t, poisoned in enumerate([False, True, False]):
      batch = _inputs(t)
      if mode == "alternating":
        args = (_poison(batch) if poisoned else batch, jnp.int32(t % 2))
      else:  # the retain half is poisoned: the forget loss stays finite
        args = (batch, _poison(batch) if poisoned else batch)
      before = jax.tree.map(np.asarray, (p, s))  # host copies: p and s are donated
      p, s, metrics = train.train(p, s, None, *args, jnp.int32(t))
      assert float(metrics["skipped"]) == float(poisoned)
      after = jax.tree.leaves((p, s))
      same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), after)]
      assert all(same) if poisoned else not all(same), (mode, t)
    if mode == "joint":
      assert np.isfinite(float(metrics["forget_loss"]))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(p))


def _unlearn_poisoned(tmp_path, data_dir, tokenizer, monkeypatch, poisoned, **training):
  """A tiny alternating run whose steps (1-based) in ``poisoned`` have NaN logits."""

  from train import program
  from train.config import (
    DataConfig,
    LossSection,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TrainingConfig,
  )

  unlearn_lib = importlib.import_module("train.program.unlearn")
  from train.program.modeling import FunctionalModel, build_model

  config = RunConfig(
    output_dir=str(tmp_path),
    model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2),
    data=DataConfig(path=str(data_dir), template="phi", max_length=48, batch_size=4),
    optimizer=OptimizerConfig(name="dualoptim_plus", learning_rate=1e-3, retain_steps=2),
    loss=LossSection(name="GA+GD"),
    training=TrainingConfig(steps=6, diagnostics_every=50, checkpoint_every=2, **training),
  ).validate()
  real_step, real_next, calls = unlearn_lib.make_train_step, unlearn_lib.StepBatches.next, []

  def make_train_step(part, tx, run_config):
    step = real_step(part, tx, run_config)
    return dataclasses.replace(step, logits_fn=_poisonable(step.logits_fn))

  def next_batch(self):
    objective, (inputs, *rest) = real_next(self)
    calls.append(1)
    return objective, (_poison(inputs) if len(calls) in poisoned else inputs, *rest)

  monkeypatch.setattr(unlearn_lib, "make_train_step", make_train_step)
  monkeypatch.setattr(unlearn_lib.StepBatches, "next", next_batch)
  module, model_config = build_model(config.model, tokenizer)
  model, params = FunctionalModel.split(module, model_config)
  streams = program.make_streams(
    config, program.load_splits(config, str(data_dir)), tokenizer, config.loss.build()
  )
  return program.unlearn(config, model, params, params, *streams, tmp_path)


def test_non_finite_steps_are_skipped_counted_then_stop_the_run(
  tmp_path, data_dir, trained_tokenizer, monkeypatch, capsys
):
  from train.program.unlearn import NonFiniteError

  args = (data_dir, trained_tokenizer, monkeypatch)
  clean = _unlearn_poisoned(tmp_path / "clean", *args, poisoned=(), keep_checkpoints=5)
  one = _unlearn_poisoned(tmp_path / "one", *args, poisoned=(3,))
  assert [h["skipped"] for h in one.history] == [0, 0, 1, 0, 0, 0]
  assert [h["nonfinite_steps"] for h in one.history] == [0, 0, 1, 1, 1, 1]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(one.params))
  assert "step 3: the retain loss is not finite; step skipped" in capsys.readouterr().err
  with pytest.raises(NonFiniteError) as caught:
    _unlearn_poisoned(tmp_path / "stop", *args, poisoned=(3, 4, 5), max_nonfinite_steps=3)
  message = str(caught.value)
  assert "steps 3-5: 3 non-finite steps in a row (training.max_nonfinite_steps=3)" in message
  assert "first the retain loss at step 3" in message and "parameters of step 2" in message
  assert f"last checkpoint kept: step 4 in {tmp_path / 'stop' / 'checkpoints'}" in message
  # Nothing lost: the stopped run's checkpoint (4; steps 3-4 skipped) holds step 2's state.
  abstract = {"params": clean.params, "opt_state": clean.opt_state}
  stopped = RunCheckpointer(tmp_path / "stop" / "checkpoints").restore(abstract, 4)[1]
  reference = RunCheckpointer(tmp_path / "clean" / "checkpoints").restore(abstract, 2)[1]
  for a, b in zip(jax.tree.leaves(stopped), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


def test_only_orbax_coroutines_abandoned_by_a_failed_restore_are_silenced():
  import types

  from train.runtime import checkpointing

  def unraisable(filename):
    code = types.SimpleNamespace(co_filename=filename)
    return types.SimpleNamespace(object=types.SimpleNamespace(cr_code=code))

  orbax_read = unraisable(f"{os.sep}site-packages{os.sep}orbax{os.sep}checkpoint{os.sep}x.py")
  assert checkpointing._is_abandoned_read(orbax_read)
  assert not checkpointing._is_abandoned_read(unraisable(f"{os.sep}work{os.sep}mine.py"))
  assert not checkpointing._is_abandoned_read(types.SimpleNamespace(object=object()))
