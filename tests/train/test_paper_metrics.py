"""The DualOptim+ paper's terms and aggregates, the answer-boundary conventions, truncation
that keeps the end token, and forget quality's refusal of a mismatched reference.

Tokenizers are trained here; the sentence encoder is a bag-of-words counter and the NLI model
a lexical-inclusion rule (small deterministic components, not mocks); the real
all-MiniLM-L6-v2 is used when models.bert and its cached folder are available.
"""

import collections
import copy
import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from train import evaluation as ev

LN2 = math.log(2.0)
VOCAB = ["<pad>", "<eos>", "<unk>", "Q", "A", "what", "color", "?", "red", "blue", "green"]
TOKEN = {t: i for i, t in enumerate(VOCAB)}
TEMPLATE = ev.PromptTemplate(question_start="Q ", question_end=" ", answer_start="A ")


@pytest.fixture(scope="module")
def word_tokenizer():
  tok = Tokenizer(models.WordLevel(TOKEN, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
  )


@pytest.fixture(scope="module")
def bpe_tokenizer():
  """Byte-level BPE, as GPT-2 / Phi-1.5: "Answer: " alone ends in a lone "Ġ" token."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    ["Question: hi\nAnswer: The cat sat.", "<|im_start|>user\nhi<|im_end|>\n"] * 5,
    trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=["<eos>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


# --- token entropy ---------------------------------------------------------------------------


def test_token_entropy_is_the_normalized_unigram_entropy(word_tokenizer):
  # red red blue green: p = (1/2, 1/4, 1/4), H = 1.5 bits, log2(4 tokens) = 2.
  assert ev.token_entropy(word_tokenizer, "red red blue green") == pytest.approx(0.75)
  assert ev.token_entropy(word_tokenizer, "red red blue green", normalize=False) == 1.5
  assert ev.token_entropy(word_tokenizer, "red blue") == pytest.approx(1.0)
  assert ev.token_entropy(word_tokenizer, "red red red") == 0.0
  assert (
    ev.token_entropy(word_tokenizer, "red") == 0.0 and ev.token_entropy(word_tokenizer, "") == 0
  )
  # Eight tokens, three kinds (4, 2, 2): H = 1.5 bits over log2(8) = 3.
  text = "red red red red blue blue what what"
  assert ev.token_entropy(word_tokenizer, text) == pytest.approx(0.5)


def test_token_entropy_counts_the_tokenizers_tokens(bpe_tokenizer):
  # Byte-level BPE: "cat" and "Ġcat" are different tokens, so a leading space matters.
  tokens = bpe_tokenizer.tokenize("cat cat")
  assert len(tokens) == 2 and tokens[0] != tokens[1]
  assert ev.token_entropy(bpe_tokenizer, "cat cat") == pytest.approx(1.0)
  assert ev.token_entropy(bpe_tokenizer, " cat cat") == 0.0


# --- cosine similarity and entailment --------------------------------------------------------


class BagOfWordsEncoder:
  """Embeds a text as its lower-cased word counts over a fixed vocabulary."""

  def __init__(self, words):
    self.index = {w: i for i, w in enumerate(words)}

  def encode(self, texts):
    out = np.zeros((len(texts), len(self.index)))
    for row, text in enumerate(texts):
      for word in re.findall(r"\w+", text.lower()):
        if word in self.index:
          out[row, self.index[word]] += 1
    return out


class LexicalEntailment:
  """An NLI rule: entailment when every hypothesis word occurs in the premise, contradiction
  when none does, neutral otherwise."""

  def __call__(self, premises, hypotheses):
    labels = []
    for premise, hypothesis in zip(premises, hypotheses):
      p, h = set(re.findall(r"\w+", premise.lower())), set(re.findall(r"\w+", hypothesis.lower()))
      labels.append("entailment" if h <= p else "contradiction" if not h & p else "neutral")
    return labels


def test_cosine_similarity_is_the_clipped_cosine():
  encoder = BagOfWordsEncoder(["red", "blue", "green"])
  # (1,1,0)·(1,0,0) = 1 / sqrt(2); orthogonal -> 0; identical -> 1; empty -> 0.
  np.testing.assert_allclose(
    ev.cosine_similarities(encoder, ["red blue", "green", "red", ""], ["red", "red", "red", "x"]),
    [1 / math.sqrt(2), 0.0, 1.0, 0.0],
  )
  negative = type("Neg", (), {"encode": lambda self, t: np.array([[1.0, 0], [-1.0, 0]])})()
  assert ev.cosine_similarities(negative, ["a"], ["b"]).tolist() == [0.0]  # max(0, -1)
  term = ev.CosineSimilarity(encoder)
  assert term.name == "cosine_similarity"
  np.testing.assert_allclose(term(["red"], ["red blue"], ["q"]), [1 / math.sqrt(2)])
  with pytest.raises(ValueError, match="2 generations but 1 references"):
    ev.cosine_similarities(encoder, ["a", "b"], ["a"])


def test_entailment_direction_and_rouge_floor():
  nli = LexicalEntailment()
  generations = ["red blue green", "red", "nothing"]
  references = ["red", "red blue", "red"]
  rouge = [1.0, 0.5, 0.0]
  # Forget set: does the generation entail the answer?
  forget = ev.entailment_labels(nli, generations, references, rouge, generation_is_premise=True)
  assert forget == ("entailment", "neutral", "none")  # ROUGE 0 < 0.1 -> "none"
  # Other sets: does the answer entail the generation?
  others = ev.entailment_labels(nli, generations, references, rouge, generation_is_premise=False)
  assert others == ("neutral", "entailment", "none")
  assert ev.entailment_score(forget) == pytest.approx(1 / 3)


# --- the paper's aggregates ------------------------------------------------------------------


def full_paper_metrics(value=0.5):
  return {
    f"{label} {name}": value
    for label in ("Retain", "Real Authors", "Real World", "Forget")
    for name in (
      "ROUGE",
      "Probability",
      "Truth Ratio",
      "Token Entropy",
      "Cosine Similarity",
      "Entailment Score",
    )
  } | {"Forget IDK Token Entropy": value, "Forget IDK Entailment Score": value}


def test_paper_aggregates_from_all_terms():
  values = full_paper_metrics()
  values["Retain ROUGE"] = 0.25
  values["Forget ROUGE"] = 0.9
  values["Forget IDK Entailment Score"] = 0.2
  out = ev.paper_aggregates(values)
  assert len(out["paper_model_utility_terms"]) == 18 and out["paper_model_utility_missing"] == []
  assert out["paper_model_utility"] == pytest.approx(18 / (17 * 2 + 4))
  assert out["paper_model_utility_retain"] == pytest.approx(6 / (5 * 2 + 4))
  assert set(out["paper_untargeted_forget_efficacy_terms"]) == {
    "Forget ROUGE",
    "Forget Probability",
    "Forget Truth Ratio",
    "Forget Cosine Similarity",
    "Forget Entailment Score",
  }
  assert out["paper_untargeted_forget_efficacy"] == pytest.approx(1 - (0.9 + 4 * 0.5) / 5)
  assert out["paper_targeted_forget_efficacy"] == pytest.approx(2 / (1 / 0.5 + 1 / 0.2))
  assert all(out[f"{k}_definition"] for k in ("paper_model_utility", "paper_model_utility_retain"))


def test_paper_aggregates_with_missing_terms_use_the_rest_and_name_them():
  values = full_paper_metrics(0.5)
  for key in list(values):
    if "Entailment" in key or "Cosine" in key:
      values[key] = None
  del values["Real World ROUGE"]  # e.g. a set that was not evaluated
  values["Forget Token Entropy"] = values["Forget IDK Token Entropy"] = 0.8
  out = ev.paper_aggregates(values)
  assert len(out["paper_model_utility_terms"]) == 11
  assert sorted(out["paper_model_utility_missing"]) == sorted(
    [f"{s} {m}" for s in ("Retain", "Real Authors", "Real World") for m in ("Cosine Similarity",)]
    + [f"{s} Entailment Score" for s in ("Retain", "Real Authors", "Real World")]
    + ["Real World ROUGE"]
  )
  assert out["paper_model_utility"] == pytest.approx(0.5)
  assert out["paper_untargeted_forget_efficacy_missing"] == [
    "Forget Cosine Similarity",
    "Forget Entailment Score",
  ]
  assert out["paper_untargeted_forget_efficacy"] == pytest.approx(0.5)
  assert out["paper_targeted_forget_efficacy"] == pytest.approx(0.8)
  assert out["paper_targeted_forget_efficacy_missing"] == ["Forget IDK Entailment Score"]
  nothing = ev.paper_aggregates({})
  assert (
    nothing["paper_model_utility"] is None and len(nothing["paper_model_utility_missing"]) == 18
  )


def test_paper_set_metrics_use_the_authors_truth_ratio_and_names():
  scores = {"probability": 0.3, "rouge_l_recall": 0.4, "truth_ratio": 0.9, "token_entropy": 0.7}
  forget = ev.paper_set_metrics("forget", scores)
  assert forget["Forget Truth Ratio"] == pytest.approx(0.1)  # 1 - mean min(R, 1/R)
  assert forget["Forget IDK Token Entropy"] == 0.7 and forget["Forget Cosine Similarity"] is None
  world = ev.paper_set_metrics("world_facts", scores)
  assert world["Real World Truth Ratio"] == 0.9 and "Real World IDK Token Entropy" not in world


# --- scoring: truncation and the answer boundary ---------------------------------------------


def test_truncation_keeps_the_end_token_when_cut_first(word_tokenizer):
  prompt = TEMPLATE.prompt("what color ?")  # 5 prompt tokens
  kept = ev.encode_answer(
    word_tokenizer, prompt, "red blue green", max_length=6, end_after_cut=True
  )
  assert kept.input_ids == tuple(TOKEN[t] for t in ["Q", "what", "color", "?", "A", "red", "<eos>"])
  assert kept.truncated and kept.num_answer_tokens == 2
  lost = ev.encode_answer(word_tokenizer, prompt, "red blue green", max_length=6)
  assert lost.input_ids[-1] == TOKEN["red"] and lost.truncated
  fits = ev.encode_answer(word_tokenizer, prompt, "red", max_length=6, end_after_cut=True)
  assert not fits.truncated and fits.input_ids[-1] == TOKEN["<eos>"]
  # Even a prompt as long as the cap keeps one scored token: the end token.
  only_end = ev.encode_answer(word_tokenizer, prompt, "red", max_length=5, end_after_cut=True)
  assert only_end.num_answer_tokens == 1 and only_end.truncated


def test_both_boundary_conventions_on_the_phi_template(bpe_tokenizer):
  scored = {}
  for boundary in ev.ANSWER_BOUNDARIES:
    encoder = ev.PromptEncoder.create("phi", bpe_tokenizer, boundary)
    e = encoder.encode_answer(encoder.prompt("hi"), "The cat sat.")
    scored[boundary] = bpe_tokenizer.decode(e.input_ids[e.num_prompt_tokens :])
    prompt_tokens = bpe_tokenizer.tokenize(encoder.prompt("hi"))
    assert prompt_tokens[-1] == "Ġ"  # the lone space that open-unlearning counts as prompt
  assert scored["answer"] == " The cat sat.<eos>"
  assert scored["open-unlearning"] == " cat sat.<eos>"  # the first answer token is lost
  # Without a merge at the boundary the two conventions agree.
  plain = [
    ev.PromptEncoder.create("plain", bpe_tokenizer, b).encode_answer("hi\n", "The cat sat.")
    for b in ev.ANSWER_BOUNDARIES
  ]
  assert plain[0] == plain[1]
  with pytest.raises(ValueError, match="answer boundary must be one of"):
    ev.PromptEncoder.create("phi", bpe_tokenizer, "tofu")


def test_open_unlearning_chat_scores_the_whole_rendered_turn_then_eos(bpe_tokenizer):
  tok = copy.deepcopy(bpe_tokenizer)
  tok.chat_template = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
  )
  exact = ev.PromptEncoder.create("chat", tok, "answer")
  ou = ev.PromptEncoder.create("chat", tok, "open-unlearning")
  texts = {}
  for name, encoder in (("answer", exact), ("open-unlearning", ou)):
    e = encoder.encode_answer(encoder.prompt("hi"), "The cat sat.")
    texts[name] = tok.decode(e.input_ids[e.num_prompt_tokens :])
  assert texts["answer"] == "The cat sat.<|im_end|>"
  assert texts["open-unlearning"] == "The cat sat.<|im_end|>\n<eos>"
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  assert im_end in ou.stop_token_ids and ou.describe()["end_of_turn"] == "<|im_end|>"


# --- the evaluator end to end ----------------------------------------------------------------

BIGRAM = {
  "A": {"red": 1 / 2, "blue": 1 / 4, "green": 1 / 8},
  "red": {"<eos>": 1 / 2},
  "blue": {"<eos>": 1 / 2},
  "green": {"<eos>": 1 / 4},
}


def bigram_logits(input_ids, attention_mask):
  del attention_mask
  table = np.full((len(VOCAB), len(VOCAB)), 1.0 / len(VOCAB))
  for prev, row in BIGRAM.items():
    table[TOKEN[prev]] = (1.0 - sum(row.values())) / (len(VOCAB) - len(row))
    for nxt, p in row.items():
      table[TOKEN[prev], TOKEN[nxt]] = p
  return jnp.log(jnp.asarray(table, jnp.float32))[input_ids]


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path)


@pytest.fixture()
def sets(tmp_path):
  qa = {
    "question": "what color ?",
    "answer": "red",
    "paraphrased_answer": "red blue",
    "perturbed_answer": ["blue green red", "green"],
  }
  options = {
    "question": "what color ?",
    "answer": "red",
    "perturbed_answer": ["blue"],
    "original_answer": "red color",
  }
  return (
    ev.EvalSetSpec("forget", write_jsonl(tmp_path / "f.json", [qa, qa]), "forget"),
    ev.EvalSetSpec("retain", write_jsonl(tmp_path / "r.json", [qa]), "retain"),
    ev.EvalSetSpec("real_authors", write_jsonl(tmp_path / "ra.json", [options]), "real_authors"),
    ev.EvalSetSpec("world_facts", write_jsonl(tmp_path / "wf.json", [options]), "world_facts"),
  )


def run(word_tokenizer, sets, paper=None, **config):
  config = ev.EvalConfig(
    batch_size=2, max_new_tokens=3, length_multiple=4, show_progress=False, **config
  )
  return ev.evaluate(
    bigram_logits, word_tokenizer, sets, template=TEMPLATE, config=config, paper=paper
  )


def test_scored_token_counts_and_the_kept_end_token(word_tokenizer, sets, tmp_path):
  # The prompt has 5 tokens; a cap of 6 keeps one answer token, then the end token.
  with pytest.warns(UserWarning, match="4 of 8 scored sequences were cut to max_length=6"):
    result = run(word_tokenizer, sets[:1], max_length=6)
  forget = result.sets["forget"]
  # "red" + <eos> fits; the paraphrase "red blue" is cut to "red" + <eos>: p = 1/2 each.
  np.testing.assert_allclose(forget.nll_answer, [LN2, LN2], rtol=1e-6)
  np.testing.assert_allclose(forget.nll_paraphrased, [LN2, LN2], rtol=1e-6)
  # Perturbed "blue green red" -> "blue" + <eos>: -(log 1/4 + log 1/2) / 2.
  np.testing.assert_allclose(forget.nll_perturbed[0][0], 1.5 * LN2, rtol=1e-6)
  row = result.items_json()["sets"]["forget"]["items"][0]
  assert row["answer_tokens_scored"] == 2 and row["answer_truncated"] is False
  assert row["paraphrased_tokens_scored"] == 2 and row["perturbed_tokens_scored"] == [2, 2]
  assert row["num_truncated_sequences"] == 2  # the paraphrase and the first perturbed answer
  assert result.summary["sets"]["forget"]["num_truncated_sequences"] == 4


def test_evaluate_computes_the_paper_terms_and_aggregates(word_tokenizer, sets, tmp_path):
  paper = ev.PaperModels(
    sentence_encoder=BagOfWordsEncoder(["red", "blue", "green", "color"]),
    sentence_encoder_name="bag-of-words",
    nli=LexicalEntailment(),
    nli_name="lexical",
    idk_answers=("red green", "what ?"),
    idk_source="inline",
  )
  result = run(word_tokenizer, sets, paper=paper)
  s = result.summary
  # The bigram model answers "red" everywhere (then <eos>): one token, entropy 0.
  assert all(r.generations == ("red",) * len(r.items) for r in result.sets.values())
  forget = s["sets"]["forget"]
  assert forget["token_entropy"] == 0.0 and forget["cosine_similarity"] == pytest.approx(1.0)
  assert forget["entailment_score"] == 1.0
  # Real authors: the reference is original_answer "red color": cos((1,0,0,0), (1,0,0,1)).
  assert s["sets"]["real_authors"]["cosine_similarity"] == pytest.approx(1 / math.sqrt(2))
  assert s["sets"]["real_authors"]["paper_reference_answer"] == "original_answer"
  # "red color" entails "red" (premise = the answer off the forget set).
  assert s["sets"]["real_authors"]["entailment_score"] == 1.0
  # IDK: the items' refusal answers, ROUGE of "red" against them, and whether "red"
  # entails them (ROUGE < 0.1 -> "none").
  items = result.items_json()["sets"]["forget"]["items"]
  chosen = ev.paper_metrics.idk_choices(2, 2, 0)
  expected_idk = [paper.idk_answers[i] for i in chosen]
  assert [row["idk_answer"] for row in items] == expected_idk
  expected_rouge = [0.5 if a == "red green" else 0.0 for a in expected_idk]
  assert [row["idk_rouge_l_recall"] for row in items] == expected_rouge
  assert all(row["idk_entailment_label"] in ("neutral", "none") for row in items)
  assert forget["idk_entailment_score"] == 0.0

  pm = s["paper_metrics"]
  assert pm["Forget Truth Ratio"] == pytest.approx(1 - forget["truth_ratio"])
  assert pm["Retain Token Entropy"] == 0.0
  assert s["paper_model_utility"] == 0.0  # a zero term (token entropy) zeroes the mean
  assert s["paper_model_utility_missing"] == []
  knowledge = [forget["rouge_l_recall"], forget["probability"], pm["Forget Truth Ratio"], 1.0, 1.0]
  assert s["paper_untargeted_forget_efficacy"] == pytest.approx(1 - np.mean(knowledge))
  assert s["paper_targeted_forget_efficacy"] == 0.0
  assert s["paper_models"]["sentence_encoder"] == "bag-of-words"
  assert s["paper_models"]["sentence_encoder_of_the_authors"] == "paraphrase-MiniLM-L6-v2"
  for key in ("forget_quality", "model_utility", "forget_efficacy", "ranking_score"):
    assert s[f"{key}_definition"]
  assert s["answer_boundary"] == "answer" and s["tokenizer"]["vocab_size"] == len(VOCAB)
  table = result.markdown_table()
  assert "paper Model Utility" in table and "paper Targeted Forget Efficacy" in table


def test_without_paper_models_the_model_terms_are_named_missing(word_tokenizer, sets):
  s = run(word_tokenizer, sets).summary
  assert s["sets"]["retain"]["cosine_similarity"] is None
  assert s["sets"]["forget"]["idk_entailment_score"] is None
  assert sorted(s["paper_untargeted_forget_efficacy_missing"]) == [
    "Forget Cosine Similarity",
    "Forget Entailment Score",
  ]
  assert s["paper_targeted_forget_efficacy_missing"] == ["Forget IDK Entailment Score"]
  assert len(s["paper_model_utility_terms"]) == 12
  assert s["paper_models"]["sentence_encoder"] is None and s["paper_models"]["nli_model"] is None
  assert "missing: " in ev.markdown_table(s)


# --- forget quality refuses a reference measured otherwise -----------------------------------


def test_forget_quality_refuses_another_convention_or_template(word_tokenizer, sets, tmp_path):
  reference = run(word_tokenizer, sets[:1]).write(tmp_path / "ref")["items"]
  items = json.loads(open(reference).read())
  assert items["answer_boundary"] == "answer" and items["tokenizer"]["vocab_size"] == len(VOCAB)
  assert items["format"] == "dualoptax.tofu_eval_items/2"
  config = ev.EvalConfig(max_new_tokens=2, show_progress=False, answer_boundary="open-unlearning")
  with pytest.raises(ValueError, match="'answer' but this evaluation uses 'open-unlearning'"):
    ev.evaluate(
      bigram_logits,
      word_tokenizer,
      sets[:1],
      template=TEMPLATE,
      config=config,
      retain_reference=reference,
    )
  other_template = ev.PromptTemplate(question_start="Q ", question_end=" ", answer_start="A  ")
  with pytest.raises(ValueError, match="template .* but this evaluation uses"):
    ev.evaluate(
      bigram_logits,
      word_tokenizer,
      sets[:1],
      template=other_template,
      config=ev.EvalConfig(max_new_tokens=2, show_progress=False),
      retain_reference=reference,
    )
  same = run(word_tokenizer, sets[:1]).summary
  assert same["forget_quality"] is None  # no reference given
  # Another tokenizer (class or vocabulary size), recorded in the reference, is refused too.
  bigger = dict(items, tokenizer=dict(items["tokenizer"], vocab_size=len(VOCAB) + 1))
  (tmp_path / "bigger.json").write_text(json.dumps(bigger))
  with pytest.raises(ValueError, match=r"tokenizer .*'vocab_size': \d+.* but this evaluation"):
    ev.evaluate(
      bigram_logits,
      word_tokenizer,
      sets[:1],
      template=TEMPLATE,
      config=ev.EvalConfig(max_new_tokens=2, show_progress=False),
      retain_reference=tmp_path / "bigger.json",
    )
  # A version-1 file (before the field) counts as "answer".
  del items["answer_boundary"]
  items["format"] = "dualoptax.tofu_eval_items/1"
  old = tmp_path / "old.json"
  old.write_text(json.dumps(items))
  assert ev.load_forget_reference(old).answer_boundary == "answer"
  np.testing.assert_allclose(
    ev.load_forget_truth_ratios(old, answer_boundary="answer"),
    [r["truth_ratio"] for r in items["sets"]["forget"]["items"]],
  )


def test_an_open_unlearning_reference_counts_as_open_unlearning(word_tokenizer, sets, tmp_path):
  path = tmp_path / "TOFU_EVAL.json"
  path.write_text(
    json.dumps({"forget_truth_ratio": {"value_by_index": {"0": {"score": 0.5}, "1": {"score": 2}}}})
  )
  with pytest.raises(ValueError, match="'open-unlearning' but this evaluation uses 'answer'"):
    ev.load_forget_truth_ratios(path, answer_boundary="answer")
  config = ev.EvalConfig(max_new_tokens=2, show_progress=False, answer_boundary="open-unlearning")
  result = ev.evaluate(
    bigram_logits, word_tokenizer, sets[:1], template=TEMPLATE, config=config, retain_reference=path
  )
  s = result.summary
  assert 0 <= s["forget_quality"] <= 1
  assert s["forget_quality_reference_answer_boundary"] == "open-unlearning"
  assert any("records no template" in note for note in s["notes"])


# --- the real sentence encoder -----------------------------------------------


def test_cosine_with_the_real_minilm_encoder(minilm_folder):
  from models import bert

  encoder = bert.load_sentence_encoder(minilm_folder)
  generations = ["The capital of France is Paris.", "I like green apples.", ""]
  answers = ["Paris is the capital of France.", "Paris is the capital of France.", "Paris"]
  ours = ev.cosine_similarities(encoder, generations, answers)
  np.testing.assert_allclose(
    ours, bert.cosine_similarity_scores(encoder, generations, answers), atol=1e-6
  )
  assert ours[0] > 0.9 and ours[1] < 0.5 and np.all((0 <= ours) & (ours <= 1))
  counts = collections.Counter(np.round(ours, 3))
  assert len(counts) == 3
