"""Loading GGUF checkpoints: tiny files written here the way llama.cpp converts HF models.

`write_gguf` follows llama.cpp's `convert_hf_to_gguf.py`: tensor names from gguf's own
HF -> GGUF name map, Llama q/k rows permuted for ggml's rotary kernel, GPT-2's Conv1D weights
transposed and its LM head written as a copy of the embedding, matrices in the requested type
(F32, F16 or quantized with `gguf.quants.quantize`), 1-D tensors in F32, the llama.cpp metadata
keys, and a byte-level BPE tokenizer with a ChatML template. transformers' own GGUF loader
reads these files too, so our loader is checked against both the HF model and transformers.
"""

import functools
import json

import gguf
import jax.numpy as jnp
import jinja2
import numpy as np
import pytest
import torch
import transformers
from hf_support import padded_batch, torch_logits

import models
from models.checkpoint import export_tensors

Q = gguf.GGMLQuantizationType
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID = 1, 2
CHAT_TEMPLATE = (
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
  " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VOCAB_SIZE = 300
_TRAINING_TEXT = (
  "the quick brown fox jumps over the lazy dog. what is the capital of france? "
  "paris is the capital of france. the sky is blue because of the scattering of light. "
) * 4
_GGUF_ARCH = {
  "llama": gguf.MODEL_ARCH.LLAMA,
  "gpt2": gguf.MODEL_ARCH.GPT2,
  "phi2": gguf.MODEL_ARCH.PHI2,
}
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@functools.cache
def tiny_bpe():
  """A byte-level BPE of VOCAB_SIZE tokens (3 special, 256 bytes, merges), trained here."""
  from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
  from tokenizers import models as tokenizer_models

  tokenizer = Tokenizer(tokenizer_models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=VOCAB_SIZE,
    special_tokens=SPECIAL_TOKENS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator([_TRAINING_TEXT], trainer)
  assert tokenizer.get_vocab_size() == VOCAB_SIZE
  return tokenizer


def tokenizer_metadata() -> tuple[list[str], list[str]]:
  """(tokens by id, merges as "a b") of `tiny_bpe`."""
  model = json.loads(tiny_bpe().to_str())["model"]
  tokens = [None] * len(model["vocab"])
  for token, index in model["vocab"].items():
    tokens[index] = token
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return tokens, merges


HF_CONFIGS = {
  "llama-tied": lambda: transformers.LlamaConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    max_position_embeddings=128,
  ),
  "llama-untied": lambda: transformers.LlamaConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    max_position_embeddings=128,
  ),
  "llama-bias-mqa": lambda: transformers.LlamaConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    attention_bias=True,
    mlp_bias=True,
    tie_word_embeddings=False,
    max_position_embeddings=128,
  ),
  # transformers reads GPT-2's context length into `n_ctx`, leaving n_positions at 1024.
  "gpt2": lambda: transformers.GPT2Config(
    vocab_size=VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=1024
  ),
  "phi2": lambda: transformers.PhiConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    partial_rotary_factor=0.5,
    max_position_embeddings=128,
  ),
}


def build_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
  """A tiny random HF causal LM, every parameter perturbed (norms are not all ones)."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]()).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  return model


def llama_cpp_permute(weight: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
  """llama.cpp's `LlamaModel.permute` of q/k rows (convert_hf_to_gguf.py)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  rows = weight.shape[0]
  return (
    weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    .swapaxes(1, 2)
    .reshape(weight.shape)
  )


