"""Flax NNX decoder-only causal LMs that read and write Hugging Face checkpoints.

Supported HF architectures: Phi-1.5/Phi-2 (`phi`), Llama (`llama`), GPT-2 (`gpt2`).
`load_pretrained` / `load_tokenizer` also read GGUF files (llama.cpp's format, any
type `gguf.quants.dequantize` handles; architectures llama, gpt2, phi2), given as
the `.gguf` file or a folder holding only it; saving always writes HF safetensors.

Public API:
  load_pretrained(path, dtype=..., param_dtype=...) -> (CausalLM, ModelConfig)
  save_pretrained(model, config, path, tokenizer=None, max_shard_bytes=None)
  load_tokenizer(path)
  GGUFCheckpoint(path): a GGUF file as an HF config + HF-named float32 tensors
  generate(model, input_ids, attention_mask, max_new_tokens=..., eos_token_id=..., pad_token_id=...)
  apply_lora / merge_lora / lora_mask / lora_labels, LoRAConfig, LoRAParam

This package knows nothing of unlearning; parameter axis names are listed in
`models/sharding.py`. Matmuls, attention, LayerNorm and GELU carry hand-written
backward passes (`jax.custom_vjp`, for XLA:CPU speed): the models support
reverse-mode autodiff (`jax.grad`, `jax.vjp`) but not forward mode (`jax.jvp`).
"""

from models.checkpoint import export_tensors, load_pretrained, load_tokenizer, save_pretrained
from models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from models.generate import generate
from models.gguf import GGUFCheckpoint
from models.lora import LoRAConfig, LoRAParam, apply_lora, lora_labels, lora_mask, merge_lora
from models.transformer import CausalLM

__all__ = [
  "SUPPORTED_MODEL_TYPES",
  "CausalLM",
  "GGUFCheckpoint",
  "LoRAConfig",
  "LoRAParam",
  "ModelConfig",
  "apply_lora",
  "export_tensors",
  "generate",
  "load_pretrained",
  "load_tokenizer",
  "lora_labels",
  "lora_mask",
  "merge_lora",
  "save_pretrained",
]
