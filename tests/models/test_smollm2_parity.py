"""SmolLM2-135M-Instruct (GGUF, Q4_1 + Q8_0 + F32) loaded by our code vs transformers' GGUF loading.

Each model is loaded once per module. Both sides run in float32: the parameters must be
bit-identical (the same `gguf.quants.dequantize` output in HF layout), the logits of a padded
batch of chat prompts within 1e-3, and greedy decoding identical token for token.
"""

import jax.numpy as jnp
import jinja2.sandbox
import numpy as np
import pytest
import torch
import transformers

import models
from models.checkpoint import export_tensors

QUESTIONS = [
  "What is the capital of France?",
  "Hi!",
  "Explain in two sentences why the sky looks blue during the day.",
]
NEW_TOKENS = 30


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """torch's OpenMP threads spin-wait when the cores are shared (10-50x slower); one is steady."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
  return models.load_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
  return models.load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
  return transformers.AutoModelForCausalLM.from_pretrained(
    str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
  ).eval()


@pytest.fixture(scope="module")
def reader(smollm2_gguf):
  import gguf

  return gguf.GGUFReader(str(smollm2_gguf))


def chat_batch(tokenizer, side: str) -> tuple[np.ndarray, np.ndarray]:
  """The questions as ChatML prompts (generation prompt added), padded on `side`."""
  texts = [
    tokenizer.apply_chat_template(
      [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
    )
    for q in QUESTIONS
  ]
  tokenizer.padding_side = side
  batch = tokenizer(texts, return_tensors="np", padding=True, add_special_tokens=False)
  return batch["input_ids"], batch["attention_mask"]


def test_parameters_equal_transformers_dequantization(ours, hf_model, reader):
  model, config = ours
  types = {t.tensor_type.name for t in reader.tensors}
  assert {"Q4_1", "Q8_0", "F32"} <= types
  mine = export_tensors(model, config)
  theirs = hf_model.state_dict()
  assert config.tie_word_embeddings and "lm_head.weight" not in mine
  assert sorted(mine) == sorted(n for n in theirs if n != "lm_head.weight")
  for name, value in mine.items():
    np.testing.assert_array_equal(np.asarray(value), theirs[name].numpy(), err_msg=name)


def test_parameters_equal_independent_dequantization(ours, reader):
  """token_embd (Q8_0) and layer 7's q/k (Q4_1, llama.cpp-permuted rows), recomputed here."""
  import gguf

  model, config = ours
  mine = export_tensors(model, config)
  raw = {t.name: t for t in reader.tensors}

  def dequantized(name):
    t = raw[name]
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in t.shape[::-1]])

  def unpermuted(rows, heads):
    # llama.cpp stores HF row (h, j) of half-rotation pairs as row (h, j // half + 2 * (j % half)).
    half = rows.shape[0] // heads // 2
    order = [h * 2 * half + i * 2 + p for h in range(heads) for p in range(2) for i in range(half)]
    return rows[order]

  assert raw["token_embd.weight"].tensor_type.name == "Q8_0"
  assert raw["blk.7.attn_q.weight"].tensor_type.name == "Q4_1"
  np.testing.assert_array_equal(
    np.asarray(mine["model.embed_tokens.weight"]), dequantized("token_embd.weight")
  )
  for kind, heads in (("q", config.num_heads), ("k", config.num_kv_heads)):
    np.testing.assert_array_equal(
      np.asarray(mine[f"model.layers.7.self_attn.{kind}_proj.weight"]),
      unpermuted(dequantized(f"blk.7.attn_{kind}.weight"), heads),
    )


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers_on_padded_chat_batch(ours, hf_model, tokenizer, side):
  model, _ = ours
  ids, mask = chat_batch(tokenizer, side)
  assert len(set(mask.sum(axis=1))) == len(QUESTIONS)  # every row padded differently
  mine = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  positions = np.maximum(mask.cumsum(axis=1) - 1, 0)  # what ours uses; HF needs it for left
  with torch.no_grad():
    theirs = hf_model(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      position_ids=torch.from_numpy(positions),
    ).logits.numpy()
  real = mask.astype(bool)
  assert np.abs(mine[real] - theirs[real]).max() <= 1e-3


def test_greedy_generation_matches_transformers(ours, hf_model, tokenizer):
  model, config = ours
  ids, mask = chat_batch(tokenizer, "left")
  mine = np.asarray(
    models.generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=NEW_TOKENS)
  )
  with torch.no_grad():
    theirs = hf_model.generate(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      max_new_tokens=NEW_TOKENS,
      do_sample=False,
      pad_token_id=config.pad_token_id,
    )[:, ids.shape[1] :].numpy()
  # HF stops once every row has ended; ours pads the rest.
  np.testing.assert_array_equal(mine[:, : theirs.shape[1]], theirs)
  assert (mine[:, theirs.shape[1] :] == config.pad_token_id).all()
  assert "Paris" in tokenizer.decode(mine[0], skip_special_tokens=True)


def test_tokenizer_carries_gguf_chat_template_and_eos(tokenizer, reader):
  template = reader.fields["tokenizer.chat_template"].contents()
  assert tokenizer.chat_template == template
  assert tokenizer.eos_token == "<|im_end|>"
  messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": QUESTIONS[0]},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": QUESTIONS[1]},
  ]
  # transformers renders chat templates in this jinja environment.
  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  expected = environment.from_string(template).render(messages=messages, add_generation_prompt=True)
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert rendered == expected
  assert rendered.endswith("<|im_start|>assistant\n")