def _inverse_rows(permuted: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
  """Undoes `llama_cpp_permute` through its index permutation (independent of our code)."""
  index = llama_cpp_permute(np.arange(permuted.shape[0]), n_head, n_head_kv)
  original = np.empty_like(permuted)
  original[index] = permuted
  return original


def _hf_tensors_as_gguf(model, arch: str, fused_qkv: bool) -> list[tuple[str, np.ndarray, list]]:
  """[(gguf name, array in GGUF row order, [(hf name, rows, undo)])] per llama.cpp.

  `undo` maps the GGUF array (rows sliced) back to the HF tensor.
  """
  config = model.config
  name_map = gguf.get_tensor_name_map(_GGUF_ARCH[arch], config.num_hidden_layers)
  out, qkv = [], {}
  for hf_name, tensor in model.state_dict().items():
    module, leaf = hf_name.rsplit(".", 1)
    if hf_name == "lm_head.weight" and (config.tie_word_embeddings or arch == "gpt2"):
      continue  # llama.cpp writes no tied head, except GPT-2's copy below
    array, undo = tensor.numpy().copy(), lambda a: a
    name = f"{name_map.get_name(module)}.{leaf}"
    if arch == "llama" and module.endswith(("q_proj", "k_proj")):
      heads, kv = config.num_attention_heads, config.num_key_value_heads
      kv = heads if module.endswith("q_proj") else kv
      array = llama_cpp_permute(array, heads, kv)
      undo = functools.partial(_inverse_rows, n_head=heads, n_head_kv=kv)
    if arch == "gpt2" and module.endswith(_GPT2_CONV1D) and leaf == "weight":
      array, undo = array.T.copy(), np.transpose
    if fused_qkv and module.endswith(("q_proj", "k_proj", "v_proj")):
      qkv.setdefault(name.replace(name.split(".")[2], "attn_qkv"), []).append((hf_name, array))
      continue
    out.append((name, array, [(hf_name, None, undo)]))
  for name, parts in qkv.items():  # Phi-2 as converted from Microsoft's fused Wqkv
    bounds = np.cumsum([0] + [a.shape[0] for _, a in parts])
    fused = np.concatenate([a for _, a in parts])
    out.append(
      (name, fused, [(h, (bounds[i], bounds[i + 1]), None) for i, (h, _) in enumerate(parts)])
    )
  if arch == "gpt2":  # llama.cpp writes GPT-2's tied head as its own tensor
    embedding = next(a for n, a, _ in out if n == "token_embd.weight")
    out.append(("output.weight", embedding.copy(), [("lm_head.weight", None, None)]))
  return out


def _encode(array: np.ndarray, name: str, matrix_type, embedding_type):
  """(data, raw type) as written: 1-D in F32, matrices in the requested type."""
  qtype = Q.F32 if array.ndim == 1 else matrix_type
  if name == "token_embd.weight" and embedding_type is not None:
    qtype = embedding_type
  if qtype == Q.F32:
    data = array.astype(np.float32)
    return data, None, data
  if qtype == Q.F16:
    data = array.astype(np.float16)
    return data, None, data.astype(np.float32)
  data = gguf.quants.quantize(array.astype(np.float32), qtype)
  return data, qtype, gguf.quants.dequantize(data, qtype)


def _add_metadata(writer: gguf.GGUFWriter, arch: str, config, overrides: dict) -> None:
  writer.add_name("tiny test model")
  if arch == "llama":
    head_dim = config.head_dim
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(overrides.get("feed_forward_length", config.intermediate_size))
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
  elif arch == "gpt2":
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
  elif arch == "phi2":
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    factor = config.rope_parameters["partial_rotary_factor"]
    writer.add_rope_dimension_count(int(factor * head_dim))
  tokens, merges = tokenizer_metadata()
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3: control
  writer.add_token_merges(merges)
  writer.add_bos_token_id(BOS_ID)
  writer.add_eos_token_id(EOS_ID)
  writer.add_pad_token_id(EOS_ID)
  writer.add_add_bos_token(False)
  writer.add_chat_template(CHAT_TEMPLATE)


def write_gguf(
  path,
  model,
  arch: str,
  matrix_type=Q.F32,
  *,
  embedding_type=None,
  fused_qkv: bool = False,
  drop: tuple[str, ...] = (),
  extra: dict | None = None,
  file_arch: str | None = None,
  **metadata_overrides,
) -> dict[str, np.ndarray]:
  """Writes `model` as llama.cpp would; returns the HF tensors the file holds.

  The returned tensors are the HF model's, through the file's quantization and
  back to HF layout by an independent route (index permutation, transposes).
  """
  writer = gguf.GGUFWriter(str(path), file_arch or arch)
  _add_metadata(writer, arch, model.config, metadata_overrides)
  expected = {}
  for name, array, targets in _hf_tensors_as_gguf(model, arch, fused_qkv):
    if name in drop:
      continue
    data, raw_type, stored = _encode(array, name, matrix_type, embedding_type)
    writer.add_tensor(name, data, raw_dtype=raw_type)
    for hf_name, rows, undo in targets:
      value = stored if rows is None else stored[rows[0] : rows[1]]
      expected[hf_name] = (undo or (lambda a: a))(value)
  for name, array in (extra or {}).items():
    writer.add_tensor(name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return expected


def transformers_gguf_model(path) -> torch.nn.Module:
  """transformers' own GGUF loading of `path`, in float32."""
  return transformers.AutoModelForCausalLM.from_pretrained(
    str(path.parent), gguf_file=path.name, dtype=torch.float32
  ).eval()


def our_logits(model, ids, mask) -> np.ndarray:
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def assert_tensors_equal(model, config, expected: dict[str, np.ndarray]) -> None:
  """Our parameters under HF names equal `expected` bit for bit."""
  ours = {k: np.asarray(v) for k, v in export_tensors(model, config).items()}
  assert sorted(ours) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)


CASES = {
  # name: (HF model, arch, matrix type, embedding type, fused qkv)
  "llama-tied-f32": ("llama-tied", "llama", Q.F32, None, False),
  "llama-untied-f32": ("llama-untied", "llama", Q.F32, None, False),
  "llama-untied-f16": ("llama-untied", "llama", Q.F16, None, False),
  "llama-tied-q8_0": ("llama-tied", "llama", Q.Q8_0, None, False),
  "llama-untied-q4_1-embd-q8_0": ("llama-untied", "llama", Q.Q4_1, Q.Q8_0, False),
  "gpt2-f32": ("gpt2", "gpt2", Q.F32, None, False),
  "gpt2-q8_0": ("gpt2", "gpt2", Q.Q8_0, None, False),
}
TRANSFORMERS_READS = {"llama", "gpt2"}  # transformers' GGUF loader has no phi2


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_matches_hf_model_and_transformers_gguf_loader(case, tmp_path):
  hf_name, arch, matrix_type, embedding_type, fused = CASES[case]
  hf_model = build_hf_model(hf_name)
  path = tmp_path / "model.gguf"
  expected = write_gguf(path, hf_model, arch, matrix_type, embedding_type=embedding_type)
  model, config = models.load_pretrained(path)
  assert config.model_type == arch
  assert config.tie_word_embeddings == (arch != "gpt2" and hf_model.config.tie_word_embeddings)
  assert_tensors_equal(model, config, expected)

  ids, mask = padded_batch(3, 7, "right")
  real = mask.astype(bool)
  ours = our_logits(model, ids, mask)[real]
  if matrix_type == Q.F32:
    np.testing.assert_allclose(ours, torch_logits(hf_model, ids, mask)[real], atol=1e-5, rtol=0)
  reference = torch_logits(transformers_gguf_model(path), ids, mask)[real]
  np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
  "hf_name,arch,matrix_type,fused",
  [
    ("llama-bias-mqa", "llama", Q.F32, False),
    ("phi2", "phi2", Q.F32, False),
    ("phi2", "phi2", Q.F32, True),
    ("phi2", "phi2", Q.Q8_0, True),
  ],
  ids=["llama-bias-mqa", "phi2", "phi2-fused-qkv", "phi2-fused-qkv-q8_0"],
)
def test_gguf_matches_hf_model(hf_name, arch, matrix_type, fused, tmp_path):
  """Files transformers' GGUF loader cannot read (phi2) or reads without biases (llama)."""
  hf_model = build_hf_model(hf_name)
  path = tmp_path / "model.gguf"
  expected = write_gguf(path, hf_model, arch, matrix_type, fused_qkv=fused)
  model, config = models.load_pretrained(path)
  assert_tensors_equal(model, config, expected)
  if matrix_type == Q.F32:
    ids, mask = padded_batch(3, 7, "right")
    real = mask.astype(bool)
    np.testing.assert_allclose(
      our_logits(model, ids, mask)[real], torch_logits(hf_model, ids, mask)[real], atol=1e-5, rtol=0
    )


