"""A BERT sentence encoder (e.g. all-MiniLM-L6-v2) in plain JAX, for embedding similarity.

Evaluation compares a generated answer with the true one by the cosine between their
sentence embeddings. The encoder is a frozen, inference-only BERT, so it is written as pure
functions over a dict of arrays (no Flax module, no custom gradients); its 6 layers are
stacked and run by `lax.scan`, so each padded length compiles one layer body.

It reads a sentence-transformers folder (as `python -m models.fetch minilm` leaves one):
config.json, model.safetensors and tokenizer files, plus modules.json (the pipeline:
Transformer -> Pooling(mean) -> Normalize), 1_Pooling/config.json and
sentence_bert_config.json (max_seq_length). A plain Hugging Face BERT folder also loads,
as sentence-transformers would load it: mean pooling, no normalisation.

Public API:
  BertConfig, load_bert_params(file, config), bert_hidden_states(params, config, ids, mask)
  load_sentence_encoder(path) -> SentenceEncoder; SentenceEncoder.encode(texts) -> [n, hidden]
  cosine_similarity_scores(encoder, generations, answers) -> [n] in [0, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from models.layers import activation_fn

WEIGHTS_NAME = "model.safetensors"
_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder, from a Hugging Face config.json.

  Attributes:
    vocab_size: Rows of the word embedding table.
    hidden_size: Width of the residual stream.
    num_layers: Number of encoder blocks.
    num_heads: Attention heads per block (hidden_size is a multiple of it).
    intermediate_size: Hidden width of the MLP.
    max_position_embeddings: Rows of the (learned, absolute) position table.
    type_vocab_size: Rows of the token-type (segment) table.
    layer_norm_eps: Epsilon of every LayerNorm.
    hidden_act: MLP activation as HF names it ("gelu" is BERT's exact erf GELU).
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  hidden_act: str = "gelu"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
      )
    activation_fn(self.hidden_act)  # raises for an unknown activation

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, hf: dict[str, Any], where: Any = "config") -> BertConfig:
    """Reads the fields of an HF BERT config dict; `where` names it in errors."""
    if hf.get("model_type", "bert") != "bert":
      raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not 'bert'")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise NotImplementedError(f"{where}: position_embedding_type {position_type!r}")
    try:
      return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_act=hf.get("hidden_act", "gelu"),
      )
    except KeyError as error:
      raise ValueError(f"{where} lacks the field {error.args[0]!r}") from None

  @classmethod
  def from_json(cls, file: str | os.PathLike) -> BertConfig:
    return cls.from_hf(_read_json(Path(file)), where=file)


def _read_json(file: Path) -> Any:
  if not file.is_file():
    raise FileNotFoundError(f"{file} does not exist")
  return json.loads(file.read_text())


# Our per-layer module -> HF module inside "encoder.layer.{i}."; (linear, norm) leaves.
_LAYER_MODULES = {
  "query": "attention.self.query",
  "key": "attention.self.key",
  "value": "attention.self.value",
  "attention_out": "attention.output.dense",
  "attention_norm": "attention.output.LayerNorm",
  "mlp_in": "intermediate.dense",
  "mlp_out": "output.dense",
  "mlp_norm": "output.LayerNorm",
}
_EMBEDDINGS = {
  "word_embeddings": "embeddings.word_embeddings.weight",
  "position_embeddings": "embeddings.position_embeddings.weight",
  "token_type_embeddings": "embeddings.token_type_embeddings.weight",
}
# Checkpoint tensors the encoder does not use: the CLS pooler head, index buffers.
_UNUSED = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")


def _expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name (without a "bert." prefix) the encoder reads, with its shape."""
  h, f = config.hidden_size, config.intermediate_size
  shapes = {
    _EMBEDDINGS["word_embeddings"]: (config.vocab_size, h),
    _EMBEDDINGS["position_embeddings"]: (config.max_position_embeddings, h),
    _EMBEDDINGS["token_type_embeddings"]: (config.type_vocab_size, h),
    "embeddings.LayerNorm.weight": (h,),
    "embeddings.LayerNorm.bias": (h,),
  }
  out_features = {"mlp_in": f}
  in_features = {"mlp_out": f}
  for i in range(config.num_layers):
    for ours, hf in _LAYER_MODULES.items():
      name = f"encoder.layer.{i}.{hf}"
      if ours.endswith("norm"):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (h,)
      else:  # torch nn.Linear: weight (out, in)
        out = out_features.get(ours, h)
        shapes[f"{name}.weight"] = (out, in_features.get(ours, h))
        shapes[f"{name}.bias"] = (out,)
  return shapes


