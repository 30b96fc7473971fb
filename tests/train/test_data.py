"""Unlearning training data: splits, masking, shuffling, the samplers' schedule and resumption."""

import copy
import dataclasses
import itertools
import json
import pathlib
import re
import shutil

import numpy as np
import pytest

from train import data
from train.data import synthetic, tofu
from train.data import tokenizer as tokenizer_lib

REAL_DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def splits(data_dir):
  return data.load_unlearning_data(data_dir, "forget10", task_id=1)


def make_streams(splits, trained_tokenizer, seed=0, forget_batch=4, retain_batch=8):
  return data.make_batch_streams(
    splits,
    trained_tokenizer,
    data.TokenizationConfig("phi"),
    data.BatchingConfig(forget_batch, seed=seed),
    data.BatchingConfig(retain_batch, seed=seed),
  )


def assert_batches_equal(a: data.QABatch, b: data.QABatch):
  assert a.epoch == b.epoch
  for x, y in ((a.answers, b.answers), (a.idk, b.idk), (a.mismatch, b.mismatch)):
    assert (x is None) == (y is None)
    if x is not None:
      for name in ("input_ids", "attention_mask", "labels", "item_indices"):
        np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


def test_objective_ids_are_the_optimizers():
  import dualoptax

  assert (data.FORGET, data.RETAIN) == (dualoptax.FORGET, dualoptax.RETAIN)
  # train.data re-exports dualoptax's ids: nothing under train/ assigns its own.
  assignment = re.compile(r"^\s*(FORGET|RETAIN)\b[ \t\w,]*=(?!=)", re.MULTILINE)
  train_dir = pathlib.Path(data.__file__).parents[1]
  assert [p for p in train_dir.rglob("*.py") if assignment.search(p.read_text())] == []


# --- Splits ------------------------------------------------------------------------------


def test_retain_split_is_the_complement_when_present_else_retain90(tmp_path):
  for name in ("retain90.json", "retain99.json"):
    (tmp_path / name).write_text('{"question": "q?", "answer": "a."}\n')
  assert data.complement_retain_split("forget05") == "retain95"
  assert data.resolve_retain_split(tmp_path, "forget01") == "retain99"
  assert data.resolve_retain_split(tmp_path, "forget05") == "retain90"  # no retain95: fallback
  assert data.resolve_retain_split(tmp_path, "forget01", "retain90") == "retain90"
  with pytest.raises(
    FileNotFoundError, match=r"no retain split 'retain50'.*present: \['retain90.json', 're"
  ):
    data.resolve_retain_split(tmp_path, "forget01", "retain50")
  with pytest.raises(ValueError, match=r"forget_split must look like 'forget01'.*got 'forget1'"):
    data.resolve_retain_split(tmp_path, "forget1")


def test_load_selects_the_task_and_removes_its_questions_from_retain(data_dir, splits):
  assert (len(splits.forget), len(splits.retain), splits.num_retain_removed) == (20, 180, 0)
  assert splits.retain_split == "retain90" and splits.idk_answers == synthetic.IDK_ANSWERS
  task2 = data.load_unlearning_data(data_dir, "forget10", task_id=2)
  assert {i.task_id for i in task2.forget} == {2} and task2.num_retain_removed == 20
  assert not {i.question for i in task2.forget} & {i.question for i in task2.retain}
  kept = data.load_unlearning_data(
    data_dir, "forget10", task_id=2, exclude_forget_from_retain=False
  )
  assert len(kept.retain) == 180
  every_task = data.load_unlearning_data(data_dir, "forget10", task_id=None)
  assert len(every_task.forget) == 60
  with pytest.raises(
    tofu.TofuFormatError, match=r"no row has task_id=7; the file has task ids \[1, 2, 3\]"
  ):
    data.load_unlearning_data(data_dir, "forget10", task_id=7)
  with pytest.raises(
    FileNotFoundError, match=r"no forget split 'forget05'.*present: \['forget10.json'"
  ):
    data.load_unlearning_data(data_dir, "forget05")


