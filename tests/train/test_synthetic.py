"""The synthetic TOFU-format benchmark and the offline tokenizer: determinism, format, sizes."""

import json
import os
import pathlib

import pytest

from train.data import synthetic, tofu
from train.data import tokenizer as tokenizer_lib
from train.data.prompting import encode_answer, get_prompt_template

REAL_TOFU = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tofu"

DEFAULT_FILES = {
  "forget10.json",
  "forget10_perturbed.json",
  "retain90.json",
  "retain_perturbed.json",
  "real_authors_perturbed.json",
  "world_facts_perturbed.json",
  "idontknow.jsonl",
}


def read_rows(path):
  return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def file_bytes(folder):
  return {name: (pathlib.Path(folder) / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_same_seed_writes_identical_bytes_and_another_seed_differs(tmp_path, data_dir):
  again = synthetic.write_synthetic_tofu(tmp_path / "again", seed=0, num_tasks=3)
  other = synthetic.write_synthetic_tofu(tmp_path / "other", seed=1, num_tasks=3)
  assert set(os.listdir(again)) == DEFAULT_FILES
  assert file_bytes(again) == file_bytes(data_dir)
  assert file_bytes(other)["forget10.json"] != file_bytes(data_dir)["forget10.json"]


def test_default_files_load_through_tofu_with_the_evaluation_keys(data_dir):
  forget = tofu.load_tofu(
    os.path.join(data_dir, "forget10_perturbed.json"), required_keys=tofu.PARAPHRASE_KEYS
  )
  assert len(forget) == 3 * 2 * 10  # 3 tasks x 2 authors (10 % of 20) x 10 facts
  assert [sum(i.task_id == t for i in forget) for t in (1, 2, 3)] == [20, 20, 20]
  assert len(tofu.load_tofu(os.path.join(data_dir, "retain90.json"))) == 18 * 10
  assert (
    len(
      tofu.load_tofu(
        os.path.join(data_dir, "retain_perturbed.json"), required_keys=tofu.PARAPHRASE_KEYS
      )
    )
    == 4 * 10
  )
  for name in ("real_authors_perturbed.json", "world_facts_perturbed.json"):
    for item in tofu.load_tofu(os.path.join(data_dir, name), required_keys=tofu.OPTION_KEYS):
      assert len(item.perturbed_answers) == 3 and item.answer not in item.perturbed_answers
      assert item.original_answer
  idk = open(os.path.join(data_dir, "idontknow.jsonl"), encoding="utf-8").read().splitlines()
  assert idk == list(synthetic.IDK_ANSWERS)


def test_every_fact_has_a_paraphrase_and_five_distinct_wrong_answers(data_dir):
  for name in ("forget10_perturbed.json", "retain_perturbed.json"):
    for item in tofu.load_tofu(os.path.join(data_dir, name), required_keys=tofu.PARAPHRASE_KEYS):
      perturbed = item.perturbed_answers
      assert len(perturbed) == 5 and len(set(perturbed)) == 5
      assert item.paraphrased_answer not in perturbed and item.paraphrased_answer != item.answer
      assert item.paraphrased_question and item.paraphrased_question != item.question


def test_question_files_match_their_perturbed_files(data_dir):
  plain = read_rows(os.path.join(data_dir, "forget10.json"))
  perturbed = read_rows(os.path.join(data_dir, "forget10_perturbed.json"))
  assert plain == [{k: row[k] for k in ("task_id", "question", "answer")} for row in perturbed]
  retain = {row["question"] for row in read_rows(os.path.join(data_dir, "retain90.json"))}
  assert {
    row["question"] for row in read_rows(os.path.join(data_dir, "retain_perturbed.json"))
  } <= retain


def test_task_1_is_disjoint_from_retain_and_later_tasks_lie_inside_it_as_in_tofu(data_dir):
  forget = tofu.load_tofu(os.path.join(data_dir, "forget10.json"))
  retain = {i.question for i in tofu.load_tofu(os.path.join(data_dir, "retain90.json"))}
  task_questions = {t: {i.question for i in forget if i.task_id == t} for t in (1, 2, 3)}
  assert not task_questions[1] & retain
  assert task_questions[2] <= retain and task_questions[3] <= retain
  assert len(retain | task_questions[1]) == 20 * 10  # every author, each question once


@pytest.mark.skipif(not REAL_TOFU.is_dir(), reason=f"real TOFU copy not found at {REAL_TOFU}")
def test_rows_have_the_same_keys_as_the_real_tofu_files(data_dir):
  pairs = {
    "forget10.json": "forget10.json",
    "forget10_perturbed.json": "forget10_perturbed.json",
    "retain90.json": "retain90.json",
    "retain_perturbed.json": "retain_perturbed.json",
    "real_authors_perturbed.json": "real_authors_perturbed.json",
    "world_facts_perturbed.json": "world_facts_perturbed.json",
  }
  for ours, theirs in pairs.items():
    with open(REAL_TOFU / theirs, encoding="utf-8") as f:
      real_row = json.loads(f.readline())
    assert set(read_rows(os.path.join(data_dir, ours))[0]) == set(real_row), ours
    assert type(read_rows(os.path.join(data_dir, ours))[0].get("task_id")) is type(
      real_row.get("task_id")
    ), ours


def test_default_has_one_forget_task(tmp_path):
  folder = synthetic.write_synthetic_tofu(tmp_path)
  assert set(os.listdir(folder)) == DEFAULT_FILES
  forget = tofu.load_tofu(os.path.join(folder, "forget10.json"))
  assert len(forget) == 2 * 10 and {i.task_id for i in forget} == {1}


def test_sizes_are_configurable(tmp_path):
  folder = synthetic.write_synthetic_tofu(
    tmp_path,
    seed=3,
    num_authors=10,
    facts_per_author=12,
    forget_percent=20,
    num_tasks=2,
    retain_eval_authors=100,
  )
  assert {"forget20.json", "retain80.json"} <= set(os.listdir(folder))
  assert len(tofu.load_tofu(os.path.join(folder, "forget20.json"), task_id=2)) == 2 * 12
  assert len(tofu.load_tofu(os.path.join(folder, "retain80.json"))) == 8 * 12
  assert len(tofu.load_tofu(os.path.join(folder, "retain_perturbed.json"))) == 8 * 12  # capped


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"facts_per_author": 13}, r"facts_per_author must be in \[1, 12\], got 13"),
    ({"forget_percent": 0}, r"forget_percent must be in \[1, 99\], got 0"),
    ({"num_authors": 1}, r"num_authors must be in \[2, 450\], got 1"),
    ({"num_tasks": 10}, r"num_tasks=10 tasks of 2 forget author\(s\) leave no retain-only author"),
  ],
)
def test_bad_sizes_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    synthetic.SyntheticConfig(**kwargs)