def _read_tensors(file: Path, config: BertConfig) -> dict[str, np.ndarray]:
  """The tensors the encoder needs, by unprefixed HF name, shape-checked."""
  if not file.is_file():
    raise FileNotFoundError(f"{file} does not exist")
  expected = _expected_shapes(config)
  with safetensors.safe_open(str(file), framework="numpy") as f:
    names = set(f.keys())
    # Task models (BertForMaskedLM, ...) prefix the encoder with "bert." and add heads.
    prefix = "bert." if f"bert.{_EMBEDDINGS['word_embeddings']}" in names else ""
    ours = {n[len(prefix) :] for n in names if n.startswith(prefix)}
    missing = sorted(set(expected) - ours)
    unexpected = sorted(n for n in ours - set(expected) if not n.startswith(_UNUSED))
    if missing or unexpected:
      raise ValueError(
        f"{file} does not match the BERT config ({config.num_layers} layers): missing "
        f"tensors {[prefix + n for n in missing]}, unexpected {[prefix + n for n in unexpected]}"
      )
    tensors = {}
    for name, shape in expected.items():
      tensor = f.get_tensor(prefix + name)
      if tuple(tensor.shape) != shape:
        raise ValueError(
          f"tensor {prefix + name!r} in {file} has shape {tuple(tensor.shape)}, expected {shape}"
        )
      tensors[name] = tensor.astype(np.float32)
  return tensors


def load_bert_params(file: str | os.PathLike, config: BertConfig) -> Params:
  """Reads a BERT safetensors file into our parameter tree (float32).

  Linear kernels are stored (in, out), transposed from torch; each per-layer leaf is
  stacked over layers (leading axis num_layers) for `lax.scan`.

  Raises:
    FileNotFoundError: `file` does not exist.
    ValueError: Missing or unexpected tensors (listed), or a shape mismatch (named).
  """
  t = _read_tensors(Path(file), config)
  params: Params = {ours: jnp.asarray(t[hf]) for ours, hf in _EMBEDDINGS.items()}
  params["embedding_norm"] = {
    "scale": jnp.asarray(t["embeddings.LayerNorm.weight"]),
    "bias": jnp.asarray(t["embeddings.LayerNorm.bias"]),
  }
  layers: Params = {}
  for ours, hf in _LAYER_MODULES.items():
    names = [f"encoder.layer.{i}.{hf}" for i in range(config.num_layers)]
    first = "scale" if ours.endswith("norm") else "kernel"
    weights = [t[f"{n}.weight"] if first == "scale" else t[f"{n}.weight"].T for n in names]
    layers[ours] = {
      first: jnp.asarray(np.stack(weights)),
      "bias": jnp.asarray(np.stack([t[f"{n}.bias"] for n in names])),
    }
  params["layers"] = layers
  return params


def _layer_norm(x: jax.Array, p: Params, eps: float) -> jax.Array:
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _linear(x: jax.Array, p: Params) -> jax.Array:
  return x @ p["kernel"] + p["bias"]