def test_idk_file_is_found_in_the_parent_folder_or_given(tmp_path, data_dir):
  tofu_dir = tmp_path / "tofu"  # the ../shared/data layout: data/tofu/*.json, data/idontknow.jsonl
  shutil.copytree(data_dir, tofu_dir, ignore=shutil.ignore_patterns("idontknow.jsonl"))
  assert data.load_unlearning_data(tofu_dir, "forget10").idk_answers == ()
  (tmp_path / "idontknow.jsonl").write_text("Not known.\n\n  No idea.  \n")
  assert data.load_unlearning_data(tofu_dir, "forget10").idk_answers == ("Not known.", "No idea.")
  (tmp_path / "mine.txt").write_text("Pass.\n")
  assert data.load_unlearning_data(
    tofu_dir, "forget10", idk_path=tmp_path / "mine.txt"
  ).idk_answers == ("Pass.",)
  (tmp_path / "empty.txt").write_text("\n")
  with pytest.raises(ValueError, match="empty.txt: no IDK answer"):
    data.load_idk_answers(tmp_path / "empty.txt")


# --- Tokenized batches ---------------------------------------------------------------------


def test_labels_mask_prompt_and_padding_and_keep_answer_tokens(splits, trained_tokenizer):
  dataset = data.QADataset(splits.forget, trained_tokenizer, data.TokenizationConfig("phi"))
  batch = dataset.batch(range(len(dataset))).answers
  assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == np.int32
  assert batch.length % 16 == 0 and batch.length >= dataset.max_sequence_length()
  np.testing.assert_array_equal(batch.item_indices, np.arange(len(dataset)))
  for row, item in enumerate(splits.forget):
    encoded = dataset.encoded(row)
    n, p = len(encoded.input_ids), encoded.num_prompt_tokens
    np.testing.assert_array_equal(batch.input_ids[row, :n], encoded.input_ids)
    assert (batch.input_ids[row, n:] == trained_tokenizer.pad_token_id).all()
    assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.length - n)
    assert (batch.labels[row, :p] == data.IGNORE_INDEX).all()
    assert (batch.labels[row, n:] == data.IGNORE_INDEX).all()
    np.testing.assert_array_equal(batch.labels[row, p:n], batch.input_ids[row, p:n])
    assert batch.loss_mask[row].sum() == n - p
    # The scored tokens are the answer and EOS; the unscored ones are the formatted prompt.
    assert (
      trained_tokenizer.decode(batch.labels[row, p:n]).strip()
      == item.answer + trained_tokenizer.eos_token
    )
    prompt = trained_tokenizer.decode(batch.input_ids[row, :p], skip_special_tokens=True)
    assert prompt.strip() == f"Question: {item.question}\nAnswer:"


def test_fixed_length_padding_and_truncation(splits, trained_tokenizer):
  fixed = data.QADataset(
    splits.forget,
    trained_tokenizer,
    data.TokenizationConfig("phi", max_length=64, pad_to_max_length=True),
  )
  assert fixed.batch([0, 1]).answers.length == 64
  with pytest.warns(UserWarning, match=r"sequences are longer than max_length=30"):
    cut = data.QADataset(
      splits.forget,
      trained_tokenizer,
      data.TokenizationConfig("phi", max_length=30, pad_to_multiple_of=16),
    )
  assert (
    cut.num_truncated > 0 and cut.batch(range(len(cut))).answers.length == 30
  )  # rounding stops at max_length
  assert data.TokenizationConfig(pad_to_multiple_of=32).padded_length(33) == 64


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"template": "gpt9"}, r"unknown prompt template 'gpt9'"),
    ({"max_length": 1}, r"max_length must be >= 2"),
    ({"pad_to_multiple_of": 0}, r"pad_to_multiple_of must be >= 1, got 0"),
    ({"pad_to_max_length": True}, r"pad_to_max_length=True needs a max_length"),
  ],
)
def test_bad_tokenization_config_is_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.TokenizationConfig(**kwargs)


def test_idk_batch_has_the_same_questions_row_by_row(splits, trained_tokenizer):
  forget, _ = make_streams(splits, trained_tokenizer)
  batch = next(forget)
  answers, idk = batch.answers, batch.idk
  assert idk.input_ids.shape == answers.input_ids.shape
  np.testing.assert_array_equal(idk.item_indices, answers.item_indices)
  for row in range(answers.batch_size):
    p = forget.dataset.encoded(int(answers.item_indices[row])).num_prompt_tokens
    # Same prompt tokens (the boundary token may merge with the answer: compare before it).
    np.testing.assert_array_equal(idk.input_ids[row, : p - 1], answers.input_ids[row, : p - 1])
    scored = idk.labels[row][idk.loss_mask[row]]
    assert (
      trained_tokenizer.decode(scored[:-1]).strip() in splits.idk_answers
      and scored[-1] == trained_tokenizer.eos_token_id
    )
  again, _ = make_streams(splits, trained_tokenizer)
  assert_batches_equal(next(again), batch)


