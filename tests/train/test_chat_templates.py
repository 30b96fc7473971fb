"""Chat templates: prompts from the tokenizer's own template, answers scored up to and
including its end-of-turn token (and nothing the template writes after it).

SmolLM2's real tokenizer (ChatML) when its GGUF is available; tokenizers trained here with
Llama-3-like and Phi-3-like templates always, so CI covers the logic without the file.
"""

import copy
import json
import pathlib

import numpy as np
import pytest
import transformers

from train import data
from train import evaluation as ev
from train.data import tofu
from train.data import tokenizer as tokenizer_lib

QUESTION = "Where was Basil Mahfouz Al-Kuwaiti born?"
ANSWERS = ("The cat sat on the mat.", "Basil Mahfouz Al-Kuwaiti was born in Kuwait City, 1932.")

# Jinja templates written after the real ones' structure.
LLAMA3_LIKE = (
  "{{ bos_token }}{% for m in messages %}"
  "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
  " + '<|eot_id|>' }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
  "{% endif %}"
)
LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# No BOS; without a generation prompt it ends with EOS, after the end-of-turn token.
PHI3_LIKE = (
  "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
  "{% else %}{{ eos_token }}{% endif %}"
)
PHI3_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# The answer is followed by plain text only: no end-of-turn token to find.
NO_SPECIAL_AFTER_ANSWER = (
  "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
  "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def base_tokenizer():
  """A byte-level BPE trained here; it adds BOS (``<s>``) when asked for special tokens."""
  texts = [QUESTION, *ANSWERS, "user assistant system You are terse."] * 4
  return tokenizer_lib.train_tokenizer(texts, vocab_size=400)


def with_chat_template(tokenizer, template, special_tokens=()):
  tokenizer = copy.deepcopy(tokenizer)
  tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
  tokenizer.chat_template = template
  return tokenizer


def scored_text(tokenizer, encoded):
  return tokenizer.decode(encoded.input_ids[encoded.num_prompt_tokens :])


def rendered_ids(tokenizer, messages, **kwargs):
  text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
  return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- SmolLM2 (ChatML) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
  path = pathlib.Path(smollm2_gguf)
  return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_scores_exactly_the_answer_and_im_end(smollm2_tokenizer):
  tok = smollm2_tokenizer
  encoder = ev.PromptEncoder.create("chat", tok)
  assert encoder.end_token_id == tok.convert_tokens_to_ids("<|im_end|>")
  prompt = encoder.prompt(QUESTION)
  assert prompt.endswith("<|im_start|>assistant\n") and QUESTION in prompt
  for answer in ANSWERS:
    encoded = encoder.encode_answer(prompt, answer)
    assert scored_text(tok, encoded) == answer + "<|im_end|>"
    prompt_ids = list(encoded.input_ids[: encoded.num_prompt_tokens])
    assert prompt_ids == encoder.encode_prompt(prompt)
    assert tok.decode(prompt_ids) == prompt
    # The template's own rendering of the answered conversation: our sequence is all of it
    # but the newline the template writes after <|im_end|>.
    full = rendered_ids(
      tok, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]
    )
    assert full[: len(encoded.input_ids)] == list(encoded.input_ids)
    assert tok.decode(full[len(encoded.input_ids) :]) == "\n"


def test_smollm2_answer_merging_with_the_prompt_newline(smollm2_tokenizer):
  tok = smollm2_tokenizer
  encoder = ev.PromptEncoder.create("chat", tok)
  prompt = encoder.prompt(QUESTION)
  prompt_ids = encoder.encode_prompt(prompt)
  answer = "  Kuwait City."  # byte-level BPE merges "\n" + " " into one token
  encoded = encoder.encode_answer(prompt, answer)
  assert encoded.num_prompt_tokens == len(prompt_ids) - 1  # the merged token is scored
  assert tok.decode(encoded.input_ids) == prompt + answer + "<|im_end|>"
  assert scored_text(tok, encoded) == "\n" + answer + "<|im_end|>"


def test_smollm2_truncation_cuts_answer_tokens_then_refuses_no_answer(smollm2_tokenizer):
  tok = smollm2_tokenizer
  encoder = ev.PromptEncoder.create("chat", tok)
  prompt = encoder.prompt(QUESTION)
  whole = encoder.encode_answer(prompt, ANSWERS[1])
  cut = encoder.encode_answer(prompt, ANSWERS[1], max_length=whole.num_prompt_tokens + 2)
  assert cut.truncated and not whole.truncated and cut.num_answer_tokens == 2
  assert cut.input_ids == whole.input_ids[: whole.num_prompt_tokens + 2]
  assert encoder.end_token_id not in cut.input_ids[cut.num_prompt_tokens :]
  with pytest.raises(ValueError, match="no answer token to score"):
    encoder.encode_answer(prompt, ANSWERS[1], max_length=whole.num_prompt_tokens)