def test_dequantized_tensors_cast_to_param_dtype(tmp_path):
  path = tmp_path / "model.gguf"
  expected = write_gguf(path, build_hf_model("llama-tied"), "llama", Q.Q4_1)
  model, config = models.load_pretrained(path, param_dtype=jnp.bfloat16)
  assert config.param_dtype == jnp.bfloat16
  ours = export_tensors(model, config)
  for name, value in expected.items():
    assert ours[name].dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(
      np.asarray(ours[name]), np.asarray(jnp.asarray(value, jnp.bfloat16))
    )


def test_folder_with_one_gguf_file_loads_model_and_tokenizer(tmp_path):
  expected = write_gguf(tmp_path / "tiny.Q8_0.gguf", build_hf_model("llama-tied"), "llama", Q.Q8_0)
  model, config = models.load_pretrained(tmp_path)
  assert_tensors_equal(model, config, expected)
  assert models.load_tokenizer(tmp_path).chat_template == CHAT_TEMPLATE


def test_tokenizer_from_gguf_metadata(tmp_path):
  path = tmp_path / "model.gguf"
  write_gguf(path, build_hf_model("llama-tied"), "llama")
  tokenizer = models.load_tokenizer(path)
  assert tokenizer.chat_template == CHAT_TEMPLATE
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == EOS_ID
  assert tokenizer.bos_token == "<|im_start|>"
  text = "what is the capital of france? paris!"
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  assert ids == tiny_bpe().encode(text).ids  # the vocabulary and merges made it
  assert tokenizer.decode(ids) == text
  messages = [{"role": "user", "content": "hi there"}]
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  template = jinja2.Environment().from_string(CHAT_TEMPLATE)
  assert rendered == template.render(messages=messages, add_generation_prompt=True)
  assert rendered.endswith("<|im_start|>assistant\n")
  chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
  assert chat_ids["input_ids"].count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 1