def test_batch_streams_give_idk_answers_and_rows_where_asked(splits, trained_tokenizer):
  tokenization, batching = data.TokenizationConfig("phi"), data.BatchingConfig(4, seed=0)
  full = data.make_batch_streams(splits, trained_tokenizer, tokenization, batching)
  assert [s.stream_id for s in full] == [data.FORGET, data.RETAIN]
  assert next(full[0]).idk is not None and next(full[1]).idk is None  # by default
  half = data.make_batch_streams(
    splits,
    trained_tokenizer,
    tokenization,
    batching,
    forget_with_idk=False,
    retain_with_idk=True,
    rows=slice(2, 4),
  )
  forget, retain = next(half[0]), next(half[1])
  assert forget.idk is None and retain.idk is not None
  # A host's rows are those rows of the global batch.
  np.testing.assert_array_equal(
    retain.answers.item_indices, full[1].batch_at(data.StreamPosition()).answers.item_indices[2:]
  )
  no_idk = dataclasses.replace(splits, idk_answers=())
  with pytest.raises(ValueError, match="with_idk=True but the dataset has no IDK answers"):
    data.make_batch_streams(no_idk, trained_tokenizer, tokenization, batching)


def test_a_stream_without_idk_answers_fails_clearly(splits, trained_tokenizer):
  dataset = data.QADataset(splits.forget, trained_tokenizer)
  with pytest.raises(ValueError, match="with_idk=True but the dataset has no IDK answers"):
    data.BatchStream(dataset, data.BatchingConfig(4), with_idk=True)


CHATML = (
  "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_chat_template_name_streams_answers_ending_with_the_end_of_turn_token(
  splits, trained_tokenizer, data_dir
):
  tokenization = data.TokenizationConfig("chat", max_length=96, pad_to_max_length=True)
  with pytest.raises(ValueError, match=r"'chat' needs a tokenizer with a chat template"):
    data.QADataset(splits.forget, trained_tokenizer, tokenization)
  chat_tokenizer = copy.deepcopy(trained_tokenizer)
  chat_tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  chat_tokenizer.chat_template = CHATML
  forget, _ = data.make_batch_streams(
    splits, chat_tokenizer, tokenization, data.BatchingConfig(4, seed=0)
  )
  batch = next(forget)
  assert batch.answers.length == 96
  for qa, answers in ((batch.answers, None), (batch.idk, splits.idk_answers)):
    for row, index in enumerate(qa.item_indices):
      item = splits.forget[int(index)]
      scored = chat_tokenizer.decode(qa.labels[row][qa.loss_mask[row]])
      assert scored.endswith("<|im_end|>") and scored.count("<|im_end|>") == 1
      assert scored[: -len("<|im_end|>")] in (answers or (item.answer,))
      prompt = qa.input_ids[row][(~qa.loss_mask[row]) & (qa.attention_mask[row] == 1)]
      assert chat_tokenizer.decode(prompt) == (
        f"<|im_start|>user\n{item.question}<|im_end|>\n<|im_start|>assistant\n"
      )
      assert chat_tokenizer.bos_token_id not in qa.input_ids[row]  # ChatML has no BOS
  # A chat template formats no corpus text (it comes with a tokenizer, not a trained one).
  assert tokenizer_lib.tofu_corpus_texts(data_dir, "chat") == tokenizer_lib.tofu_corpus_texts(
    data_dir
  )


# --- Shuffling ---------------------------------------------------------------------------


def test_epochs_are_seeded_permutations_reshuffled_each_epoch(splits, trained_tokenizer):
  dataset = data.QADataset(splits.retain, trained_tokenizer)
  stream = data.BatchStream(dataset, data.BatchingConfig(7, seed=5), stream_id=data.RETAIN)
  same = data.BatchStream(dataset, data.BatchingConfig(7, seed=5), stream_id=data.RETAIN)
  other_seed = data.BatchStream(dataset, data.BatchingConfig(7, seed=6), stream_id=data.RETAIN)
  other_stream = data.BatchStream(dataset, data.BatchingConfig(7, seed=5), stream_id=data.FORGET)
  order0, order1 = stream.epoch_order(0).copy(), stream.epoch_order(1).copy()
  assert sorted(order0) == list(range(len(dataset))) and not np.array_equal(order0, order1)
  np.testing.assert_array_equal(same.epoch_order(0), order0)
  assert not np.array_equal(other_seed.epoch_order(0), order0)
  assert not np.array_equal(other_stream.epoch_order(0), order0)

  assert stream.batches_per_epoch == 180 // 7
  epoch0 = [next(stream) for _ in range(stream.batches_per_epoch)]
  seen = np.concatenate([b.answers.item_indices for b in epoch0])
  np.testing.assert_array_equal(
    seen, order0[: len(seen)]
  )  # drop_last: the 180 % 7 = 5 last are skipped
  assert stream.position == data.StreamPosition(1, 0)
  np.testing.assert_array_equal(next(stream).answers.item_indices, order1[:7])