def test_smollm2_evaluation_truncation_keeps_im_end(smollm2_tokenizer):
  tok = smollm2_tokenizer
  encoder = ev.PromptEncoder.create("chat", tok)
  prompt = encoder.prompt(QUESTION)
  whole = encoder.encode_answer(prompt, ANSWERS[1])
  cap = whole.num_prompt_tokens + 2
  cut = encoder.encode_answer(prompt, ANSWERS[1], max_length=cap, end_after_cut=True)
  assert cut.truncated and cut.num_answer_tokens == 3 and len(cut.input_ids) == cap + 1
  assert cut.input_ids[:cap] == whole.input_ids[:cap]
  assert cut.input_ids[-1] == encoder.end_token_id


def test_smollm2_open_unlearning_scores_the_rendered_turn_and_eos(smollm2_tokenizer):
  # open-unlearning tokenizes the whole rendered conversation (answer, <|im_end|>, newline)
  # and appends EOS, which for SmolLM2-Instruct is <|im_end|> again.
  tok = smollm2_tokenizer
  encoder = ev.PromptEncoder.create("chat", tok, "open-unlearning")
  prompt = encoder.prompt(QUESTION)
  for answer in ANSWERS:
    encoded = encoder.encode_answer(prompt, answer)
    full = rendered_ids(
      tok, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer}]
    )
    assert list(encoded.input_ids) == full + [tok.eos_token_id]
    assert encoded.num_prompt_tokens == len(encoder.encode_prompt(prompt))
    assert scored_text(tok, encoded) == answer + "<|im_end|>\n" + tok.eos_token
  assert encoder.stop_token_ids[0] == tok.convert_tokens_to_ids("<|im_end|>")


def test_smollm2_bos_adding_template_gives_one_bos_and_the_same_answer(smollm2_tokenizer):
  plain = ev.PromptEncoder.create("chat", smollm2_tokenizer)
  with_bos = copy.deepcopy(smollm2_tokenizer)
  with_bos.chat_template = "{{ bos_token }}" + smollm2_tokenizer.chat_template
  encoder = ev.PromptEncoder.create("chat", with_bos)
  for answer in ANSWERS:
    expected = plain.encode_answer(plain.prompt(QUESTION), answer)
    encoded = encoder.encode_answer(encoder.prompt(QUESTION), answer)
    assert encoded.input_ids == (with_bos.bos_token_id, *expected.input_ids)
    assert encoded.num_answer_tokens == expected.num_answer_tokens


# --- Tokenizers trained here ------------------------------------------------------------------


def test_llama3_like_template_one_bos_and_eot_id(base_tokenizer):
  tok = with_chat_template(base_tokenizer, LLAMA3_LIKE, LLAMA3_TOKENS)
  assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer would add a second BOS
  encoder = ev.PromptEncoder.create(ev.ChatTemplate(system_prompt="You are terse."), tok)
  assert encoder.end_token_id == tok.convert_tokens_to_ids("<|eot_id|>")
  assert encoder.stop_token_ids == (encoder.end_token_id, tok.eos_token_id)
  prompt = encoder.prompt(QUESTION)
  assert prompt.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.")
  for answer in ANSWERS:
    encoded = encoder.encode_answer(prompt, answer)
    assert encoded.input_ids.count(tok.bos_token_id) == 1 and encoded.input_ids[0] == 1
    assert scored_text(tok, encoded) == answer + "<|eot_id|>"
    answered = [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": QUESTION},
      {"role": "assistant", "content": answer},
    ]
    assert list(encoded.input_ids) == rendered_ids(tok, answered)  # nothing after <|eot_id|>


def test_phi3_like_template_ends_at_end_not_eos_and_adds_no_bos(base_tokenizer):
  tok = with_chat_template(base_tokenizer, PHI3_LIKE, PHI3_TOKENS)
  encoder = ev.PromptEncoder.create("chat", tok)
  end = tok.convert_tokens_to_ids("<|end|>")
  assert encoder.end_token_id == end != tok.eos_token_id
  assert encoder.stop_token_ids == (end, tok.eos_token_id)
  prompt = encoder.prompt(QUESTION)
  assert prompt == f"<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n"
  for answer in ANSWERS:
    encoded = encoder.encode_answer(prompt, answer)
    assert tok.bos_token_id not in encoded.input_ids  # the template has none
    assert scored_text(tok, encoded) == answer + "<|end|>"
    assert tok.eos_token_id not in encoded.input_ids  # the "\n</s>" after <|end|> is not
    unscored = encoded.input_ids[: encoded.num_prompt_tokens]
    assert tok.decode(unscored) == prompt
  no_end = encoder.encode_answer(prompt, ANSWERS[0], append_eos=False)
  assert scored_text(tok, no_end) == ANSWERS[0]


