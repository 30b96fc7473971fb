"""GGUF checkpoints (llama.cpp's single-file format) seen as Hugging Face checkpoints.

A GGUF file holds metadata (architecture hyperparameters, tokenizer) and tensors
under llama.cpp's names, possibly block-quantized. `GGUFCheckpoint` turns both
into what a Hugging Face folder would hold: a transformers *config* object and
float32 tensors under HF names, in HF (PyTorch) layout, read one at a time.
`models.checkpoint.load_pretrained` fills a `CausalLM` from either source
through the same name mapping and shape checks.

Conventions undone here (llama.cpp's `convert_hf_to_gguf.py` applies them):
  * Dimension order: GGUF lists a tensor's dimensions fastest-first (ggml's
    `ne`), so an HF `nn.Linear` weight (out, in) is listed as [in, out]; the
    data is row-major in HF order, so reversing the listed dims gives HF's shape.
  * Llama's q/k projection rows are permuted per head from HF's "rotate half"
    rotary layout to llama.cpp's interleaved pairs; we permute them back.
  * GPT-2's `Conv1D` weights (in, out) are stored transposed, as (out, in).
  * Old Phi-2 conversions fuse q, k and v into one `attn_qkv` tensor; we split it.
  * A file without `output.weight` ties the LM head to the token embedding.

Supported `general.architecture`s: llama, gpt2, phi2. Tensor types: whatever
`gguf.quants.dequantize` handles (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
the K-quants, ...); anything else is refused, naming the tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

GGUF_MAGIC = b"GGUF"

# GGUF `general.architecture` -> HF `model_type`.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "gpt2": "gpt2", "phi2": "phi"}

# llama.cpp tensor name -> HF module name, per architecture: global tensors,
# then per-block tensors ("blk.N.<key>" -> "<block prefix>.N.<value>").
_GLOBAL_NAMES = {
  "llama": {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
  "gpt2": {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
  },
  "phi2": {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.final_layernorm",
    "output": "lm_head",
  },
}
_BLOCK_PREFIX = {"llama": "model.layers", "gpt2": "transformer.h", "phi2": "model.layers"}
_BLOCK_NAMES = {
  "llama": {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
  },
  "gpt2": {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
  },
  "phi2": {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.dense",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
  },
}
# GPT-2 weights that HF keeps as Conv1D (in, out) and llama.cpp transposes.
_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
_PHI2_FUSED_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_TENSOR_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")


@dataclasses.dataclass(frozen=True)
class TensorConversion:
  """How one HF tensor is read out of one GGUF tensor.

  Applied in field order: take rows, un-permute rotary rows, transpose.

  Attributes:
    gguf_name: The GGUF tensor it comes from.
    hf_shape: Its shape in HF layout.
    rows: (start, stop) of the GGUF tensor's rows (HF order) it is, or None
      for all of them (Phi-2's fused q/k/v).
    rotary_heads: Llama q/k: the number of heads whose rows llama.cpp
      permuted, else None.
    transpose: Whether HF stores the transpose (GPT-2's Conv1D).
  """

  gguf_name: str
  hf_shape: tuple[int, ...]
  rows: tuple[int, int] | None = None
  rotary_heads: int | None = None
  transpose: bool = False


def is_gguf_file(path: str | Path) -> bool:
  """Whether `path` is a file starting with the GGUF magic bytes."""
  path = Path(path)
  if not path.is_file():
    return False
  with path.open("rb") as f:
    return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def find_gguf_file(path: str | Path) -> Path | None:
  """The GGUF file `path` designates, or None for a Hugging Face folder.

  Args:
    path: A file (it must then be a GGUF file), or a folder. A folder
      designates its GGUF file if it holds exactly one `*.gguf` and no
      config.json / safetensors.

  Returns:
    The GGUF file, or None if `path` is a folder of another kind (or absent).

  Raises:
    ValueError: `path` is a file that is not GGUF, or a folder with several
      `*.gguf` files and no config.json to prefer.
  """
  path = Path(path)
  if path.is_file():
    if not is_gguf_file(path):
      with path.open("rb") as f:
        head = f.read(len(GGUF_MAGIC))
      raise ValueError(
        f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); "
        "pass a .gguf file or a Hugging Face checkpoint folder."
      )
    return path
  if not path.is_dir() or (path / "config.json").exists() or any(path.glob("*.safetensors")):
    return None
  candidates = sorted(path.glob("*.gguf"))
  if len(candidates) > 1:
    raise ValueError(
      f"{path} holds several GGUF files {[c.name for c in candidates]}; pass one of them."
    )
  return candidates[0] if candidates else None


@functools.cache
def can_dequantize(tensor_type: gguf.GGMLQuantizationType) -> bool:
  """Whether `gguf.quants.dequantize` implements `tensor_type` (tried on one zero block)."""
  if tensor_type not in gguf.GGML_QUANT_SIZES:
    return False
  _, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]
  try:
    gguf.quants.dequantize(np.zeros(block_bytes, np.uint8), tensor_type)
  except NotImplementedError:
    return False
  return True


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's per-head permutation of Llama q/k rows.

  Per head, HF's rows are [first halves of the rotated pairs; second halves];
  llama.cpp interleaves them (row 2i is HF row i, row 2i + 1 is HF row
  half + i) for ggml's rotary kernel. Works for weights (rows, in) and biases.
  """
  half = weight.shape[0] // num_heads // 2
  pairs = weight.reshape(num_heads, half, 2, *weight.shape[1:])
  return pairs.swapaxes(1, 2).reshape(weight.shape)


class GGUFCheckpoint:
  """A GGUF file as a Hugging Face checkpoint: an HF config and HF-named tensors.

  The file is memory-mapped; a tensor is dequantized only when `read` asks for
  it, so loading holds at most one dequantized tensor besides the model.

  Attributes:
    path: The GGUF file.
    architecture: Its `general.architecture` (e.g. "llama").
    hf_config: The equivalent transformers config (`LlamaConfig`,
      `GPT2Config` or `PhiConfig`).
  """

  def __init__(self, path: str | Path):
    """Opens `path` and checks architecture and tensor types.

    Raises:
      FileNotFoundError: `path` is not a file.
      ValueError: Not a GGUF file; unsupported architecture (naming the
        supported ones); tensors of a type `gguf.quants.dequantize` lacks
        (naming tensors and types).
    """
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(f"No GGUF file at {self.path}.")
    find_gguf_file(self.path)  # refuses non-GGUF files with a clear message
    self._reader = gguf.GGUFReader(str(self.path))
    self._tensors = {t.name: t for t in self._reader.tensors}
    self.architecture = self.value("general.architecture")
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(
        f"Unsupported GGUF architecture {self.architecture!r} in {self.path}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
      )
    self._check_tensor_types()
    self.hf_config = _CONFIG_BUILDERS[self.architecture](self)
    self._conversions = self._plan_conversions()
    self._cached: tuple[str, np.ndarray] | None = None
    self._gguf_names: dict[str, str] | None = None

  def value(self, key: str, default: Any = dataclasses.MISSING) -> Any:
    """A metadata value (int, float, str, bool or list); `default` if absent."""
    field = self._reader.fields.get(key)
    if field is None:
      if default is dataclasses.MISSING:
        raise ValueError(f"GGUF file {self.path} lacks the metadata key {key!r}.")
      return default
    return field.contents()

  def arch_value(self, key: str, default: Any = dataclasses.MISSING) -> Any:
    """A metadata value under the architecture's prefix, e.g. "llama.block_count"."""
    return self.value(f"{self.architecture}.{key}", default)

  def has_tensor(self, gguf_name: str) -> bool:
    return gguf_name in self._tensors

  def gguf_shape(self, gguf_name: str) -> tuple[int, ...]:
    """A GGUF tensor's shape in HF (row-major) order: its listed dims reversed."""
    return tuple(int(d) for d in reversed(self._tensors[gguf_name].shape))

  def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape, for every tensor the file provides.

    GGUF tensors with no HF counterpart appear under their GGUF name, so a
    caller comparing names reports them as unexpected.
    """
    return {name: c.hf_shape for name, c in self._conversions.items()}

  def read(self, hf_name: str) -> np.ndarray:
    """The HF tensor `hf_name` as float32 in HF layout (dequantized)."""
    conversion = self._conversions[hf_name]
    value = self._dequantized(conversion.gguf_name)
    if conversion.rows is not None:
      value = value[conversion.rows[0] : conversion.rows[1]]
    if conversion.rotary_heads is not None:
      value = unpermute_rotary_rows(value, conversion.rotary_heads)
    if conversion.transpose:
      value = value.T
    return value

  def gguf_name(self, hf_name: str) -> str | None:
    """The GGUF tensor an HF tensor comes (or would come) from, if any."""
    if hf_name in self._conversions:
      return self._conversions[hf_name].gguf_name
    if self._gguf_names is None:  # llama.cpp's usual names (Phi-2: separate q, k, v)
      layers = int(self.arch_value("block_count"))
      candidates = [*_GLOBAL_NAMES[self.architecture]]
      candidates += [
        f"blk.{i}.{kind}" for i in range(layers) for kind in _BLOCK_NAMES[self.architecture]
      ]
      names = [f"{c}.{leaf}" for c in candidates for leaf in ("weight", "bias")]
      by_gguf_name = _hf_names(self.architecture, names)
      self._gguf_names = {hf: g for g, hf_names in by_gguf_name.items() for hf in hf_names}
    return self._gguf_names.get(hf_name)

  def label(self, hf_name: str) -> str:
    """The tensor's name for error messages: "<gguf name> (<hf name>)" where known."""
    gguf_name = self.gguf_name(hf_name)
    return hf_name if gguf_name is None or gguf_name == hf_name else f"{gguf_name} ({hf_name})"

  def close(self) -> None:
    """Drops the cached dequantized tensor (the file stays memory-mapped until freed)."""
    self._cached = None

  def _dequantized(self, gguf_name: str) -> np.ndarray:
    """Dequantizes one GGUF tensor to float32 (the last one is kept for fused splits)."""
    if self._cached is None or self._cached[0] != gguf_name:
      self._cached = None  # let the previous tensor go first
      tensor = self._tensors[gguf_name]
      values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
      values = np.asarray(values, np.float32).reshape(self.gguf_shape(gguf_name))
      self._cached = (gguf_name, values)
    return self._cached[1]

  def _check_tensor_types(self) -> None:
    unsupported = [
      f"{t.name} ({t.tensor_type.name})"
      for t in self._reader.tensors
      if not can_dequantize(t.tensor_type)
    ]
    if unsupported:
      raise ValueError(
        f"GGUF file {self.path} has tensors of types gguf.quants.dequantize does not "
        f"support: {', '.join(unsupported)}."
      )

  def _plan_conversions(self) -> dict[str, TensorConversion]:
    """HF name -> how to read it, for every tensor in the file."""
    plan: dict[str, TensorConversion] = {}
    for gguf_name in self._tensors:
      for hf_name, conversion in self._convert(gguf_name).items():
        if hf_name in plan:
          raise ValueError(
            f"GGUF file {self.path}: tensors {plan[hf_name].gguf_name!r} and {gguf_name!r} "
            f"both provide {hf_name!r}."
          )
        plan[hf_name] = conversion
    return plan

  def _convert(self, gguf_name: str) -> dict[str, TensorConversion]:
    """The HF tensor(s) one GGUF tensor provides (itself, by GGUF name, if unknown)."""
    shape = self.gguf_shape(gguf_name)
    hf_names = _hf_names(self.architecture, [gguf_name]).get(gguf_name)
    if hf_names is None:
      return {gguf_name: TensorConversion(gguf_name, shape)}
    kind = _TENSOR_NAME.fullmatch(gguf_name).group(2)
    if len(hf_names) == 3:  # Phi-2's fused q/k/v: split its rows
      q_rows = self.hf_config.num_attention_heads * self._head_dim()
      kv_rows = (shape[0] - q_rows) // 2
      bounds = (0, q_rows, q_rows + kv_rows, shape[0])
      return {
        name: TensorConversion(
          gguf_name, (bounds[i + 1] - bounds[i], *shape[1:]), bounds[i : i + 2]
        )
        for i, name in enumerate(hf_names)
      }
    conversion = TensorConversion(gguf_name, shape)
    if self.architecture == "llama" and kind in ("attn_q", "attn_k"):
      heads = self.hf_config.num_attention_heads
      if kind == "attn_k":
        heads = self.hf_config.num_key_value_heads
      conversion = dataclasses.replace(conversion, rotary_heads=heads)
    if self.architecture == "gpt2" and kind in _GPT2_CONV1D and len(shape) == 2:
      conversion = dataclasses.replace(conversion, hf_shape=shape[::-1], transpose=True)
    return {hf_names[0]: conversion}

  def _head_dim(self) -> int:
    c = self.hf_config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _hf_names(architecture: str, gguf_names: list[str]) -> dict[str, tuple[str, ...]]:
  """GGUF tensor name -> the HF tensor name(s) it provides (unknown names left out)."""
  result = {}
  for gguf_name in gguf_names:
    match = _TENSOR_NAME.fullmatch(gguf_name)
    if match is None:
      continue
    layer, kind, leaf = match.groups()
    if layer is None:
      module = _GLOBAL_NAMES[architecture].get(kind)
      if module is not None:
        result[gguf_name] = (f"{module}.{leaf}",)
      continue
    prefix = f"{_BLOCK_PREFIX[architecture]}.{layer}"
    if architecture == "phi2" and kind == "attn_qkv":
      result[gguf_name] = tuple(f"{prefix}.{part}.{leaf}" for part in _PHI2_FUSED_PARTS)
    elif kind in _BLOCK_NAMES[architecture]:
      result[gguf_name] = (f"{prefix}.{_BLOCK_NAMES[architecture][kind]}.{leaf}",)
  return result


def _token_ids(checkpoint: GGUFCheckpoint) -> dict[str, int | None]:
  """bos/eos/pad ids from the tokenizer metadata (None where the file has none)."""
  keys = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}
  return {
    field: checkpoint.value(f"tokenizer.ggml.{key}_token_id", None) for field, key in keys.items()
  }


def _vocab_size(checkpoint: GGUFCheckpoint) -> int:
  """`<arch>.vocab_size` if stated, else the token embedding's row count."""
  stated = checkpoint.arch_value("vocab_size", None)
  return int(stated) if stated is not None else checkpoint.gguf_shape("token_embd.weight")[0]


def _rope_theta(checkpoint: GGUFCheckpoint) -> float:
  """`<arch>.rope.freq_base` (default 10000); RoPE scaling is refused."""
  scaling = checkpoint.arch_value("rope.scaling.type", "none")
  if scaling != "none":
    raise NotImplementedError(
      f"GGUF file {checkpoint.path} uses RoPE scaling {scaling!r}; only unscaled rotary "
      "embeddings are supported."
    )
  return float(checkpoint.arch_value("rope.freq_base", 10000.0))


def _llama_config(checkpoint: GGUFCheckpoint) -> Any:
  import transformers  # deferred: heavy; config classes only, no model code

  c = checkpoint
  heads = int(c.arch_value("attention.head_count"))
  hidden = int(c.arch_value("embedding_length"))
  rotary_dim = c.arch_value("rope.dimension_count", None)
  head_dim = int(c.arch_value("attention.key_length", None) or rotary_dim or hidden // heads)
  if rotary_dim is not None and int(rotary_dim) != head_dim:
    raise NotImplementedError(
      f"GGUF file {c.path} rotates {rotary_dim} of {head_dim} head dimensions; "
      "partial rotary embeddings are not supported for llama."
    )
  return transformers.LlamaConfig(
    architectures=["LlamaForCausalLM"],
    vocab_size=_vocab_size(c),
    hidden_size=hidden,
    intermediate_size=int(c.arch_value("feed_forward_length")),
    num_hidden_layers=int(c.arch_value("block_count")),
    num_attention_heads=heads,
    num_key_value_heads=int(c.arch_value("attention.head_count_kv", heads)),
    head_dim=head_dim,
    max_position_embeddings=int(c.arch_value("context_length")),
    rms_norm_eps=float(c.arch_value("attention.layer_norm_rms_epsilon")),
    rope_parameters={"rope_type": "default", "rope_theta": _rope_theta(c)},
    attention_bias=c.has_tensor("blk.0.attn_q.bias"),
    mlp_bias=c.has_tensor("blk.0.ffn_up.bias"),
    tie_word_embeddings=not c.has_tensor("output.weight"),
    **_token_ids(c),
  )


def _gpt2_config(checkpoint: GGUFCheckpoint) -> Any:
  import transformers

  c = checkpoint
  hidden = int(c.arch_value("embedding_length"))
  inner = int(c.arch_value("feed_forward_length", 4 * hidden))
  return transformers.GPT2Config(
    architectures=["GPT2LMHeadModel"],
    vocab_size=_vocab_size(c),
    n_positions=int(c.arch_value("context_length")),
    n_embd=hidden,
    n_layer=int(c.arch_value("block_count")),
    n_head=int(c.arch_value("attention.head_count")),
    n_inner=None if inner == 4 * hidden else inner,
    layer_norm_epsilon=float(c.arch_value("attention.layer_norm_epsilon")),
    tie_word_embeddings=not c.has_tensor("output.weight"),
    **_token_ids(c),
  )


def _phi2_config(checkpoint: GGUFCheckpoint) -> Any:
  import transformers

  c = checkpoint
  heads = int(c.arch_value("attention.head_count"))
  hidden = int(c.arch_value("embedding_length"))
  head_dim = hidden // heads
  rotary_dim = int(c.arch_value("rope.dimension_count", head_dim))
  return transformers.PhiConfig(
    architectures=["PhiForCausalLM"],
    vocab_size=_vocab_size(c),
    hidden_size=hidden,
    intermediate_size=int(c.arch_value("feed_forward_length")),
    num_hidden_layers=int(c.arch_value("block_count")),
    num_attention_heads=heads,
    num_key_value_heads=int(c.arch_value("attention.head_count_kv", heads)),
    max_position_embeddings=int(c.arch_value("context_length")),
    layer_norm_eps=float(c.arch_value("attention.layer_norm_epsilon")),
    rope_parameters={
      "rope_type": "default",
      "rope_theta": _rope_theta(c),
      "partial_rotary_factor": rotary_dim / head_dim,
    },
    tie_word_embeddings=not c.has_tensor("output.weight"),
    **_token_ids(c),
  )


_CONFIG_BUILDERS = {"llama": _llama_config, "gpt2": _gpt2_config, "phi2": _phi2_config}
