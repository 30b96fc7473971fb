"""Run configuration: YAML + overrides, typed, validated with messages naming the key."""

import pytest

from train.config import ConfigError, RunConfig, load_config, save_config


def test_defaults_are_a_valid_config():
  assert load_config() == RunConfig().validate()


def test_yaml_then_overrides(tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text("optimizer:\n  name: dualoptim\n  learning_rate: 1e-5\nloss:\n  name: NPO+GD\n")
  config = load_config(
    path,
    [
      "optimizer.learning_rate=3e-4",
      "training.steps=7",
      "data.task_id=2",
      "optimizer.clip_norm=null",
    ],
  )
  assert config.optimizer.name == "dualoptim"
  assert config.optimizer.learning_rate == 3e-4
  assert config.loss.name == "NPO+GD"
  assert config.training.steps == 7 and config.data.task_id == 2
  assert config.optimizer.clip_norm is None


def test_int_is_accepted_for_float_fields():
  assert load_config(overrides=["optimizer.weight_decay=0"]).optimizer.weight_decay == 0.0


def test_round_trip(tmp_path):
  config = load_config(overrides=["optimizer.state_bits=8", "mesh.fsdp=4"])
  save_config(config, tmp_path / "c.yaml")
  assert load_config(tmp_path / "c.yaml") == config


@pytest.mark.parametrize(
  "override,names",
  [
    ("optimizer.nme=adam", "optimizer.nme"),
    ("optimiser.name=adam", "optimiser"),
    ("optimizer.name=sgd", "optimizer.name"),
    ("optimizer.learning_rate=-1.0", "optimizer.learning_rate"),
    ("optimizer.b2=1.0", "optimizer.b2"),
    ("optimizer.state_bits=4", "optimizer.state_bits"),
    ("optimizer.warmup_steps=-5", "optimizer.warmup_steps"),
    ("optimizer.clip_norm=0", "optimizer.clip_norm"),
    ("optimizer.eps=nan", "optimizer.eps"),
    ("training.steps=0", "training.steps"),
    ("training.steps=ten", "training.steps"),
    ("training.mode=both", "training.mode"),
    ("loss.name=XX+GD", "loss"),
    ("loss.beta=-1.0", "loss"),
    ("mesh.fsdp=0", "mesh.fsdp"),
    ("optimizer", "optimizer"),
  ],
)
def test_bad_values_name_the_key(override, names):
  with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
    load_config(overrides=[override])


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.yaml"):
    load_config(tmp_path / "nope.yaml")


def test_apply_overrides_keeps_the_rest():
  from train.config import apply_overrides

  base = load_config(overrides=["training.steps=9"])
  config = apply_overrides(base, ["optimizer.name=adam"])
  assert config.training.steps == 9 and config.optimizer.name == "adam"
  with pytest.raises(ConfigError, match="optimizer.name"):
    apply_overrides(base, ["optimizer.name=sgd"])


def test_cli_reports_bad_settings_and_accepts_overrides_without_a_command(capsys):
  from train.cli import main

  assert main(["unlearn", "optimizer.name=sgd"]) == 2
  assert "optimizer.name" in capsys.readouterr().err
  assert main(["training.steps=0"]) == 2  # the default experiment, with an override
  assert "training.steps" in capsys.readouterr().err
