"""Shared fixtures for the model tests: tiny random HF models saved to disk.

Imported by the other test_models_* files (this file itself holds no tests).
Every HF parameter is perturbed after construction, because HF initialises
norm scales to 1 and biases to 0, which would hide swapped or dropped tensors.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import torch
import transformers

transformers.logging.set_verbosity_error()

VOCAB = 160

# Several variants per family: MHA vs GQA/MQA, tied vs untied, rotary fractions,
# biases, explicit head_dim, activations.
HF_CONFIGS = {
  "phi-half-rotary": lambda: transformers.PhiConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    partial_rotary_factor=0.5,
    max_position_embeddings=128,
  ),
  "phi-quarter-rotary-gqa-tied-qkln": lambda: transformers.PhiConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    partial_rotary_factor=0.25,
    qk_layernorm=True,
    tie_word_embeddings=True,
    max_position_embeddings=128,
  ),
  "phi-full-rotary-gelu": lambda: transformers.PhiConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    partial_rotary_factor=1.0,
    hidden_act="gelu",
    max_position_embeddings=128,
  ),
  "llama-mha-untied": lambda: transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    max_position_embeddings=128,
  ),
  "llama-gqa-tied-bias-theta": lambda: transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    attention_bias=True,
    mlp_bias=True,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    max_position_embeddings=128,
  ),
  "llama-mqa-head-dim": lambda: transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=128,
  ),
  "gpt2-default": lambda: transformers.GPT2Config(
    vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128
  ),
  "gpt2-inner-gelu-layerscale": lambda: transformers.GPT2Config(
    vocab_size=VOCAB,
    n_embd=32,
    n_layer=2,
    n_head=2,
    n_inner=48,
    n_positions=128,
    activation_function="gelu",
    scale_attn_by_inverse_layer_idx=True,
  ),
}

ONE_PER_FAMILY = ["phi-quarter-rotary-gqa-tied-qkln", "llama-gqa-tied-bias-theta", "gpt2-default"]


def build_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
  """A tiny random HF causal LM in eval mode, every parameter perturbed."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]()).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  return model


def save_hf_model(name: str, directory, seed: int = 0, **save_kwargs) -> torch.nn.Module:
  """Builds `name`, saves it to `directory` with transformers, returns it."""
  model = build_hf_model(name, seed)
  model.save_pretrained(str(directory), **save_kwargs)
  return model


def padded_batch(batch: int, seq: int, side: str, seed: int = 0):
  """Random ids and a mask with a different amount of padding per row.

  Row 0 is unpadded; row i has 2 * i padding tokens on `side`. Padding ids
  are 0 so a mask bug shows up as a logit mismatch.
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(batch, seq))
  mask = np.ones((batch, seq), np.int64)
  for row in range(1, batch):
    pad = min(2 * row, seq - 1)
    if side == "right":
      mask[row, seq - pad :] = 0
    else:
      mask[row, :pad] = 0
  ids[mask == 0] = 0
  return ids, mask


def torch_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
    ).logits.numpy()
