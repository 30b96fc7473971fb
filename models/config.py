"""One typed, frozen description of a decoder-only causal LM.

The three supported Hugging Face families (Phi, Llama, GPT-2) differ only in a
handful of switches (norm type, MLP variant, position encoding, residual layout,
biases). `ModelConfig` names those switches, so the modules in this package
never look at a Hugging Face config directly; `ModelConfig.from_hf` is the only
place that knows each family's field names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("phi", "llama", "gpt2")
REMAT_OPTIONS = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder-only transformer.

  Attributes:
    model_type: Hugging Face `model_type` ("phi", "llama" or "gpt2"); selects
      the checkpoint name mapping.
    vocab_size: Number of token embeddings / logits.
    hidden_size: Width of the residual stream.
    intermediate_size: Hidden width of the MLP.
    num_layers: Number of decoder blocks.
    num_heads: Number of query heads.
    num_kv_heads: Number of key/value heads (< num_heads for grouped-query).
    head_dim: Width of one attention head.
    norm_type: "layernorm" (with bias) or "rmsnorm" (scale only).
    norm_eps: Epsilon of every norm.
    mlp_type: "dense" (up -> act -> down) or "gated" (SwiGLU-style).
    activation: Activation name ("gelu_new", "gelu", "silu", "relu", ...).
    parallel_residual: Phi-style block: attention and MLP read the same normed
      input and both add to the residual.
    position_type: "rotary" or "learned" (absolute position embeddings).
    rotary_dim: Number of leading head dimensions that are rotated.
    rope_theta: RoPE base frequency.
    max_position_embeddings: Size of the learned position table (and the
      nominal context length).
    qkv_bias: Whether the q/k/v projections have a bias.
    attn_out_bias: Whether the attention output projection has a bias.
    mlp_bias: Whether the MLP projections have biases.
    lm_head_bias: Whether the LM head has a bias (Phi).
    qk_layernorm: Phi option: LayerNorm over each query/key head.
    attn_scale: Multiplier on q.k scores (usually head_dim ** -0.5).
    scale_attn_by_inverse_layer_idx: GPT-2 option: divide scores of layer i
      additionally by i + 1.
    tie_word_embeddings: LM head reuses the token embedding matrix.
    bos_token_id, eos_token_id, pad_token_id: Special token ids from the HF
      config (eos may be a tuple of ids).
    dtype: Compute dtype of activations and matmul operands. With bfloat16,
      every matmul still accumulates in float32, and norm statistics, RoPE,
      attention scores and softmax, and the logits are float32 (HF Llama
      does the same but rounds scores and logits to bfloat16 first).
    param_dtype: Storage dtype of the parameters. For training, float32
      parameters with a bfloat16 `dtype` keep small updates: a bfloat16
      parameter moves only by steps of 2**-8 of its magnitude (at a learning
      rate of 1e-5, one Adam-like step changes 2 % of SmolLM2's bfloat16
      weights).
    remat: Rematerialization of each decoder block in the backward pass of a
      training forward (no KV cache): "none" stores every activation the
      backward pass needs; "full" stores only each block's input and
      recomputes the block; "dots" also stores the outputs of the block's
      weight matmuls (the projections) and recomputes the rest (norms,
      activations, attention scores and probabilities). Results are the same
      numbers up to float rounding (~1e-7 in float32); only memory and time
      change (measured on SmolLM2-135M: benchmarks/smollm2_throughput.py).
  """

  model_type: Literal["phi", "llama", "gpt2"]
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  norm_type: Literal["layernorm", "rmsnorm"]
  norm_eps: float
  mlp_type: Literal["dense", "gated"]
  activation: str
  parallel_residual: bool
  position_type: Literal["rotary", "learned"]
  rotary_dim: int = 0
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  qkv_bias: bool = False
  attn_out_bias: bool = False
  mlp_bias: bool = False
  lm_head_bias: bool = False
  qk_layernorm: bool = False
  attn_scale: float = 1.0
  scale_attn_by_inverse_layer_idx: bool = False
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: Literal["none", "full", "dots"] = "none"
  hf_config: dict[str, Any] | None = dataclasses.field(
    default=None, compare=False, hash=False, repr=False
  )

  def __post_init__(self):
    if self.remat not in REMAT_OPTIONS:
      raise ValueError(
        f"remat must be one of {', '.join(map(repr, REMAT_OPTIONS))}, got remat={self.remat!r}"
      )

  def replace(self, **changes: Any) -> ModelConfig:
    """Returns a copy with `changes` applied (e.g. another dtype)."""
    return dataclasses.replace(self, **changes)

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """The EOS id(s) as a tuple (empty if the config has none)."""
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  @classmethod
  def from_hf(
    cls, hf_config: Any, dtype: Any = jnp.float32, param_dtype: Any = None
  ) -> ModelConfig:
    """Builds a `ModelConfig` from a `transformers.PretrainedConfig`.

    Args:
      hf_config: A transformers config (e.g. from `AutoConfig`).
      dtype: Compute dtype.
      param_dtype: Parameter dtype; defaults to `dtype`.

    Returns:
      The equivalent `ModelConfig`.

    Raises:
      ValueError: If the model type is not supported.
      NotImplementedError: For RoPE scaling variants other than the default.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"Unsupported model_type {model_type!r}; supported model types are "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}."
      )
    builder = {"phi": _phi_fields, "llama": _llama_fields, "gpt2": _gpt2_fields}
    fields = builder[model_type](hf_config)
    eos = hf_config.eos_token_id
    return cls(
      model_type=model_type,
      vocab_size=hf_config.vocab_size,
      tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
      bos_token_id=hf_config.bos_token_id,
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=hf_config.pad_token_id,
      dtype=jnp.dtype(dtype),
      param_dtype=jnp.dtype(param_dtype if param_dtype is not None else dtype),
      hf_config=hf_config.to_dict(),
      **fields,
    )


def _rope_settings(hf_config: Any) -> tuple[float, float]:
  """Reads (rope_theta, partial_rotary_factor) from new or legacy HF fields.

  transformers 5 keeps them in `rope_parameters`; older configs had top-level
  `rope_theta` / `partial_rotary_factor` / `rope_scaling`.
  """
  params = dict(getattr(hf_config, "rope_parameters", None) or {})
  scaling = getattr(hf_config, "rope_scaling", None) or {}
  rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise NotImplementedError(
      f"RoPE scaling type {rope_type!r} is not implemented; only the default "
      "(unscaled) rotary embedding is supported."
    )
  theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  fraction = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
  return float(theta), float(fraction)


def _rotary_decoder_fields(c: Any) -> dict[str, Any]:
  """Fields that Phi and Llama configs spell alike (rotary attention, HF names)."""
  theta, fraction = _rope_settings(c)
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  return dict(
    hidden_size=c.hidden_size,
    intermediate_size=c.intermediate_size,
    num_layers=c.num_hidden_layers,
    num_heads=c.num_attention_heads,
    num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
    head_dim=head_dim,
    activation=c.hidden_act,
    position_type="rotary",
    rotary_dim=int(head_dim * fraction),
    rope_theta=theta,
    max_position_embeddings=c.max_position_embeddings,
    attn_scale=head_dim**-0.5,
  )


def _phi_fields(c: Any) -> dict[str, Any]:
  return dict(
    _rotary_decoder_fields(c),
    norm_type="layernorm",
    norm_eps=c.layer_norm_eps,
    mlp_type="dense",
    parallel_residual=True,
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    lm_head_bias=True,
    qk_layernorm=bool(c.qk_layernorm),
  )


def _llama_fields(c: Any) -> dict[str, Any]:
  return dict(
    _rotary_decoder_fields(c),
    norm_type="rmsnorm",
    norm_eps=c.rms_norm_eps,
    mlp_type="gated",
    parallel_residual=False,
    qkv_bias=bool(c.attention_bias),
    attn_out_bias=bool(c.attention_bias),
    mlp_bias=bool(c.mlp_bias),
  )


def _gpt2_fields(c: Any) -> dict[str, Any]:
  head_dim = c.n_embd // c.n_head
  return dict(
    hidden_size=c.n_embd,
    intermediate_size=c.n_inner or 4 * c.n_embd,
    num_layers=c.n_layer,
    num_heads=c.n_head,
    num_kv_heads=c.n_head,
    head_dim=head_dim,
    norm_type="layernorm",
    norm_eps=c.layer_norm_epsilon,
    mlp_type="dense",
    activation=c.activation_function,
    parallel_residual=False,
    position_type="learned",
    max_position_embeddings=c.n_positions,
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    attn_scale=head_dim**-0.5 if c.scale_attn_weights else 1.0,
    scale_attn_by_inverse_layer_idx=bool(c.scale_attn_by_inverse_layer_idx),
  )
