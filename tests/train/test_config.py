"""Run configuration: YAML + overrides, typed, validated with messages naming the key."""

import dataclasses

import pytest

from train.config import ConfigError, DataConfig, ModelConfig, RunConfig, load_config, save_config


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
  config = load_config(
    overrides=["optimizer.state_bits=8", "mesh.fsdp=4", "model.lora.targets=[q_proj, o_proj]"]
  )
  save_config(config, tmp_path / "c.yaml")
  assert load_config(tmp_path / "c.yaml") == config


def test_lora_section_is_off_by_default_with_the_papers_setting(tmp_path):
  lora = RunConfig().model.lora
  assert not lora.enabled
  assert (lora.rank, lora.alpha, lora.dropout) == (8, 32.0, 0.05)
  assert RunConfig().model.remat == "none"
  path = tmp_path / "lora.yaml"
  path.write_text("model:\n  remat: dots\n  lora:\n    enabled: true\n    targets: [q_proj]\n")
  config = load_config(path, ["model.lora.rank=4", "model.lora.alpha=16"])
  assert config.model.lora.enabled and config.model.lora.targets == ("q_proj",)
  assert (config.model.lora.rank, config.model.lora.alpha) == (4, 16.0)
  assert config.model.remat == "dots"


def test_finetune_refuses_lora(capsys, tmp_path):
  from train.cli import main

  assert main(["finetune", f"output_dir={tmp_path}", "model.lora.enabled=true"]) == 2
  assert "model.lora" in capsys.readouterr().err


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
    ("model.lora.rank=0", "model.lora.rank"),
    ("model.lora.rank=2.5", "model.lora.rank"),
    ("model.lora.alpha=-1", "model.lora.alpha"),
    ("model.lora.dropout=1.0", "model.lora.dropout"),
    ("model.lora.targets=[q_proj, qkv]", "model.lora.targets"),
    ("model.lora.targets=[]", "model.lora.targets"),
    ("model.lora.targets=q_proj", "model.lora.targets"),
    ("model.lora.targets=[v_proj, v_proj]", "model.lora.targets"),
    ("model.lora.rnk=4", "model.lora.rnk"),
    ("model.remat=partial", "model.remat"),
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


def test_model_path_may_be_a_file_and_a_missing_one_is_named(tmp_path, monkeypatch):
  from flax import nnx

  import models
  from train.config import ModelConfig
  from train.program import modeling

  with pytest.raises(FileNotFoundError, match="model.path does not exist: .*nowhere"):
    modeling.build_model(ModelConfig(path=str(tmp_path / "nowhere")), tokenizer=None)
  gguf = tmp_path / "m.gguf"
  gguf.write_bytes(b"GGUF")
  section = ModelConfig(hidden_size=8, num_layers=1, num_heads=2)
  tiny = models.ModelConfig.from_hf(modeling.tiny_hf_config(section, 8, 0, 1, 2, max_positions=8))
  loaded = []

  def load_pretrained(path, **kwargs):
    loaded.append(path)
    return models.CausalLM(tiny, rngs=nnx.Rngs(0)), tiny

  monkeypatch.setattr(models, "load_pretrained", load_pretrained)
  module, config = modeling.build_model(ModelConfig(path=str(gguf), remat="dots"), None)
  assert loaded == [str(gguf)]
  assert config.remat == module.config.remat == "dots"


def test_an_unknown_template_is_named():
  with pytest.raises(ConfigError, match=r"data.template must be one of .*'chat'.*got 'chatml'"):
    RunConfig(data=DataConfig(template="chatml")).validate()


def test_the_chat_template_needs_a_real_model():
  with pytest.raises(ConfigError, match="data.template='chat'.*model.path"):
    RunConfig(data=DataConfig(template="chat")).validate()
  RunConfig(model=ModelConfig(path="/models/x.gguf"), data=DataConfig(template="chat")).validate()


def test_weights_are_float32_masters_unless_asked(tmp_path):
  from train.data import tokenizer as tokenizer_lib
  from train.program.modeling import build_model

  tokenizer = tokenizer_lib.train_tokenizer(["a b c d e f g"] * 4, vocab_size=300)
  section = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, dtype="bfloat16")
  _, config = build_model(section, tokenizer)
  assert (config.dtype, config.param_dtype) == ("bfloat16", "float32")
  _, config = build_model(dataclasses.replace(section, param_dtype="bfloat16"), tokenizer)
  assert config.param_dtype == "bfloat16"


def test_remat_policies_are_the_models_own():
  from models.config import REMAT_OPTIONS
  from train.config import REMAT_POLICIES

  assert REMAT_POLICIES == REMAT_OPTIONS