def test_chat_errors_name_the_tokenizer_and_the_fix(base_tokenizer):
  with pytest.raises(ValueError, match=r"needs a tokenizer with a chat template.*has none"):
    ev.PromptEncoder.create("chat", base_tokenizer)
  plain_text = with_chat_template(base_tokenizer, NO_SPECIAL_AFTER_ANSWER)
  with pytest.raises(ValueError, match=r"cannot find the end-of-turn token.*end_of_turn="):
    ev.PromptEncoder.create("chat", plain_text)
  # An explicit end-of-turn token serves such a template.
  encoder = ev.PromptEncoder.create(ev.ChatTemplate(end_of_turn="</s>"), plain_text)
  prompt = encoder.prompt(QUESTION)
  assert prompt == f"user: {QUESTION}\nassistant: "
  assert scored_text(plain_text, encoder.encode_answer(prompt, ANSWERS[0])) == ANSWERS[0] + "</s>"
  with pytest.raises(ValueError, match=r"end-of-turn token 'the end' is not one token"):
    ev.PromptEncoder.create(ev.ChatTemplate(end_of_turn="the end"), plain_text)
  failing = with_chat_template(base_tokenizer, "{{ raise_exception('no system role') }}")
  with pytest.raises(
    ValueError, match=r"\(unnamed\)'.* fails on the roles \['user', 'assis.*no sys"
  ):
    ev.PromptEncoder.create("chat", failing)


def test_chat_is_a_template_name_and_presets_are_unchanged(base_tokenizer):
  assert ev.get_prompt_template("chat") == ev.ChatTemplate()
  with pytest.raises(ValueError, match=r"presets: \[.*\], or 'chat'"):
    ev.get_prompt_template("chatml")
  phi = ev.PromptEncoder.create("phi", base_tokenizer)
  assert phi.add_special_tokens and phi.end_token_id == base_tokenizer.eos_token_id
  assert phi.stop_token_ids == (base_tokenizer.eos_token_id,)
  assert phi.prompt("Who?") == "Question: Who?\nAnswer: "
  assert phi.describe() == {
    "question_start": "Question: ",
    "question_end": "\n",
    "answer_start": "Answer: ",
    "system_prompt": "",
  }


# --- Evaluation ------------------------------------------------------------------------------


class ScriptedModel:
  """Uniform logits; generates a fixed token script (an answer, the end-of-turn token, more)."""

  def __init__(self, vocab_size, script):
    self.vocab_size, self.script = vocab_size, np.asarray(script, np.int32)

  def logits(self, input_ids, attention_mask):
    return np.zeros((*np.shape(input_ids), self.vocab_size), np.float32)

  def generate(self, input_ids, attention_mask, max_new_tokens):
    return np.tile(self.script[:max_new_tokens], (np.shape(input_ids)[0], 1))


def test_evaluation_generations_stop_at_the_end_of_turn_token(base_tokenizer, tmp_path):
  tok = with_chat_template(base_tokenizer, PHI3_LIKE, PHI3_TOKENS)
  rows = [
    {"question": q, "answer": a, "paraphrased_answer": a, "perturbed_answer": ["No.", "Yes."]}
    for q, a in [(QUESTION, ANSWERS[1]), ("Who?", ANSWERS[0])]
  ]
  path = tmp_path / "forget.json"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  reply = tok("Kuwait City", add_special_tokens=False)["input_ids"]
  after = tok("\n<|user|>\nmore text", add_special_tokens=False)["input_ids"]
  model = ScriptedModel(len(tok), reply + [tok.convert_tokens_to_ids("<|end|>")] + after)
  config = ev.EvalConfig(batch_size=2, max_new_tokens=12, length_multiple=8, show_progress=False)
  result = ev.evaluate(
    model,
    tok,
    [ev.EvalSetSpec("forget", str(path), "forget", None)],
    template="chat",
    config=config,
  )
  assert result.sets["forget"].generations == ("Kuwait City", "Kuwait City")
  template = result.summary["template"]
  assert template["kind"] == "chat" and template["end_of_turn"] == "<|end|>"
  # Uniform logits: every scored token (answer and <|end|>) costs log(vocab).
  np.testing.assert_allclose(result.sets["forget"].nll_answer, np.log(len(tok)), rtol=1e-5)


def test_qa_dataset_with_chat_template_masks_the_generation_prompt(base_tokenizer):
  tok = with_chat_template(base_tokenizer, LLAMA3_LIKE, LLAMA3_TOKENS)
  items = [tofu.TofuItem(k, k + 1, QUESTION, a) for k, a in enumerate(ANSWERS)]
  dataset = data.QADataset(items, tok, data.TokenizationConfig("chat"), idk_answers=("No idea.",))
  batch = dataset.batch([0, 1], idk_choices=[0, 0])
  for row, answer in enumerate(ANSWERS):
    for qa, text in ((batch.answers, answer), (batch.idk, "No idea.")):
      assert tok.decode(qa.labels[row][qa.loss_mask[row]]) == text + "<|eot_id|>"
      unscored = qa.input_ids[row][(~qa.loss_mask[row]) & (qa.attention_mask[row] == 1)]
      assert tok.decode(unscored) == dataset.encoder.prompt(QUESTION)
