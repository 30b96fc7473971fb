"""Hugging Face checkpoint I/O: config.json + (sharded) safetensors <-> `CausalLM`.

Loading also reads GGUF files (`models/gguf.py` presents them as HF-named
tensors); both formats fill the model through `fill_parameters`. Saving always
writes Hugging Face safetensors.

Each of our parameters corresponds to one HF tensor, or to a slice along the
last axis of one (GPT-2's fused `c_attn`). `_hf_spec` states that
correspondence per family; load and save are its two directions.
PyTorch `nn.Linear` stores weights (out, in) and is transposed; GPT-2's
`Conv1D` already stores (in, out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax
from flax import nnx

from models import gguf as gguf_checkpoint
from models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from models.layers import Dense
from models.transformer import CausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Tensors HF checkpoints may contain that are buffers, not parameters.
_IGNORED = (re.compile(r"rotary_emb\.inv_freq$"), re.compile(r"\.attn\.(masked_)?bias$"))

# Our module path -> HF module name, per family (within a layer, then global).
_LAYER_MODULES = {
  "phi": {
    "attn_norm": "input_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.dense",
    "attn.q_norm": "self_attn.q_layernorm",
    "attn.k_norm": "self_attn.k_layernorm",
    "mlp.up_proj": "mlp.fc1",
    "mlp.down_proj": "mlp.fc2",
  },
  "llama": {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
  },
  "gpt2": {
    "attn_norm": "ln_1",
    "mlp_norm": "ln_2",
    "attn.q_proj": "attn.c_attn",
    "attn.k_proj": "attn.c_attn",
    "attn.v_proj": "attn.c_attn",
    "attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
  },
}
_LAYER_PREFIX = {"phi": "model.layers", "llama": "model.layers", "gpt2": "transformer.h"}
_GLOBAL_MODULES = {
  "phi": {"embed": "model.embed_tokens", "final_norm": "model.final_layernorm"},
  "llama": {"embed": "model.embed_tokens", "final_norm": "model.norm"},
  "gpt2": {
    "embed": "transformer.wte",
    "pos_embed": "transformer.wpe",
    "final_norm": "transformer.ln_f",
  },
}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """Where one of our parameters lives in an HF checkpoint.

  Attributes:
    path: Our parameter path, e.g. "layers.0.attn.q_proj.kernel".
    hf_name: HF tensor name, e.g. "model.layers.0.self_attn.q_proj.weight".
    transpose: Whether the HF tensor is the transpose of ours.
    fused_part: (index, count) if ours is slice `index` of `count` equal
      slices along the HF tensor's last axis, else None.
  """

  path: str
  hf_name: str
  transpose: bool = False
  fused_part: tuple[int, int] | None = None


def _hf_spec(config: ModelConfig, path: str) -> TensorSpec:
  """Maps one of our parameter paths to its HF tensor."""
  family = config.model_type
  if path == "lm_head_bias":
    return TensorSpec(path, "lm_head.bias")
  module, leaf = path.rsplit(".", 1)
  hf_leaf = _LEAF_NAMES[leaf]
  if module == "lm_head":
    return TensorSpec(path, f"lm_head.{hf_leaf}", transpose=leaf == "kernel")
  match = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
  if match:
    layer, local = match.groups()
    hf_module = f"{_LAYER_PREFIX[family]}.{layer}.{_LAYER_MODULES[family][local]}"
    fused = None
    if family == "gpt2" and hf_module.endswith("c_attn"):
      fused = ({"attn.q_proj": 0, "attn.k_proj": 1, "attn.v_proj": 2}[local], 3)
    # Every projection kernel is an nn.Linear except in GPT-2 (Conv1D).
    transpose = leaf == "kernel" and family != "gpt2"
    return TensorSpec(path, f"{hf_module}.{hf_leaf}", transpose, fused)
  return TensorSpec(path, f"{_GLOBAL_MODULES[family][module]}.{hf_leaf}")


def _param_variables(model: CausalLM) -> dict[str, nnx.Variable]:
  """Our base parameters by dotted path (LoRA adapters excluded)."""
  return {
    ".".join(map(str, path)): node
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Param) and "lora" not in path
  }


def _hf_shape(specs: list[TensorSpec], shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
  """The HF tensor shape implied by the parameters that map to it."""
  first = shapes[specs[0].path]
  if specs[0].transpose:
    first = first[::-1]
  if specs[0].fused_part is None:
    return tuple(first)
  return (*first[:-1], sum(shapes[s.path][-1] for s in specs))


def _read_config(path: Path) -> Any:
  """Reads config.json through `transformers.AutoConfig`, checking the type."""
  config_file = path / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"No config.json in {path} (looked for {config_file}).")
  model_type = json.loads(config_file.read_text()).get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
      f"Unsupported model_type {model_type!r} in {config_file}; supported "
      f"model types are {', '.join(SUPPORTED_MODEL_TYPES)}."
    )
  import transformers  # deferred: heavy, and only needed for I/O

  return transformers.AutoConfig.from_pretrained(str(path))


def _weight_files(path: Path) -> dict[str, Path]:
  """HF tensor name -> the safetensors file holding it."""
  index_file, single_file = path / INDEX_NAME, path / WEIGHTS_NAME
  if index_file.is_file():
    weight_map = json.loads(index_file.read_text())["weight_map"]
    files = {name: path / fname for name, fname in weight_map.items()}
    for f in set(files.values()):
      if not f.is_file():
        raise FileNotFoundError(f"Shard {f} listed in {index_file} does not exist.")
    return files
  if single_file.is_file():
    with safetensors.safe_open(str(single_file), framework="flax") as f:
      return {name: single_file for name in f.keys()}
  raise FileNotFoundError(f"No weights in {path}: expected {single_file} or {index_file}.")


class TensorSource(Protocol):
  """HF-named tensors in HF layout, from some checkpoint format.

  Implemented by `_SafetensorsSource` and `models.gguf.GGUFCheckpoint`.
  """

  def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape (without reading the data)."""
    ...

  def read(self, name: str) -> Any:
    """One tensor's values (an array in HF layout)."""
    ...

  def label(self, name: str) -> str:
    """How to name the tensor in an error message."""
    ...


