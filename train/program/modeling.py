"""The bridge between ``models/`` (Flax NNX) and the functional training code.

Training is functional: parameters are a pytree passed through jitted steps. An NNX model
is split once into (graph, params, other state); ``logits_fn(params, ids, mask)`` merges
them back inside the traced computation, so the weights are arguments, never constants.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

import models
from train.config import ModelConfig as ModelSection
from train.runtime import distributed


def tiny_hf_config(
  section: ModelSection, vocab_size: int, bos: int, eos: int, pad: int, max_positions: int = 512
) -> transformers.PretrainedConfig:
  """A small Hugging Face config of ``section.family`` (the default run's model)."""
  common = dict(
    vocab_size=vocab_size,
    bos_token_id=bos,
    eos_token_id=eos,
    pad_token_id=pad,
    max_position_embeddings=max_positions,
  )
  d, layers, heads = section.hidden_size, section.num_layers, section.num_heads
  if section.family == "llama":
    return transformers.LlamaConfig(
      hidden_size=d,
      intermediate_size=4 * d,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=heads,
      tie_word_embeddings=False,
      **common,
    )
  if section.family == "phi":
    return transformers.PhiConfig(
      hidden_size=d,
      intermediate_size=4 * d,
      num_hidden_layers=layers,
      num_attention_heads=heads,
      partial_rotary_factor=0.5,
      **common,
    )
  if section.family == "gpt2":
    return transformers.GPT2Config(
      n_embd=d, n_layer=layers, n_head=heads, n_positions=max_positions, **common
    )
  raise ValueError(f"unknown model family {section.family!r}; expected llama, phi or gpt2")


def dtype_of(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_model(
  section: ModelSection, tokenizer: Any, seed: int = 0
) -> tuple[models.CausalLM, models.ModelConfig]:
  """The model of ``section``: loaded from ``section.path`` or a fresh tiny one."""
  dtype = dtype_of(section.dtype)
  if section.path is not None:
    if not os.path.isdir(section.path):
      raise FileNotFoundError(f"model.path is not a folder: {section.path}")
    return models.load_pretrained(section.path, dtype=dtype)
  hf = tiny_hf_config(
    section,
    len(tokenizer),
    tokenizer.bos_token_id or 0,
    tokenizer.eos_token_id,
    tokenizer.pad_token_id,
  )
  config = models.ModelConfig.from_hf(hf, dtype=dtype)
  return models.CausalLM(config, rngs=nnx.Rngs(seed)), config


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
  """An NNX model as pure functions of its parameters.

  Attributes:
    graphdef: The model's structure.
    rest: Non-parameter state (kept fixed).
    config: The model's ``models.ModelConfig``.
  """

  graphdef: Any
  rest: Any
  config: models.ModelConfig

  @classmethod
  def split(cls, model: models.CausalLM, config: models.ModelConfig) -> tuple[FunctionalModel, Any]:
    """``(functional_model, params)`` of ``model``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return cls(graphdef, rest, config), params

  def module(self, params: Any) -> models.CausalLM:
    return nnx.merge(self.graphdef, params, self.rest)

  def logits(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return self.module(params)(input_ids, attention_mask=attention_mask)


class ScoringAdapter:
  """``train.evaluation``'s ``ScoringModel`` for fixed parameters of a functional model."""

  def __init__(self, model: FunctionalModel, params: Any, eos_token_id: int, pad_token_id: int):
    self._model, self._params = model, params
    self._eos, self._pad = eos_token_id, pad_token_id
    self._logits = jax.jit(model.logits)

  def logits(self, input_ids, attention_mask):
    return self._logits(self._params, jnp.asarray(input_ids), jnp.asarray(attention_mask))

  def generate(self, input_ids, attention_mask, max_new_tokens):
    module = self._model.module(self._params)
    return models.generate(
      module,
      jnp.asarray(input_ids),
      jnp.asarray(attention_mask),
      max_new_tokens=max_new_tokens,
      eos_token_id=self._eos,
      pad_token_id=self._pad,
    )


def save_model(model: FunctionalModel, params: Any, path: str, tokenizer: Any) -> None:
  """Writes the model as a Hugging Face folder (config, safetensors, tokenizer).

  In a multi-process run every process must call this (the weights are gathered from all
  of them); process 0 writes.
  """
  params = distributed.fetch_global(params)
  if distributed.is_primary():
    models.save_pretrained(model.module(params), model.config, path, tokenizer=tokenizer)
  distributed.barrier(f"save_model:{path}")