def test_model_loaded_from_gguf_saves_as_hf_checkpoint(tmp_path):
  gguf_path, out = tmp_path / "model.gguf", tmp_path / "saved"
  write_gguf(gguf_path, build_hf_model("llama-tied"), "llama", Q.Q4_1, embedding_type=Q.Q8_0)
  model, config = models.load_pretrained(gguf_path)
  models.save_pretrained(model, config, out, tokenizer=models.load_tokenizer(gguf_path))

  saved = json.loads((out / "config.json").read_text())
  assert saved["model_type"] == "llama" and saved["architectures"] == ["LlamaForCausalLM"]
  assert saved["num_key_value_heads"] == 2 and saved["tie_word_embeddings"] is True
  assert saved["rope_parameters"]["rope_theta"] == 500000.0
  assert (saved["bos_token_id"], saved["eos_token_id"]) == (BOS_ID, EOS_ID)

  reloaded, reloaded_config = models.load_pretrained(out)
  assert reloaded_config == config
  assert_tensors_equal(
    reloaded, reloaded_config, {k: np.asarray(v) for k, v in export_tensors(model, config).items()}
  )
  ids, mask = padded_batch(3, 7, "right")
  real = mask.astype(bool)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  np.testing.assert_allclose(
    torch_logits(hf_model, ids, mask)[real], our_logits(model, ids, mask)[real], atol=1e-5, rtol=0
  )
  tokenizer = models.load_tokenizer(out)
  assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == "<|im_end|>"


@pytest.fixture(scope="module")
def llama_tied():
  return build_hf_model("llama-tied")


def test_unsupported_architecture_is_named(tmp_path, llama_tied):
  path = tmp_path / "model.gguf"
  write_gguf(path, llama_tied, "llama", file_arch="mamba")
  with pytest.raises(ValueError, match=r"architecture 'mamba'.*supported: llama, gpt2, phi2"):
    models.load_pretrained(path)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path, llama_tied):
  path = tmp_path / "model.gguf"
  ffn_down = llama_tied.model.layers[0].mlp.down_proj.weight.detach().numpy()
  write_gguf(
    path,
    llama_tied,
    "llama",
    drop=("blk.0.ffn_down.weight",),
    extra={"blk.0.ffn_down.weight": ffn_down.astype(np.float64)},
  )
  with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight \(F64\)"):
    models.load_pretrained(path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path, llama_tied):
  path = tmp_path / "model.gguf"
  extra = {"blk.0.attn_extra.weight": np.zeros((4, 64), np.float32)}
  write_gguf(path, llama_tied, "llama", drop=("blk.1.ffn_down.weight",), extra=extra)
  with pytest.raises(ValueError) as error:
    models.load_pretrained(path)
  message = str(error.value)
  assert (
    "missing tensors ['blk.1.ffn_down.weight (model.layers.1.mlp.down_proj.weight)']" in message
  )
  assert "unexpected tensors ['blk.0.attn_extra.weight']" in message


def test_metadata_disagreeing_with_tensors_is_a_shape_error(tmp_path, llama_tied):
  path = tmp_path / "model.gguf"
  write_gguf(path, llama_tied, "llama", feed_forward_length=128)
  with pytest.raises(ValueError, match=r"Shape mismatch for tensor 'blk\.0\.ffn_\w+\.weight"):
    models.load_pretrained(path)


def test_not_a_gguf_file(tmp_path):
  fake = tmp_path / "model.gguf"
  fake.write_bytes(b"PK\x03\x04 definitely not GGUF")
  for load in (models.load_pretrained, models.load_tokenizer):
    with pytest.raises(ValueError, match="is not a GGUF file"):
      load(fake)


def test_folder_with_several_gguf_files_is_ambiguous(tmp_path, llama_tied):
  for name in ("a.gguf", "b.gguf"):
    write_gguf(tmp_path / name, llama_tied, "llama")
  with pytest.raises(ValueError, match=r"several GGUF files \['a.gguf', 'b.gguf'\]"):
    models.load_pretrained(tmp_path)