def _block(x: jax.Array, layer: Params, mask_bias: jax.Array, config: BertConfig) -> jax.Array:
  """One post-LN encoder block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""
  batch, seq, _ = x.shape
  q, k, v = (
    _linear(x, layer[n]).reshape(batch, seq, config.num_heads, config.head_dim)
    for n in ("query", "key", "value")
  )
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(config.head_dim)
  probs = jax.nn.softmax(scores + mask_bias[:, None, None, :], axis=-1)
  context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
  eps = config.layer_norm_eps
  x = _layer_norm(x + _linear(context, layer["attention_out"]), layer["attention_norm"], eps)
  hidden = activation_fn(config.hidden_act)(_linear(x, layer["mlp_in"]))
  return _layer_norm(x + _linear(hidden, layer["mlp_out"]), layer["mlp_norm"], eps)


def bert_hidden_states(
  params: Params,
  config: BertConfig,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  token_type_ids: jax.Array | None = None,
) -> jax.Array:
  """The last layer's hidden states [batch, seq, hidden] (HF `last_hidden_state`).

  Args:
    params: From `load_bert_params`.
    config: The model's config.
    input_ids: [batch, seq] token ids; seq <= max_position_embeddings.
    attention_mask: [batch, seq], 1 for real tokens, 0 for padding (keys only).
    token_type_ids: [batch, seq] segment ids, default all 0.
  """
  seq = input_ids.shape[1]
  token_types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
  x = (
    params["word_embeddings"][input_ids]
    + params["position_embeddings"][:seq][None]
    + params["token_type_embeddings"][token_types]
  )
  x = _layer_norm(x, params["embedding_norm"], config.layer_norm_eps)
  mask_bias = jnp.where(attention_mask.astype(bool), 0.0, jnp.finfo(x.dtype).min)
  body = lambda h, layer: (_block(h, layer, mask_bias, config), None)
  x, _ = jax.lax.scan(body, x, params["layers"])
  return x


@functools.partial(jax.jit, static_argnames=("config", "normalize"))
def sentence_embeddings(
  params: Params, config: BertConfig, input_ids: jax.Array, attention_mask: jax.Array, normalize
) -> jax.Array:
  """Mean of the hidden states over real tokens [batch, hidden], L2-normalised if asked.

  sentence-transformers' Pooling(mean) and Normalize, with their epsilons.
  """
  hidden = bert_hidden_states(params, config, input_ids, attention_mask)
  mask = attention_mask.astype(hidden.dtype)[..., None]
  pooled = (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
  if normalize:
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled


@dataclasses.dataclass(frozen=True)
class SentenceEncoder:
  """A loaded sentence encoder: weights, tokenizer and the pooling pipeline.

  Attributes:
    config: The BERT architecture.
    params: Its weights (`load_bert_params`).
    tokenizer: The folder's transformers tokenizer.
    max_seq_length: Texts are truncated to this many tokens ([CLS] and [SEP] included).
    normalize: Whether embeddings are L2-normalised (modules.json lists Normalize).
    pad_multiple: Batches are padded to a multiple of this length, so only
      max_seq_length / pad_multiple shapes ever compile.
  """

  config: BertConfig
  params: Params = dataclasses.field(repr=False)
  tokenizer: Any = dataclasses.field(repr=False)
  max_seq_length: int
  normalize: bool
  pad_multiple: int = 32

  @property
  def dimension(self) -> int:
    return self.config.hidden_size

  def _pad(self, rows: list[list[int]], batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists into [batch_rows, length] ids and mask (extra rows: padding)."""
    longest = max(len(r) for r in rows)
    length = min(-(-longest // self.pad_multiple) * self.pad_multiple, self.max_seq_length)
    ids = np.full((batch_rows, length), self.tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((batch_rows, length), np.int32)
    for i, row in enumerate(rows):
      ids[i, : len(row)] = row
      mask[i, : len(row)] = 1
    return ids, mask

  def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Embeds `texts` (empty strings allowed): float32 [len(texts), hidden].

    Texts are sorted by token count so each batch pads little; the batch dimension is
    padded to a power of two (at most `batch_size`) to bound recompilation.
    """
    texts = [str(t).strip() for t in texts]  # sentence-transformers strips too
    out = np.zeros((len(texts), self.dimension), np.float32)
    if not texts:
      return out
    encoded = self.tokenizer(texts, truncation=True, max_length=self.max_seq_length)
    tokens = encoded["input_ids"]
    order = np.argsort([-len(t) for t in tokens], kind="stable")
    for start in range(0, len(texts), batch_size):
      chunk = order[start : start + batch_size]
      batch_rows = min(batch_size, 1 << (len(chunk) - 1).bit_length())
      ids, mask = self._pad([tokens[i] for i in chunk], batch_rows)
      embedded = sentence_embeddings(self.params, self.config, ids, mask, self.normalize)
      out[chunk] = np.asarray(embedded)[: len(chunk)]
    return out


def _pipeline(folder: Path) -> tuple[Path, bool]:
  """(folder of the BERT model, whether to normalise) from modules.json, if any.

  Raises:
    NotImplementedError: A module other than Transformer, mean Pooling or Normalize.
  """
  modules_file = folder / "modules.json"
  if not modules_file.is_file():
    return folder, False
  modules = _read_json(modules_file)
  types = [m["type"] for m in modules]
  if types[:1] != [_TRANSFORMER] or not set(types[1:]) <= {_POOLING, _NORMALIZE}:
    raise NotImplementedError(
      f"{modules_file}: pipeline {types} is not Transformer -> Pooling [-> Normalize]"
    )
  for module in modules[1:]:
    if module["type"] == _POOLING:
      pooling_file = folder / module["path"] / "config.json"
      modes = {k: v for k, v in _read_json(pooling_file).items() if k.startswith("pooling_mode")}
      if {k for k, v in modes.items() if v} != {"pooling_mode_mean_tokens"}:
        raise NotImplementedError(f"{pooling_file}: only mean pooling is implemented: {modes}")
  return folder / modules[0]["path"], _NORMALIZE in types


def load_sentence_encoder(path: str | os.PathLike, pad_multiple: int = 32) -> SentenceEncoder:
  """Loads a sentence-transformers (or plain HF BERT) folder into a `SentenceEncoder`.

  Raises:
    FileNotFoundError: `path` is not a folder, or lacks config.json / model.safetensors
      (the message names the missing file).
    ValueError: Wrong tensors in the checkpoint (named) or a config field missing.
    NotImplementedError: A pipeline other than Transformer -> Pooling(mean) [-> Normalize].
  """
  folder = Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder} is not a folder (expected a sentence-transformers model)")
  model_dir, normalize = _pipeline(folder)
  config = BertConfig.from_json(model_dir / "config.json")
  params = load_bert_params(model_dir / WEIGHTS_NAME, config)
  import transformers  # deferred: heavy, and only needed here

  tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
  st_config = model_dir / "sentence_bert_config.json"
  limit = _read_json(st_config).get("max_seq_length") if st_config.is_file() else None
  limit = min(limit or tokenizer.model_max_length, config.max_position_embeddings)
  return SentenceEncoder(config, params, tokenizer, int(limit), normalize, pad_multiple)


def cosine_similarity_scores(
  encoder: SentenceEncoder, generations: Sequence[str], answers: Sequence[str], batch_size: int = 32
) -> np.ndarray:
  """max(0, cos(embed(generation_i), embed(answer_i))) for each pair: float32 [n] in [0, 1].

  The cosine of the two sentence embeddings (normalised here, whatever the encoder's
  pipeline), clipped at 0 as in DualOptim+'s "cosine similarity" metric; rounding above 1
  is clipped too.
  """
  generations, answers = list(generations), list(answers)
  if len(generations) != len(answers):
    raise ValueError(f"{len(generations)} generations but {len(answers)} answers")
  embedded = encoder.encode(generations + answers, batch_size=batch_size)
  norms = np.maximum(np.linalg.norm(embedded, axis=-1), 1e-12)
  unit = embedded / norms[:, None]
  n = len(generations)
  return np.clip((unit[:n] * unit[n:]).sum(-1), 0.0, 1.0).astype(np.float32)
