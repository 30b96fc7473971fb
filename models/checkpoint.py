"""Hugging Face checkpoint I/O: config.json + (sharded) safetensors <-> `CausalLM`.

Each of our parameters corresponds to one HF tensor, or to a slice along the
last axis of one (GPT-2's fused `c_attn`). `_hf_spec` states that
correspondence per family; load and save are its two directions.
PyTorch `nn.Linear` stores weights (out, in) and is transposed; GPT-2's
`Conv1D` already stores (in, out).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax
from flax import nnx

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


def load_pretrained(
  path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = None
) -> tuple[CausalLM, ModelConfig]:
  """Loads an HF causal LM folder (config.json + safetensors) into a `CausalLM`.

  Args:
    path: Local folder written by `save_pretrained` (ours or transformers').
    dtype: Compute dtype.
    param_dtype: Parameter dtype; defaults to `dtype`.

  Returns:
    (model, config).

  Raises:
    FileNotFoundError: config.json or the weights are missing.
    ValueError: Unsupported model type, a shape mismatch (naming the tensor),
      or missing / unexpected tensors (listing them).
  """
  path = Path(path)
  config = ModelConfig.from_hf(_read_config(path), dtype=dtype, param_dtype=param_dtype)
  files = _weight_files(path)
  # Build the module tree without initialising weights, then fill it in.
  model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
  variables = _param_variables(model)
  specs_by_name: dict[str, list[TensorSpec]] = {}
  for p in variables:
    spec = _hf_spec(config, p)
    specs_by_name.setdefault(spec.hf_name, []).append(spec)

  ignored = {n for n in files if any(r.search(n) for r in _IGNORED)}
  if config.tie_word_embeddings:
    ignored.add("lm_head.weight")  # some tied checkpoints store it anyway
  missing = sorted(set(specs_by_name) - set(files))
  unexpected = sorted(set(files) - set(specs_by_name) - ignored)
  if missing or unexpected:
    raise ValueError(
      f"Checkpoint {path} does not match the {config.model_type} model: "
      f"missing tensors {missing}, unexpected tensors {unexpected}."
    )

  shapes = {p: tuple(v.get_value().shape) for p, v in variables.items()}
  open_files: dict[Path, Any] = {}
  try:
    for hf_name, specs in specs_by_name.items():
      file = files[hf_name]
      if file not in open_files:
        open_files[file] = safetensors.safe_open(str(file), framework="flax").__enter__()
      handle = open_files[file]
      actual = tuple(handle.get_slice(hf_name).get_shape())
      expected = _hf_shape(specs, shapes)
      if actual != expected:
        raise ValueError(
          f"Shape mismatch for tensor {hf_name!r}: checkpoint has {actual}, "
          f"the model expects {expected}."
        )
      tensor = handle.get_tensor(hf_name)
      for spec in specs:
        value = tensor
        if spec.fused_part is not None:
          index, count = spec.fused_part
          width = value.shape[-1] // count
          value = value[..., index * width : (index + 1) * width]
        if spec.transpose:
          value = value.T
        variables[spec.path].set_value(jnp.asarray(value, dtype=config.param_dtype))
  finally:
    for handle in open_files.values():
      handle.__exit__(None, None, None)
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
  """The tokenizer saved in `path`, via `transformers.AutoTokenizer`."""
  import transformers

  return transformers.AutoTokenizer.from_pretrained(str(path))
