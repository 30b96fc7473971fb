"""The bridge between ``models/`` (Flax NNX) and the functional training code.

Training is functional: parameters are a pytree passed through jitted steps. An NNX model
is split once into (graph, params, other state); ``logits_fn(params, ids, mask)`` merges
them back inside the traced computation, so the weights are arguments, never constants.

LoRA: :meth:`FunctionalModel.with_lora` adds adapters to a model and returns the adapted
model with :class:`AdaptedParams` (the base weights, unchanged and not copied, and the
adapters). The adapted model runs plain parameters as the model without adapters, which is
how the frozen base serves as the reference model of NPO / DPO / KL.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

import models
from models.lora import draw_dropout_masks
from train.config import LoRASection
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
  """The model of ``section``: loaded from ``section.path`` (a Hugging Face folder or a GGUF
  file) or a fresh tiny one, with ``section.remat``'s rematerialisation.

  Raises:
    FileNotFoundError: If ``section.path`` does not exist.
    VocabularyError: If the tokenizer has more tokens than the loaded model's vocabulary.
  """
  dtype, param_dtype = dtype_of(section.dtype), dtype_of(section.param_dtype)
  if section.path is not None:
    if not os.path.exists(section.path):
      raise FileNotFoundError(
        f"model.path does not exist: {section.path} (expected a Hugging Face folder or a "
        ".gguf file)"
      )
    module, config = models.load_pretrained(section.path, dtype=dtype, param_dtype=param_dtype)
    check_vocabulary(section.path, config.vocab_size, tokenizer)
  else:
    hf = tiny_hf_config(
      section,
      len(tokenizer),
      tokenizer.bos_token_id or 0,
      tokenizer.eos_token_id,
      tokenizer.pad_token_id,
    )
    config = models.ModelConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype)
    module = models.CausalLM(config, rngs=nnx.Rngs(seed))
  module.set_remat(section.remat)  # before the split: the graph carries it
  return module, module.config


class VocabularyError(ValueError):
  """The tokenizer makes token ids the model has no embedding for."""


def check_vocabulary(path: str, vocab_size: int, tokenizer: Any) -> None:
  """Refuses a tokenizer with more tokens than the model's embedding has rows: its higher
  ids would index past the table, which XLA clamps silently instead of failing.

  Raises:
    VocabularyError: naming both sizes.
  """
  size = None if tokenizer is None else len(tokenizer)
  if size is not None and size > vocab_size:
    raise VocabularyError(
      f"{path}: the tokenizer has {size} tokens (ids up to {size - 1}) but the model's "
      f"embedding has vocab_size={vocab_size} rows"
    )


def lora_config(section: LoRASection) -> models.LoRAConfig:
  """The ``models.LoRAConfig`` of a ``model.lora`` section (with ``bounded``, its MLP
  targets get bounded adapters: ``models.lora.BoundedLoRAAdapter``)."""
  return models.LoRAConfig(
    rank=section.rank,
    alpha=section.alpha,
    dropout=section.dropout,
    targets=section.targets,
    bounded_targets=section.bounded_targets,
    frequency=section.frequency,
  )


class AdaptedParams(NamedTuple):
  """The parameters of a model with LoRA adapters.

  Attributes:
    base: The base model's weights (an ``nnx.State`` like the model's without adapters).
    adapters: The adapter weights (an ``nnx.State`` of ``models.LoRAParam``).
  """

  base: Any
  adapters: Any


def join_adapters(adapters: Any, base: Any) -> AdaptedParams:
  """The trained model's weights from the trained adapters and the frozen base (the step's
  ``join``: what it trains, and the fixed weights it also reads as the reference)."""
  return AdaptedParams(base=base, adapters=adapters)


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
  """An NNX model as pure functions of its parameters.

  Attributes:
    graphdef: The model's structure (in evaluation mode: no adapter dropout).
    rest: Non-parameter state (kept fixed; with adapters, their dropout RNG streams, which
      training does not use: :meth:`train_logits` draws the masks from its key).
    config: The model's ``models.ModelConfig``.
    base: With adapters: the same model without them, which runs plain (non-adapted)
      parameters. None otherwise.
    train_graphdef: With adapters: the structure in training mode (adapter dropout on).
  """

  graphdef: Any
  rest: Any
  config: models.ModelConfig
  base: FunctionalModel | None = None
  train_graphdef: Any = None

  @classmethod
  def split(cls, model: models.CausalLM, config: models.ModelConfig) -> tuple[FunctionalModel, Any]:
    """``(functional_model, params)`` of ``model`` (a model without adapters)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return cls(graphdef, rest, config), params

  def with_lora(
    self, params: Any, lora: models.LoRAConfig, seed: int = 0
  ) -> tuple[FunctionalModel, AdaptedParams]:
    """This model with fresh adapters (``b = 0``: same outputs) on ``lora.targets``.

    Args:
      params: This model's weights; they become the frozen base, as they are (not copied).
      lora: The adapters' rank, alpha, dropout and targets.
      seed: Seeds the adapters' ``a`` and their dropout streams.

    Returns:
      ``(adapted_model, AdaptedParams(params, adapters))``.

    Raises:
      ValueError: If no projection of the model is among ``lora.targets``.
    """
    if self.base is not None:
      raise ValueError("this model already has adapters")
    module = self.module(params)
    models.apply_lora(module, lora, nnx.Rngs(params=seed, dropout=seed + 1))
    train_graphdef, adapters, _, rest = nnx.split(module, models.LoRAParam, nnx.Param, ...)
    # Static attributes: evaluation (and the reference model) never drop adapter inputs.
    graphdef = nnx.split(nnx.view(module, deterministic=True), models.LoRAParam, nnx.Param, ...)[0]
    adapted = FunctionalModel(graphdef, rest, self.config, base=self, train_graphdef=train_graphdef)
    return adapted, AdaptedParams(base=params, adapters=adapters)

  def module(self, params: Any) -> models.CausalLM:
    """The NNX model of ``params``; plain parameters of an adapted model give its base."""
    if isinstance(params, AdaptedParams):
      return _merge(self.graphdef, params.adapters, params.base, self.rest)
    if self.base is not None:
      return self.base.module(params)
    return _merge(self.graphdef, params, self.rest)

  def logits(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Evaluation-mode logits (no dropout)."""
    return self.module(params)(input_ids, attention_mask=attention_mask)

  def train_logits(
    self, params: Any, input_ids: jax.Array, attention_mask: jax.Array, key: jax.Array
  ) -> jax.Array:
    """Training-mode logits: adapter dropout on, every adapter's mask drawn from ``key`` in
    one call (``models.lora.draw_dropout_masks``: distinct masks per adapter, a function of
    ``key`` only). Without adapters (also plain parameters of an adapted model) the same as
    :meth:`logits`."""
    if not isinstance(params, AdaptedParams) or self.train_graphdef is None:
      return self.logits(params, input_ids, attention_mask)
    module = _merge(self.train_graphdef, params.adapters, params.base, self.rest)
    draw_dropout_masks(module, key, input_ids.shape)
    return module(input_ids, attention_mask=attention_mask)


def _merge(graphdef: Any, *states: Any) -> models.CausalLM:
  """The module of ``states``, with Variables of its own (sharing the arrays, not copying
  them): NNX transforms inside the model (``nnx.remat`` of ``model.remat``) write back to
  the Variables they see, which fails for a state closed over from an outer trace (the
  step's ``lax.cond`` branches)."""
  return nnx.merge(graphdef, *states, copy=True)


class ScoringAdapter:
  """``train.evaluation``'s ``ScoringModel`` for fixed parameters of a functional model."""

  def __init__(
    self, model: FunctionalModel, params: Any, eos_token_id: int | Sequence[int], pad_token_id: int
  ):
    """``eos_token_id``: the token(s) that end a generation (e.g. end-of-turn, then EOS)."""
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

  Adapters are merged into the weights they adapt (``models.save_pretrained``): a kernel
  is written as ``base + a @ b * alpha / rank``, or for a bounded adapter
  ``base + sin(frequency * a @ b) / frequency * alpha / rank`` (the adapter's
  ``delta_kernel``, as in training and evaluation).

  In a multi-process run every process must call this (the weights are gathered from all
  of them); process 0 writes.
  """
  params = distributed.fetch_global(params)
  if distributed.is_primary():
    models.save_pretrained(model.module(params), model.config, path, tokenizer=tokenizer)
  distributed.barrier(f"save_model:{path}")
