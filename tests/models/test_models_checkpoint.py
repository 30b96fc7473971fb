"""Loading and saving Hugging Face checkpoints: round trips, shards, errors, metadata."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx
from hf_support import (
  HF_CONFIGS,
  ONE_PER_FAMILY,
  build_hf_model,
  padded_batch,
  save_hf_model,
  torch_logits,
)
from jax.sharding import PartitionSpec

import models
from models import sharding


def _file_tensors(directory) -> dict[str, np.ndarray]:
  """All tensors of a (possibly sharded) safetensors folder as numpy arrays."""
  tensors = {}
  for f in sorted(directory.glob("*.safetensors")):
    tensors.update(safetensors.numpy.load_file(str(f)))
  return tensors


def _params(model) -> dict[str, np.ndarray]:
  return {
    ".".join(map(str, p)): np.asarray(v[...])
    for p, v in nnx.iter_graph(model)
    if isinstance(v, nnx.Param)
  }


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_save_load_round_trip_is_bit_exact(name, tmp_path):
  hf_dir, ours_dir = tmp_path / "hf", tmp_path / "ours"
  hf_model = save_hf_model(name, hf_dir)
  model, config = models.load_pretrained(hf_dir)
  models.save_pretrained(model, config, ours_dir)

  original, saved = _file_tensors(hf_dir), _file_tensors(ours_dir)
  assert sorted(saved) == sorted(original)
  for key in original:
    assert saved[key].dtype == original[key].dtype, key
    np.testing.assert_array_equal(saved[key], original[key], err_msg=key)

  reloaded, reloaded_config = models.load_pretrained(ours_dir)
  assert reloaded_config == config
  before, after = _params(model), _params(reloaded)
  assert sorted(before) == sorted(after)
  for key in before:
    np.testing.assert_array_equal(before[key], after[key], err_msg=key)

  # transformers reads our folder back into an identical model.
  hf_again = transformers.AutoModelForCausalLM.from_pretrained(str(ours_dir)).eval()
  ids, mask = padded_batch(2, 6, "right")
  np.testing.assert_array_equal(
    torch_logits(hf_again, ids, mask), torch_logits(hf_model, ids, mask)
  )


def test_loads_sharded_checkpoint_and_saves_sharded(tmp_path):
  hf_dir, ours_dir = tmp_path / "hf", tmp_path / "ours"
  hf_model = save_hf_model("llama-gqa-tied-bias-theta", hf_dir, max_shard_size="40KB")
  assert (hf_dir / "model.safetensors.index.json").is_file()
  assert not (hf_dir / "model.safetensors").exists()

  model, config = models.load_pretrained(hf_dir)
  ids, mask = padded_batch(2, 6, "right")
  real = mask.astype(bool)
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert np.abs(got - torch_logits(hf_model, ids, mask))[real].max() <= 1e-4

  models.save_pretrained(model, config, ours_dir, max_shard_bytes=40_000)
  index = json.loads((ours_dir / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  hf_again = transformers.AutoModelForCausalLM.from_pretrained(str(ours_dir)).eval()
  np.testing.assert_array_equal(
    torch_logits(hf_again, ids, mask), torch_logits(hf_model, ids, mask)
  )


def test_unsupported_model_type_is_named(tmp_path):
  transformers.BertConfig(
    vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
  ).save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match=r"'bert'.*phi, llama, gpt2"):
    models.load_pretrained(tmp_path)


def test_missing_config_and_weights_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.load_pretrained(tmp_path)
  HF_CONFIGS["gpt2-default"]().save_pretrained(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    models.load_pretrained(tmp_path)


def _rewrite_weights(directory, edit):
  path = directory / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(path))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
  save_hf_model("llama-mha-untied", tmp_path)
  name = "model.layers.1.mlp.up_proj.weight"

  def truncate(t):
    t[name] = t[name][:-1]

  _rewrite_weights(tmp_path, truncate)
  with pytest.raises(ValueError, match=rf"{name}.*\(95, 64\).*\(96, 64\)"):
    models.load_pretrained(tmp_path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
  save_hf_model("phi-half-rotary", tmp_path)

  def corrupt(t):
    del t["model.layers.0.self_attn.dense.bias"]
    t["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(3, np.float32)  # ignored buffer

  _rewrite_weights(tmp_path, corrupt)
  with pytest.raises(ValueError) as error:
    models.load_pretrained(tmp_path)
  message = str(error.value)
  assert "model.layers.0.self_attn.dense.bias" in message
  assert "model.layers.0.self_attn.extra.weight" in message
  assert "inv_freq" not in message


def test_gpt2_attention_mask_buffers_are_ignored(tmp_path):
  hf_model = save_hf_model("gpt2-default", tmp_path)

  def add_buffers(t):  # older GPT-2 checkpoints store these causal-mask buffers
    t["transformer.h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)
    t["transformer.h.0.attn.masked_bias"] = np.zeros((), np.float32)

  _rewrite_weights(tmp_path, add_buffers)
  model, _ = models.load_pretrained(tmp_path)
  ids, mask = padded_batch(1, 5, "right")
  got = np.asarray(model(jnp.asarray(ids)))
  assert np.abs(got - torch_logits(hf_model, ids, mask)).max() <= 1e-4


def test_rope_scaling_is_not_implemented(tmp_path):
  config = HF_CONFIGS["llama-mha-untied"]()
  config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
  with pytest.raises(NotImplementedError, match="linear"):
    models.ModelConfig.from_hf(config)


def test_tokenizer_is_saved_and_loaded_with_the_model(tmp_path):
  from tokenizers import Tokenizer, pre_tokenizers
  from tokenizers import models as tok_models

  vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "hello": 3, "world": 4}
  backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
  )
  save_hf_model("gpt2-default", tmp_path / "hf")
  model, config = models.load_pretrained(tmp_path / "hf")
  models.save_pretrained(model, config, tmp_path / "ours", tokenizer=tokenizer)
  loaded = models.load_tokenizer(tmp_path / "ours")
  assert loaded("hello world")["input_ids"] == [3, 4]
  assert loaded.eos_token_id == 2


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_every_parameter_has_logical_axis_names(name):
  config = models.ModelConfig.from_hf(HF_CONFIGS[name]())
  model = models.CausalLM(config, rngs=nnx.Rngs(0))
  known = {
    sharding.VOCAB,
    sharding.EMBED,
    sharding.HEADS,
    sharding.KV_HEADS,
    sharding.MLP,
    sharding.POSITION,
    sharding.HEAD_DIM,
  }
  params = [(p, v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
  assert params
  for path, variable in params:
    axes = variable.get_metadata()["out_sharding"]
    assert len(axes) == variable[...].ndim, path
    assert set(axes) <= known, path
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert specs["embed"]["embedding"].get_value() == PartitionSpec(sharding.VOCAB, sharding.EMBED)


def test_bfloat16_checkpoint_round_trip_is_bit_exact(tmp_path):
  hf_model = build_hf_model("llama-mha-untied").to(torch.bfloat16)
  hf_model.save_pretrained(str(tmp_path))
  model, config = models.load_pretrained(tmp_path, dtype=jnp.bfloat16)
  models.save_pretrained(model, config, tmp_path / "ours")
  original, saved = _file_tensors_bf16(tmp_path), _file_tensors_bf16(tmp_path / "ours")
  assert sorted(original) == sorted(saved)
  for key in original:
    assert torch.equal(original[key], saved[key]), key


def _file_tensors_bf16(directory):
  # numpy has no bfloat16, so compare these through torch.
  return safetensors.torch.load_file(str(directory / "model.safetensors"))