def test_tokenizer_has_special_tokens_and_trains_deterministically(data_dir, trained_tokenizer):
  tok = trained_tokenizer
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
  assert len(tok) == 1024
  again = tokenizer_lib.train_tokenizer(
    tokenizer_lib.tofu_corpus_texts(data_dir, "phi"), vocab_size=1024
  )
  assert again.get_vocab() == tok.get_vocab()
  ids = tok("Where was Ada born?")["input_ids"]
  assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
  assert tok.decode(ids, skip_special_tokens=True) == "Where was Ada born?"
  assert (
    tok.decode(tok("naïve – 東京")["input_ids"], skip_special_tokens=True) == "naïve – 東京"
  )  # byte-level


def test_tokenizer_save_load_round_trip(tmp_path, trained_tokenizer):
  folder = tokenizer_lib.save_tokenizer(trained_tokenizer, tmp_path / "tok")
  loaded = tokenizer_lib.load_tokenizer(folder)
  text = "Question: When was Greta Velberg born?\nAnswer: "
  assert loaded(text)["input_ids"] == trained_tokenizer(text)["input_ids"]
  assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<s>", "</s>")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_tokenizer_rejects_bad_arguments():
  with pytest.raises(ValueError, match="vocab_size must be >= 259"):
    tokenizer_lib.train_tokenizer(["a"], vocab_size=100)
  with pytest.raises(ValueError, match="texts is empty"):
    tokenizer_lib.train_tokenizer([])


def test_every_scored_sequence_fits_in_64_tokens(data_dir, trained_tokenizer):
  template = get_prompt_template("phi")
  longest = 0
  for name in (
    "forget10_perturbed.json",
    "retain_perturbed.json",
    "real_authors_perturbed.json",
    "world_facts_perturbed.json",
  ):
    for item in tofu.load_tofu(os.path.join(data_dir, name)):
      prompt = template.prompt(item.question)
      for answer in (
        item.answer,
        item.paraphrased_answer,
        item.original_answer,
        *item.perturbed_answers,
      ):
        if answer is not None:
          encoded = encode_answer(trained_tokenizer, prompt, answer)
          longest = max(longest, len(encoded.input_ids))
  assert longest <= 64