class _SafetensorsSource:
  """The tensors of a (possibly sharded) safetensors folder; files opened on first use."""

  def __init__(self, files: dict[str, Path]):
    self._files = files
    self._handles: dict[Path, Any] = {}

  def _handle(self, name: str) -> Any:
    file = self._files[name]
    if file not in self._handles:
      self._handles[file] = safetensors.safe_open(str(file), framework="flax").__enter__()
    return self._handles[file]

  def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
    return {n: tuple(self._handle(n).get_slice(n).get_shape()) for n in self._files}

  def read(self, name: str) -> Any:
    return self._handle(name).get_tensor(name)

  def label(self, name: str) -> str:
    return name

  def close(self) -> None:
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()


def _check_tensor_names(
  config: ModelConfig, expected: set[str], shapes: dict[str, Any], source: TensorSource, where: Any
) -> None:
  """Raises if the checkpoint lacks tensors the model needs or has others."""
  ignored = {n for n in shapes if any(r.search(n) for r in _IGNORED)}
  if config.tie_word_embeddings:
    ignored.add("lm_head.weight")  # some tied checkpoints store it anyway
  missing = sorted(expected - set(shapes))
  unexpected = sorted(set(shapes) - expected - ignored)
  if missing or unexpected:
    raise ValueError(
      f"Checkpoint {where} does not match the {config.model_type} model: "
      f"missing tensors {[source.label(n) for n in missing]}, "
      f"unexpected tensors {[source.label(n) for n in unexpected]}."
    )


def fill_parameters(model: CausalLM, config: ModelConfig, source: TensorSource, where: Any) -> None:
  """Sets every base parameter of `model` from `source`, one HF tensor at a time.

  Args:
    model: The model (e.g. built by `nnx.eval_shape`); filled in place.
    config: Its config (selects the name mapping and the parameter dtype).
    source: The checkpoint's tensors under HF names, in HF layout.
    where: The checkpoint's location, for error messages.

  Raises:
    ValueError: Missing or unexpected tensors (listing them), or a shape
      mismatch (naming the tensor).
  """
  variables = _param_variables(model)
  specs_by_name: dict[str, list[TensorSpec]] = {}
  for p in variables:
    spec = _hf_spec(config, p)
    specs_by_name.setdefault(spec.hf_name, []).append(spec)
  file_shapes = source.tensor_shapes()
  _check_tensor_names(config, set(specs_by_name), file_shapes, source, where)

  shapes = {p: tuple(v.get_value().shape) for p, v in variables.items()}
  for hf_name, specs in specs_by_name.items():
    actual, expected = tuple(file_shapes[hf_name]), _hf_shape(specs, shapes)
    if actual != expected:
      raise ValueError(
        f"Shape mismatch for tensor {source.label(hf_name)!r}: checkpoint has {actual}, "
        f"the model expects {expected}."
      )
    tensor = source.read(hf_name)
    for spec in specs:
      value = tensor
      if spec.fused_part is not None:
        index, count = spec.fused_part
        width = value.shape[-1] // count
        value = value[..., index * width : (index + 1) * width]
      if spec.transpose:
        value = value.T
      variables[spec.path].set_value(jnp.asarray(value, dtype=config.param_dtype))
    del tensor  # one checkpoint tensor alive at a time