def test_keep_last_and_no_shuffle(splits, trained_tokenizer):
  dataset = data.QADataset(splits.forget, trained_tokenizer)
  stream = data.BatchStream(dataset, data.BatchingConfig(6, shuffle=False, drop_last=False))
  sizes = [next(stream).answers.batch_size for _ in range(4)]
  assert sizes == [6, 6, 6, 2] and stream.position == data.StreamPosition(1, 0)
  np.testing.assert_array_equal(next(stream).answers.item_indices, np.arange(6))
  with pytest.raises(ValueError, match=r"the dataset has 20 items, fewer than batch_size=32"):
    data.BatchStream(dataset, data.BatchingConfig(32))
  assert data.BatchStream(dataset, data.BatchingConfig(32, drop_last=False)).batches_per_epoch == 1


def test_host_rows_split_every_batch_and_keep_its_padded_length(splits, trained_tokenizer):
  # Variable-length padding: each host's rows must still get the whole batch's length.
  dataset = data.QADataset(splits.forget, trained_tokenizer, idk_answers=tuple(splits.idk_answers))
  config = data.BatchingConfig(6, seed=3)
  whole = data.BatchStream(dataset, config, with_idk=True)
  hosts = [data.BatchStream(dataset, config, with_idk=True, rows=slice(i, i + 3)) for i in (0, 3)]
  for _ in range(whole.batches_per_epoch + 1):  # into the next epoch
    full, parts = next(whole), [next(h) for h in hosts]
    for field in ("answers", "idk"):
      for name in ("input_ids", "attention_mask", "labels", "item_indices"):
        joined = np.concatenate([getattr(getattr(p, field), name) for p in parts])
        np.testing.assert_array_equal(
          joined, getattr(getattr(full, field), name), err_msg=f"{field}.{name}"
        )
  lengths = {next(whole).answers.length for _ in range(whole.batches_per_epoch)}
  assert len(lengths) > 1, "the check needs batches of different padded lengths"


@pytest.mark.parametrize("rows", [slice(0, 0), slice(4, 9), slice(0, 6, 2), slice(-2, None)])
def test_bad_host_rows_are_named(splits, trained_tokenizer, rows):
  dataset = data.QADataset(splits.forget, trained_tokenizer)
  with pytest.raises(ValueError, match=r"rows=slice\("):
    data.BatchStream(dataset, data.BatchingConfig(6), rows=rows)


# --- Samplers ----------------------------------------------------------------------------


@pytest.mark.parametrize("forget_steps, retain_steps", [(1, 5), (2, 3), (0, 1), (1, 0)])
def test_alternating_schedule_matches_the_optimizer(
  splits, trained_tokenizer, forget_steps, retain_steps
):
  forget, retain = make_streams(splits, trained_tokenizer)
  sampler = data.AlternatingSampler(forget, retain, forget_steps, retain_steps)
  objectives = [objective for objective, _ in itertools.islice(sampler, 24)]
  cycle = forget_steps + retain_steps
  assert objectives == [data.FORGET if s % cycle < forget_steps else data.RETAIN for s in range(24)]
  assert sampler.state.step == 24


