"""The evaluator on hand-computed cases: a bigram model whose probabilities are powers of 2."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from train import evaluation as ev

LN2 = math.log(2.0)
VOCAB = ["<pad>", "<eos>", "<unk>", "Q", "A", "what", "color", "?", "red", "blue", "green"]
TOKEN = {t: i for i, t in enumerate(VOCAB)}
# P(next | prev) for the rows the tests use; the rest of each row is spread uniformly.
BIGRAM = {
  "A": {"red": 1 / 2, "blue": 1 / 4, "green": 1 / 8},
  "red": {"<eos>": 1 / 2},
  "blue": {"<eos>": 1 / 2},
  "green": {"<eos>": 1 / 4},
}
TEMPLATE = ev.PromptTemplate(question_start="Q ", question_end=" ", answer_start="A ")


def bigram_log_table() -> np.ndarray:
  table = np.full((len(VOCAB), len(VOCAB)), 1.0 / len(VOCAB))
  for prev, row in BIGRAM.items():
    rest = (1.0 - sum(row.values())) / (len(VOCAB) - len(row))
    table[TOKEN[prev]] = rest
    for nxt, p in row.items():
      table[TOKEN[prev], TOKEN[nxt]] = p
  assert np.allclose(table.sum(1), 1.0)
  return np.log(table).astype(np.float32)


LOG_TABLE = jnp.asarray(bigram_log_table())


def bigram_logits(input_ids, attention_mask):
  del attention_mask
  return LOG_TABLE[input_ids]


@pytest.fixture(scope="module")
def word_tokenizer():
  tok = Tokenizer(models.WordLevel(TOKEN, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
  )


class LogitsOnlyModel:
  """A ScoringModel without the fused `answer_nll`: the evaluator jits the NLL itself."""

  def logits(self, input_ids, attention_mask):
    return bigram_logits(input_ids, attention_mask)

  def generate(self, input_ids, attention_mask, max_new_tokens):
    return ev.FunctionModel(bigram_logits).generate(input_ids, attention_mask, max_new_tokens)


# --- tokenization -------------------------------------------------------------------------


def test_encode_answer_masks_the_prompt_and_appends_eos(word_tokenizer):
  prompt = TEMPLATE.prompt("what color ?")
  assert prompt == "Q what color ? A "
  e = ev.encode_answer(word_tokenizer, prompt, "red blue")
  assert e.input_ids == tuple(
    TOKEN[t] for t in ["Q", "what", "color", "?", "A", "red", "blue", "<eos>"]
  )
  assert e.num_prompt_tokens == 5 and e.num_answer_tokens == 3 and not e.truncated
  assert ev.encode_answer(word_tokenizer, prompt, "red", append_eos=False).num_answer_tokens == 1
  cut = ev.encode_answer(word_tokenizer, prompt, "red blue", max_length=6)
  assert cut.input_ids[-1] == TOKEN["red"] and cut.truncated
  with pytest.raises(ValueError, match="no answer token to score"):
    ev.encode_answer(word_tokenizer, prompt, "", append_eos=False)
  with pytest.raises(ValueError, match="no answer token to score"):
    ev.encode_answer(word_tokenizer, prompt, "red", max_length=5)
  with pytest.raises(ValueError, match="gives no token before the answer"):
    ev.encode_answer(word_tokenizer, "", "red")


def test_encode_answer_handles_a_boundary_token_merging_prompt_and_answer():
  # Byte-level BPE turns "Answer: " + "The" into "Answer", ":", "ĠThe": counting the
  # prompt's own tokens would mask "ĠThe" (the prompt alone ends in a lone "Ġ").
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    ["Question: hi\nAnswer: The cat sat."] * 5,
    trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ),
  )
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
  template = ev.get_prompt_template("phi")
  prompt = template.prompt("hi")
  assert prompt == "Question: hi\nAnswer: "
  e = ev.encode_answer(tokenizer, prompt, "The cat sat.")
  answer_ids = list(e.input_ids[e.num_prompt_tokens :])
  assert answer_ids[-1] == tokenizer.eos_token_id
  assert tokenizer.decode(answer_ids[:-1]) == " The cat sat."
  assert answer_ids[:-1] == tokenizer(" The cat sat.")["input_ids"]


def test_prompt_template_presets():
  assert ev.get_prompt_template("llama2-chat").prompt("Who?") == "[INST] Who? [/INST]"
  assert ev.get_prompt_template("plain").prompt("Who?") == "Who?\n"
  assert ev.get_prompt_template(TEMPLATE) is TEMPLATE
  with pytest.raises(
    ValueError, match=r"unknown prompt template 'gpt'; presets: \['llama2-chat', 'phi'"
  ):
    ev.get_prompt_template("gpt")


# --- scoring and generation ---------------------------------------------------------------


@pytest.mark.parametrize(
  "model", [ev.FunctionModel(bigram_logits), LogitsOnlyModel()], ids=["fused", "logits"]
)
def test_batched_answer_nll_is_the_hand_computed_value(word_tokenizer, model):
  prompt = TEMPLATE.prompt("what color ?")
  answers = ["green", "red", "blue", "red blue"]
  encoded = [ev.encode_answer(word_tokenizer, prompt, a) for a in answers]
  # Three rows per batch, lengths padded to multiples of 4, the last batch filled with copies.
  nll = ev.score_answers(model, encoded, pad_token_id=0, batch_size=3, length_multiple=4)
  p_blue_after_red = (1 - 1 / 2) / (len(VOCAB) - 1)
  expected = [
    2.5 * LN2,
    LN2,
    1.5 * LN2,
    -(math.log(1 / 2) + math.log(p_blue_after_red) + math.log(1 / 2)) / 3,
  ]
  np.testing.assert_allclose(nll, expected, rtol=1e-6)


def test_masked_mean_nll_ignores_prompt_padding_and_rows_without_targets():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]] * 2))
  ids = jnp.array([[0, 1, 0], [0, 0, 1]])
  target = jnp.array([[0, 1, 1], [0, 0, 0]])
  np.testing.assert_allclose(
    ev.masked_mean_nll(logits, ids, target), [-(math.log(0.5) + math.log(0.25)) / 2, 0.0], rtol=1e-6
  )


def test_greedy_generation_follows_the_argmax_and_stops_at_eos(word_tokenizer):
  prompts = [
    word_tokenizer(TEMPLATE.prompt(q))["input_ids"]
    for q in ["what color ?", "?", "what what what color"]
  ]
  out = ev.generate_greedy(
    ev.FunctionModel(bigram_logits),
    prompts,
    max_new_tokens=5,
    eos_token_id=TOKEN["<eos>"],
    pad_token_id=0,
    batch_size=2,
    length_multiple=8,
  )
  assert out == [[TOKEN["red"]]] * 3


def test_generation_with_left_padding_matches_unpadded_generation():
  # A causal model whose logits depend on all earlier (unmasked) tokens: left padding
  # must not change what it generates.
  rng = np.random.default_rng(0)
  emb, head = jnp.asarray(rng.normal(size=(20, 8))), jnp.asarray(rng.normal(size=(8, 20)))

  def causal_bag_of_words(params, ids, mask):
    e = params[0][ids] * mask[..., None]
    h = jnp.cumsum(e, axis=1) / jnp.maximum(jnp.cumsum(mask, axis=1), 1)[..., None]
    return jnp.tanh(h) @ params[1]

  model = ev.FunctionModel(causal_bag_of_words, params=(emb, head))
  prompts = [list(rng.integers(2, 20, size=n)) for n in (1, 3, 7, 4, 9)]
  kwargs = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0, length_multiple=4)
  batched = ev.generate_greedy(model, prompts, batch_size=4, **kwargs)
  one_by_one = [ev.generate_greedy(model, [p], batch_size=1, **kwargs)[0] for p in prompts]
  assert batched == one_by_one and all(len(g) == 6 for g in batched)


# --- metric definitions -------------------------------------------------------------------


def test_probability_and_truth_ratio_definitions():
  nll_answer = np.array([LN2, 1.5 * LN2])
  nll_perturbed = np.array([[1.5 * LN2, 2.5 * LN2], [2.5 * LN2, 2.5 * LN2]])
  np.testing.assert_allclose(ev.probability(nll_answer), [0.5, 2**-1.5])
  np.testing.assert_allclose(
    ev.normalized_probability(nll_answer, nll_perturbed),
    [0.5 / (0.5 + 2**-1.5 + 2**-2.5), 2**-1.5 / (2**-1.5 + 2 * 2**-2.5)],
  )
  ratios = ev.truth_ratio(nll_answer, nll_perturbed)
  np.testing.assert_allclose(ratios, [0.5, 0.5])
  np.testing.assert_allclose(
    ev.forget_truth_ratio_score(np.array([0.5, 4.0, 1.0])), (0.5 + 0.25 + 1) / 3
  )
  np.testing.assert_allclose(
    ev.truth_preference_score(np.array([0.5, 4.0, 0.0])), (0.5 + 0 + 1) / 3
  )


def test_rouge_l_recall_on_known_strings():
  recall = ev.rouge_l_recall(
    ["the cat on a mat", "he running", "", "Paris, France.", "nothing here"],
    ["The cat sat on the mat", "He runs fast", "anything", "paris", "x"],
  )
  # LCS "the cat on mat" = 4 of 6; stemming makes running/runs both "run": 2 of 3.
  np.testing.assert_allclose(recall, [4 / 6, 2 / 3, 0.0, 1.0, 0.0])
  with pytest.raises(ValueError, match="2 generations but 1 references"):
    ev.rouge_l_recall(["a", "b"], ["a"])


def test_forget_quality_is_the_two_sample_ks_p_value():
  a = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
  assert ev.forget_quality(a, a) == pytest.approx(1.0)
  # Disjoint samples of 5: D = 1, exact two-sided p = 2 / C(10, 5).
  assert ev.forget_quality(a, a + 1.0) == pytest.approx(2 / math.comb(10, 5))
  with pytest.raises(
    ValueError, match="retain_model_truth_ratios must be a non-empty finite array"
  ):
    ev.forget_quality(a, np.array([1.0, np.inf]))


def test_harmonic_mean_model_utility_forget_efficacy_and_ranking():
  assert ev.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
  assert ev.harmonic_mean([1.0, 0.0, 0.5]) == 0.0
  with pytest.raises(ValueError, match="non-negative finite"):
    ev.harmonic_mean([1.0, -0.5])
  nine = {f"s{i}": v for i, v in enumerate([0.5, 0.25, 1.0, 0.5, 0.5, 0.25, 1.0, 1.0, 0.125])}
  assert ev.model_utility(nine) == pytest.approx(9 / (2 + 4 + 1 + 2 + 2 + 4 + 1 + 1 + 8))
  assert ev.forget_efficacy({"a": 0.2, "b": 0.4, "c": 0.6}) == pytest.approx(0.6)
  assert ev.ranking_score(0.6, 0.2) == pytest.approx(0.4)


# --- the whole evaluator on hand-made files -----------------------------------------------


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path)


@pytest.fixture()
def hand_sets(tmp_path):
  qa = [
    {
      "task_id": "1",
      "question": "what color ?",
      "answer": "red",
      "paraphrased_answer": "blue",
      "perturbed_answer": ["green", "blue"],
    },
    {
      "task_id": "1",
      "question": "what ?",
      "answer": "blue",
      "paraphrased_answer": "red",
      "perturbed_answer": ["green"],
    },
    {
      "task_id": "2",
      "question": "?",
      "answer": "red",
      "paraphrased_answer": "red",
      "perturbed_answer": ["red"],
    },
  ]
  forget = write_jsonl(tmp_path / "forget_perturbed.json", qa)
  retain = write_jsonl(
    tmp_path / "retain_perturbed.json",
    [{k: v for k, v in r.items() if k != "task_id"} for r in qa[:2]],
  )
  real = write_jsonl(
    tmp_path / "real_authors_perturbed.json",
    [
      {
        "question": "what color ?",
        "answer": "red",
        "perturbed_answer": ["blue", "green"],
        "original_answer": "x",
      }
    ],
  )
  world = write_jsonl(
    tmp_path / "world_facts_perturbed.json",
    [
      {
        "question": "what color ?",
        "answer": "red",
        "perturbed_answer": ["green"],
        "original_answer": "y",
      }
    ],
  )
  return (
    ev.EvalSetSpec("forget", forget, "forget", task_id=1),
    ev.EvalSetSpec("retain", retain, "retain"),
    ev.EvalSetSpec("real_authors", real, "real_authors"),
    ev.EvalSetSpec("world_facts", world, "world_facts"),
  )


class ExactMatch:
  """A pluggable forget-efficacy term (stands in for the paper's cosine / entailment)."""

  name = "exact_match"

  def __call__(self, generations, answers, questions):
    assert len(questions) == len(answers)
    return [float(g == a) for g, a in zip(generations, answers)]


def test_evaluate_reproduces_every_hand_computed_value(word_tokenizer, hand_sets, tmp_path):
  config = ev.EvalConfig(batch_size=2, max_new_tokens=4, length_multiple=4, show_progress=False)
  result = ev.evaluate(
    bigram_logits,
    word_tokenizer,
    hand_sets,
    template=TEMPLATE,
    config=config,
    forget_efficacy_terms=[ExactMatch()],
  )
  forget = result.sets["forget"]
  assert [i.index for i in forget.items] == [0, 1]  # task_id=1 only
  np.testing.assert_allclose(forget.nll_answer, [LN2, 1.5 * LN2], rtol=1e-6)
  np.testing.assert_allclose(forget.nll_paraphrased, [1.5 * LN2, LN2], rtol=1e-6)
  np.testing.assert_allclose(forget.nll_perturbed[0], [2.5 * LN2, 1.5 * LN2], rtol=1e-6)
  np.testing.assert_allclose(forget.probability, [0.5, 2**-1.5], rtol=1e-6)
  r_forget = [2**-0.5, 2**-1.5]
  np.testing.assert_allclose(forget.truth_ratio, r_forget, rtol=1e-6)
  assert forget.generations == ("red", "red")
  np.testing.assert_allclose(forget.rouge_l_recall, [1.0, 0.0])

  s = result.summary["sets"]
  assert s["forget"]["truth_ratio"] == pytest.approx(
    np.mean(r_forget), rel=1e-6
  )  # R < 1: min(R, 1/R) = R
  assert s["retain"]["truth_ratio"] == pytest.approx(np.mean([1 - r for r in r_forget]), rel=1e-6)
  ra_prob = 0.5 / (0.5 + 2**-1.5 + 2**-2.5)
  assert s["real_authors"]["probability"] == pytest.approx(ra_prob, rel=1e-6)
  assert s["real_authors"]["truth_ratio"] == pytest.approx(0.5, rel=1e-6)  # R = 2^-2 / 2^-1
  wf_prob = 0.5 / (0.5 + 2**-2.5)
  assert s["world_facts"]["truth_ratio"] == pytest.approx(1 - 2**-1.5, rel=1e-6)

  utility = [
    np.mean([0.5, 2**-1.5]),
    0.5,
    np.mean([1 - r for r in r_forget]),
    ra_prob,
    1.0,
    0.5,
    wf_prob,
    1.0,
    1 - 2**-1.5,
  ]
  assert result.summary["model_utility"] == pytest.approx(
    len(utility) / sum(1 / u for u in utility), rel=1e-6
  )
  knowledge = [np.mean([0.5, 2**-1.5]), 0.5, 1 - np.mean(r_forget), 0.5]  # + exact_match [1, 0]
  assert result.summary["forget_efficacy_terms"] == pytest.approx(
    dict(
      zip(
        [
          "forget.probability",
          "forget.rouge_l_recall",
          "1 - forget.truth_ratio",
          "forget.exact_match",
        ],
        knowledge,
      )
    ),
    rel=1e-6,
  )
  assert result.summary["forget_efficacy"] == pytest.approx(1 - np.mean(knowledge), rel=1e-6)
  assert result.summary["forget_efficacy_terms_not_used"] == [
    "cosine_similarity",
    "entailment_score",
  ]
  assert result.summary["ranking_score"] == pytest.approx(
    (result.summary["forget_efficacy"] + result.summary["model_utility"]) / 2
  )
  assert result.summary["forget_quality"] is None and result.summary["notes"]

  # Outputs: per-item JSON (enough to recompute forget quality later), summary, table.
  paths = result.write(tmp_path / "out")
  items = json.loads(open(paths["items"]).read())
  row = items["sets"]["forget"]["items"][1]
  assert row["index"] == 1 and row["line_number"] == 2 and row["generation"] == "red"
  assert row["nll_perturbed"] == pytest.approx([2.5 * LN2], rel=1e-6)
  assert (
    row["exact_match"] == 0.0
    and items["sets"]["real_authors"]["items"][0]["nll_paraphrased"] is None
  )
  np.testing.assert_allclose(ev.load_forget_truth_ratios(paths["items"]), r_forget, rtol=1e-6)
  summary = json.loads(open(paths["summary"]).read())
  assert summary["model_utility"] == pytest.approx(result.summary["model_utility"])
  table = open(paths["table"]).read()
  assert table == ev.markdown_table(summary) == result.markdown_table()
  assert "| forget (mean min(R, 1/R)) | 2 | 0.4268 | 0.5000 | 0.5303 |" in table

  # Forget quality against a saved "retain model" evaluation (here: the same model -> p = 1).
  again = ev.evaluate(
    ev.FunctionModel(bigram_logits),
    word_tokenizer,
    hand_sets[:1],
    template=TEMPLATE,
    config=config,
    retain_reference=paths["items"],
  )
  assert again.summary["forget_quality"] == pytest.approx(1.0)
  assert again.summary["model_utility"] is None and "real_authors" in " ".join(
    again.summary["notes"]
  )


def test_forget_truth_ratios_from_an_open_unlearning_file(tmp_path):
  path = tmp_path / "TOFU_EVAL.json"
  path.write_text(
    json.dumps(
      {
        "forget_truth_ratio": {
          "agg_value": 0.5,
          "value_by_index": {"10": {"score": 3.0}, "2": {"score": 1.0}, "7": {"score": 2.0}},
        }
      }
    )
  )
  np.testing.assert_allclose(ev.load_forget_truth_ratios(path), [1.0, 2.0, 3.0])
  bad = tmp_path / "other.json"
  bad.write_text("[1, 2]")
  with pytest.raises(ValueError, match="neither a"):
    ev.load_forget_truth_ratios(bad)


def test_without_generation_rouge_and_utility_are_missing(word_tokenizer, hand_sets):
  config = ev.EvalConfig(generate=False, show_progress=False, max_items=1)
  result = ev.evaluate(bigram_logits, word_tokenizer, hand_sets, template=TEMPLATE, config=config)
  assert all(r.generations is None and len(r.items) == 1 for r in result.sets.values())
  assert result.summary["model_utility"] is None and result.summary["ranking_score"] is None
  assert list(result.summary["forget_efficacy_terms"]) == [
    "forget.probability",
    "1 - forget.truth_ratio",
  ]
  assert "–" in result.markdown_table()
  with pytest.raises(ValueError, match="need generations"):
    ev.evaluate(
      bigram_logits,
      word_tokenizer,
      hand_sets,
      template=TEMPLATE,
      config=config,
      forget_efficacy_terms=[ExactMatch()],
    )


def test_configuration_errors_name_the_bad_value(word_tokenizer, hand_sets):
  with pytest.raises(ValueError, match="EvalConfig.batch_size must be >= 1, got 0"):
    ev.EvalConfig(batch_size=0)
  with pytest.raises(ValueError, match=r"set names must be unique, got \['forget', 'forget'\]"):
    ev.evaluate(bigram_logits, word_tokenizer, [hand_sets[0]] * 2, template=TEMPLATE)
  with pytest.raises(ValueError, match="role of set 'x' must be one of"):
    ev.EvalSetSpec("x", "x.json", "holdout")
  with pytest.raises(TypeError, match="expected a ScoringModel or a logits function"):
    ev.as_scoring_model(42)