def load_pretrained(
  path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = None
) -> tuple[CausalLM, ModelConfig]:
  """Loads an HF causal LM folder or a GGUF file into a `CausalLM`.

  Args:
    path: A folder written by `save_pretrained` (ours or transformers':
      config.json + safetensors); or a GGUF file (llama.cpp's format:
      llama, gpt2 or phi2, dequantized to float32 then cast to
      `param_dtype`); or a folder holding exactly one `*.gguf` and no
      config.json / safetensors. A model loaded from GGUF gets a full HF
      config (`config.hf_config`), so `save_pretrained` writes a folder
      transformers reads.
    dtype: Compute dtype.
    param_dtype: Parameter dtype; defaults to `dtype`.

  Returns:
    (model, config).

  Raises:
    FileNotFoundError: config.json or the weights are missing.
    ValueError: Unsupported model type or GGUF architecture, a GGUF tensor
      type that cannot be dequantized, a file that is not GGUF, a shape
      mismatch (naming the tensor), or missing / unexpected tensors (listing
      them).
  """
  path = Path(path)
  gguf_file = gguf_checkpoint.find_gguf_file(path)
  if gguf_file is not None:
    checkpoint = gguf_checkpoint.GGUFCheckpoint(gguf_file)
    hf_config, source = checkpoint.hf_config, checkpoint
  else:
    hf_config = _read_config(path)
    source = _SafetensorsSource(_weight_files(path))
  config = ModelConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
  # Build the module tree without initialising weights, then fill it in.
  model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
  with contextlib.closing(source):
    fill_parameters(model, config, source, gguf_file or path)
  return model, config


def export_tensors(model: CausalLM, config: ModelConfig) -> dict[str, jax.Array]:
  """The model's weights under HF names, LoRA adapters merged in."""
  values = {p: v.get_value() for p, v in _param_variables(model).items()}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Dense) and "lora" not in path:
      values[".".join(map(str, path)) + ".kernel"] = node.effective_kernel()
  grouped: dict[str, list[tuple[TensorSpec, jax.Array]]] = {}
  for p, value in values.items():
    spec = _hf_spec(config, p)
    grouped.setdefault(spec.hf_name, []).append((spec, value))
  tensors = {}
  for hf_name, parts in grouped.items():
    parts.sort(key=lambda sv: sv[0].fused_part or (0, 1))
    arrays = [v.T if s.transpose else v for s, v in parts]
    tensor = arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis=-1)
    # safetensors wants contiguous buffers; the transposes make copies.
    tensors[hf_name] = jnp.asarray(tensor)
  return tensors


def save_pretrained(
  model: CausalLM,
  config: ModelConfig,
  path: str | os.PathLike,
  tokenizer: Any = None,
  max_shard_bytes: int | None = None,
) -> None:
  """Writes an HF-format folder that transformers' `from_pretrained` can read.

  Args:
    model: The model; LoRA adapters, if any, are merged into the weights.
    config: Its config; `config.hf_config` is written as config.json.
    path: Output folder (created if needed).
    tokenizer: Optional HF tokenizer to save alongside.
    max_shard_bytes: If set and the weights are larger, write numbered
      shards plus model.safetensors.index.json.
  """
  if config.hf_config is None:
    raise ValueError("config.hf_config is None; build the config with ModelConfig.from_hf.")
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors = export_tensors(model, config)
  hf_config = dict(config.hf_config)
  hf_config["dtype"] = jnp.dtype(config.param_dtype).name
  (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")

  metadata = {"format": "pt"}  # transformers refuses files without it
  sizes = {n: int(np.prod(t.shape)) * t.dtype.itemsize for n, t in tensors.items()}
  total = sum(sizes.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    (path / INDEX_NAME).unlink(missing_ok=True)
    safetensors.flax.save_file(tensors, str(path / WEIGHTS_NAME), metadata=metadata)
  else:
    shards: list[list[str]] = [[]]
    shard_size = 0
    for name in sorted(tensors):
      if shards[-1] and shard_size + sizes[name] > max_shard_bytes:
        shards.append([])
        shard_size = 0
      shards[-1].append(name)
      shard_size += sizes[name]
    weight_map = {}
    for i, names in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors.flax.save_file(
        {n: tensors[n] for n in names}, str(path / fname), metadata=metadata
      )
      weight_map.update({n: fname for n in names})
    (path / WEIGHTS_NAME).unlink(missing_ok=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  if tokenizer is not None:
    tokenizer.save_pretrained(str(path))


def load_tokenizer(path: str | os.PathLike) -> Any:
  """The tokenizer of a checkpoint, via `transformers.AutoTokenizer`.

  Args:
    path: A folder saved by `save_pretrained` (tokenizer files), or a GGUF
      file / a folder holding one (as for `load_pretrained`): transformers
      then builds the tokenizer from the GGUF metadata (vocabulary, merges,
      special tokens and `tokenizer.chat_template`).
  """
  import transformers

  gguf_file = gguf_checkpoint.find_gguf_file(path)
  if gguf_file is not None:
    return transformers.AutoTokenizer.from_pretrained(
      str(gguf_file.parent), gguf_file=gguf_file.name
    )
  return transformers.AutoTokenizer.from_pretrained(str(path))