def test_each_side_restarts_when_exhausted_with_a_new_shuffle(splits, trained_tokenizer):
  forget, retain = make_streams(
    splits, trained_tokenizer
  )  # forget: 20 items / 4 = 5 batches per epoch
  reference, _ = make_streams(splits, trained_tokenizer)
  sampler = data.AlternatingSampler(forget, retain, 1, 2)
  forget_batches = [b for objective, b in itertools.islice(sampler, 36) if objective == data.FORGET]
  assert (
    len(forget_batches) == 12 and [b.epoch for b in forget_batches] == [0] * 5 + [1] * 5 + [2] * 2
  )
  for k, batch in enumerate(forget_batches):  # the k-th forget batch is the stream's k-th batch
    assert_batches_equal(batch, reference.batch_at(data.StreamPosition(k // 5, k % 5)))
  assert sampler.state.forget == data.StreamPosition(2, 2)
  assert sampler.state.retain == data.StreamPosition(1, 2)  # 24 retain batches, 22 per epoch


def test_resuming_from_saved_state_gives_the_same_batches(splits, trained_tokenizer):
  uninterrupted = data.AlternatingSampler(
    *make_streams(splits, trained_tokenizer, seed=3), forget_steps=1, retain_steps=5
  )
  expected = list(itertools.islice(uninterrupted, 70))

  first = data.AlternatingSampler(
    *make_streams(splits, trained_tokenizer, seed=3), forget_steps=1, retain_steps=5
  )
  for _ in range(41):
    next(first)
  saved = json.loads(json.dumps(first.state.to_dict()))  # as a checkpoint stores it
  resumed = data.AlternatingSampler(
    *make_streams(splits, trained_tokenizer, seed=3), 1, 5, state=data.SamplerState.from_dict(saved)
  )
  assert resumed.state == first.state and resumed.state.step == 41
  for (objective, batch), (expected_objective, expected_batch) in zip(
    itertools.islice(resumed, 29), expected[41:]
  ):
    assert objective == expected_objective
    assert_batches_equal(batch, expected_batch)


def test_joint_sampler_yields_both_sides_and_resumes(splits, trained_tokenizer):
  sampler = data.JointSampler(*make_streams(splits, trained_tokenizer))
  expected = list(itertools.islice(sampler, 12))
  assert all(f.idk is not None and r.idk is None for f, r in expected)
  assert sampler.state == data.SamplerState(
    12, data.StreamPosition(2, 2), data.StreamPosition(0, 12)
  )
  again = data.JointSampler(*make_streams(splits, trained_tokenizer))
  for _ in range(7):
    next(again)
  resumed = data.JointSampler(*make_streams(splits, trained_tokenizer), state=again.state)
  for (f, r), (ef, er) in zip(itertools.islice(resumed, 5), expected[7:]):
    assert_batches_equal(f, ef)
    assert_batches_equal(r, er)


def test_bad_sampler_arguments_and_states_are_named(splits, trained_tokenizer):
  forget, retain = make_streams(splits, trained_tokenizer)
  with pytest.raises(ValueError, match=r"forget_steps \+ retain_steps must be >= 1"):
    data.AlternatingSampler(forget, retain, 0, 0)
  with pytest.raises(ValueError, match=r"retain_steps must be an integer >= 0, got -1"):
    data.AlternatingSampler(forget, retain, 1, -1)
  with pytest.raises(ValueError, match=r"bad stream position .*offset=5.*0 <= offset < 5"):
    data.AlternatingSampler(forget, retain, state=data.SamplerState(0, data.StreamPosition(0, 5)))
  with pytest.raises(ValueError, match=r"sampler state lacks \['retain_offset'\]"):
    data.SamplerState.from_dict(
      {"step": 0, "forget_epoch": 0, "forget_offset": 0, "retain_epoch": 0}
    )
  with pytest.raises(ValueError, match=r"'step' must be an integer, got '3'"):
    data.SamplerState.from_dict({**data.SamplerState().to_dict(), "step": "3"})


# --- The real TOFU copy ------------------------------------------------------------------


@pytest.mark.skipif(
  not (REAL_DATA / "tofu").is_dir(), reason=f"real TOFU copy not found at {REAL_DATA / 'tofu'}"
)
def test_real_tofu_loads_with_task_selection_and_tokenizes(trained_tokenizer):
  standard = data.load_unlearning_data(REAL_DATA / "tofu", "forget01", task_id=1)
  # The local copy has no retain99: the fallback is retain90, which excludes forget01 task 1.
  assert standard.retain_split == "retain90" and standard.num_retain_removed == 0
  assert len(standard.forget) == 40 and len(standard.retain) == 3600
  assert len(standard.idk_answers) == 100  # data/idontknow.jsonl, found in the parent folder
  continual = data.load_unlearning_data(REAL_DATA / "tofu", "forget10", task_id=2)
  assert (
    len(continual.forget) == 400 and continual.num_retain_removed == 400
  )  # task 2 lies in retain90
  forget, retain = data.make_batch_streams(
    standard, trained_tokenizer, data.TokenizationConfig("phi"), data.BatchingConfig(8, seed=0)
  )
  objective, batch = next(data.AlternatingSampler(forget, retain, 1, 5))
  assert (
    objective == data.FORGET and batch.idk is not None and batch.answers.loss_mask.any(axis=1).all()
  )
