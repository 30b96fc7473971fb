"""Decoder block and the causal LM (embeddings -> blocks -> norm -> LM head)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import sharding
from models.attention import Attention, KVCache
from models.config import ModelConfig
from models.layers import Dense, DenseMLP, Embedding, GatedMLP, dense_group, make_norm, param
from models.rotary import rotary_angles


class DecoderBlock(nnx.Module):
  """Pre-norm transformer block, sequential or parallel (Phi) residual."""

  def __init__(self, config: ModelConfig, layer_idx: int, rngs: nnx.Rngs):
    self.parallel_residual = config.parallel_residual
    self.attn_norm = make_norm(config, rngs)
    self.attn = Attention(config, layer_idx, rngs)
    # Phi's attention and MLP share one norm; the others norm before the MLP.
    self.mlp_norm = nnx.data(None) if config.parallel_residual else make_norm(config, rngs)
    mlp_cls = GatedMLP if config.mlp_type == "gated" else DenseMLP
    self.mlp = mlp_cls(config, rngs)

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
  ) -> tuple[jax.Array, KVCache | None]:
    h = self.attn_norm(x)
    if self.parallel_residual:
      # Attention and MLP read the same `h`: one matmul for all their input
      # projections (q, k, v and fc1 for Phi).
      attn_dense = self.attn.input_projections()
      projected = dense_group(h, attn_dense + self.mlp.input_projections())
      attn_out, cache = self.attn(
        h, mask, rope, cache, cache_index, projected=projected[: len(attn_dense)]
      )
      return x + attn_out + self.mlp(h, projected=projected[len(attn_dense) :]), cache
    attn_out, cache = self.attn(h, mask, rope, cache, cache_index)
    x = x + attn_out
    return x + self.mlp(self.mlp_norm(x)), cache


def _run_block(
  block: DecoderBlock, x: jax.Array, mask: jax.Array, rope: tuple[jax.Array, jax.Array] | None
) -> jax.Array:
  """One block of a forward pass without a cache."""
  return block(x, mask, rope)[0]


# What each `ModelConfig.remat` option saves for the backward pass of a block;
# everything else is recomputed from the block's input and parameters.
_REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  # The projections' outputs (dots without batch dimensions), not the
  # [batch, heads, q, k] attention scores (batched dots).
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _after(tree: Any, g: jax.Array) -> Any:
  """`tree` with every float array made to depend on `g` (adds 0 * one element of g).

  Exact for finite `g` (x + 0 == x; a NaN in g makes the block's gradient NaN
  anyway). XLA does not fold `0 * g` for floats, so the dependency survives.
  """
  zero = jnp.zeros((), g.dtype) * g.reshape(-1)[0]
  return jax.tree.map(
    lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.floating) else r, tree
  )


def _remat_block(
  policy: Any,
  block: DecoderBlock,
  x: jax.Array,
  mask: jax.Array,
  rope: tuple[jax.Array, jax.Array] | None,
) -> jax.Array:
  """`_run_block` whose backward pass recomputes what `policy` did not save.

  `jax.checkpoint` alone saves no memory on XLA:CPU here: the optimization
  barriers that should hold the recomputation back until the block's output
  gradient exists are removed before scheduling, and XLA:CPU then recomputes
  during the forward pass (the default scheduler always, the memory-optimized
  one for some models). So the checkpointed block sits in a `custom_vjp`
  whose backward pass makes the saved values depend on the incoming gradient.
  Non-parameter state the block updates (LoRA dropout's RNG counts) is
  returned and written back; the recomputation reads the same state as the
  forward pass, so dropout masks match.
  """
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)

  def forward(params, x, rope, rest, mask):
    # Fresh variables (copy): NNX refuses to mutate variables, such as the RNG
    # counts, that belong to an outer trace.
    module = nnx.merge(graphdef, params, rest, copy=True)
    return module(x, mask, rope)[0], nnx.state(module, nnx.Not(nnx.Param))

  @jax.custom_vjp
  def run(params, x, rope, rest, mask):
    return forward(params, x, rope, rest, mask)

  def run_fwd(params, x, rope, rest, mask):
    checkpointed = jax.checkpoint(
      lambda p, y, r: forward(p, y, r, rest, mask), policy=policy, prevent_cse=True
    )
    out, vjp_fn, new_rest = jax.vjp(checkpointed, params, x, rope, has_aux=True)
    return (out, new_rest), vjp_fn

  def run_bwd(vjp_fn, cotangents):
    g = cotangents[0]
    return (*_after(vjp_fn, g)(g), None, None)

  run.defvjp(run_fwd, run_bwd)
  out, new_rest = run(params, x, rope, rest, mask)
  nnx.update(block, new_rest)
  return out


def default_positions(attention_mask: jax.Array) -> jax.Array:
  """Position of each token counting only real tokens (0 for left padding).

  Matches HF generation's `cumsum(mask) - 1` and, for right padding, the plain
  `arange` HF uses in a forward pass.
  """
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class CausalLM(nnx.Module):
  """Decoder-only language model for every `ModelConfig` family.

  With `config.dtype` bfloat16 the residual stream, activations and matmul
  operands are bfloat16 (as in HF), every matmul accumulates in float32, and
  norm statistics, RoPE, attention scores and softmax, and the logits are
  float32. `config.remat` is read at call time (see `set_remat`).

  Attributes:
    config: The model's `ModelConfig` (static: part of the graph definition).
    embed: Token embedding ("vocab", "embed").
    pos_embed: Learned absolute positions (GPT-2) or None.
    layers: The decoder blocks.
    final_norm: Norm before the LM head.
    lm_head: Untied output projection, or None when tied to `embed`.
    lm_head_bias: Phi's LM-head bias when the head is tied, else None.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    self.embed = Embedding(
      config.vocab_size, config.hidden_size, (sharding.VOCAB, sharding.EMBED), **kw
    )
    if config.position_type == "learned":
      self.pos_embed = Embedding(
        config.max_position_embeddings,
        config.hidden_size,
        (sharding.POSITION, sharding.EMBED),
        **kw,
      )
    else:
      self.pos_embed = nnx.data(None)
    self.layers = nnx.List([DecoderBlock(config, i, rngs) for i in range(config.num_layers)])
    self.final_norm = make_norm(config, rngs)
    self.lm_head_bias = nnx.data(None)
    if config.tie_word_embeddings:
      self.lm_head = nnx.data(None)
      if config.lm_head_bias:
        self.lm_head_bias = param(
          rngs, nnx.initializers.zeros, (config.vocab_size,), config.param_dtype, (sharding.VOCAB,)
        )
    else:
      self.lm_head = Dense(
        config.hidden_size,
        config.vocab_size,
        (sharding.EMBED, sharding.VOCAB),
        use_bias=config.lm_head_bias,
        **kw,
      )

  def set_remat(self, remat: str) -> None:
    """Switches the rematerialization of the blocks (`ModelConfig.remat`).

    Example: `model.set_remat("full")` before `nnx.split` or `jax.jit`.

    Raises:
      ValueError: If `remat` is not "none", "full" or "dots".
    """
    self.config = self.config.replace(remat=remat)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
  ) -> jax.Array:
    """Next-token logits for a (padded) batch.

    Args:
      input_ids: [batch, seq] token ids.
      attention_mask: [batch, seq], 1 for real tokens, 0 for padding (left or
        right). None means no padding.
      positions: [batch, seq] position ids; default counts real tokens only.

    Returns:
      [batch, seq, vocab] float32 logits, whatever `config.dtype` (garbage at
      padding positions).
    """
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
      positions = default_positions(attention_mask)
    logits, _ = self.forward_with_cache(input_ids, positions, attention_mask, None, 0)
    return logits

  def forward_with_cache(
    self,
    input_ids: jax.Array,
    positions: jax.Array,
    key_valid: jax.Array,
    caches: list[KVCache] | None,
    cache_index: jax.Array | int,
  ) -> tuple[jax.Array, list[KVCache] | None]:
    """Runs the model on tokens that occupy cache slots starting at `cache_index`.

    Args:
      input_ids: [batch, seq].
      positions: [batch, seq] position ids.
      key_valid: [batch, kv_len] boolean/int, which key slots hold real
        tokens; kv_len is seq without caches, else the cache length.
      caches: One `KVCache` per layer, or None for a plain forward pass.
      cache_index: Slot of the first token of `input_ids`.

    Returns:
      (float32 logits [batch, seq, vocab], updated caches or None).
    """
    seq = input_ids.shape[1]
    kv_len = key_valid.shape[1]
    query_slots = cache_index + jnp.arange(seq)
    causal = jnp.arange(kv_len)[None, :] <= query_slots[:, None]
    mask = causal[None] & key_valid.astype(bool)[:, None, :]

    x = self.embed(input_ids)
    rope = None
    if self.pos_embed is not None:
      x = x + self.pos_embed(positions)
    else:
      rope = rotary_angles(positions, self.config.rotary_dim, self.config.rope_theta)

    if caches is None:
      # Only a forward pass without a cache is differentiated (training), so
      # only it is rematerialized.
      policy = _REMAT_POLICIES.get(self.config.remat)
      run_block = _run_block if policy is None else functools.partial(_remat_block, policy)
      for layer in self.layers:
        x = run_block(layer, x, mask, rope)
      new_caches = None
    else:
      new_caches = []
      for layer, cache in zip(self.layers, caches, strict=True):
        x, cache = layer(x, mask, rope, cache, cache_index)
        new_caches.append(cache)

    x = self.final_norm(x)
    # The LM head accumulates and returns float32 even for a bfloat16 model:
    # bfloat16 logits of magnitude 16-32 would be rounded to steps of 1/8.
    if self.lm_head is not None:
      logits = self.lm_head(x, out_dtype=jnp.float32)
    else:
      logits = self.embed.attend(x, out_dtype=jnp.float32)
      if self.lm_head_bias is not None:
        logits = logits + self.lm_head_bias[...].astype(jnp.float32)
    return logits, new_caches
