"""The DualOptim+ authors' TOFU protocol on the training side: the retain set with the other
forget tasks, the learning-rate schedule and its epoch, float32 embedding states in 8-bit,
loss.mask=false, and the LLMU loss (values by hand, data, and a tiny run end to end)."""

import dataclasses
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import data, losses, program
from train.config import (
  ConfigError,
  DataConfig,
  LossSection,
  ModelConfig,
  OptimizerConfig,
  RunConfig,
  TrainingConfig,
)
from train.program import optimizer as optimizer_lib

REAL_TOFU = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tofu"


def _read(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


def _write(path, rows):
  pathlib.Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- Retain set: the retain split plus the forget file's other tasks ---------------------------


@pytest.fixture(scope="module")
def thin_retain_dir(data_dir, tmp_path_factory):
  """The synthetic folder with a retain90 that lacks tasks 2 and 3 (as real retain90 lacks
  forget01's tasks), but for one task-3 row: it must not be added twice."""
  folder = tmp_path_factory.mktemp("thin") / "tofu"
  shutil.copytree(data_dir, folder)
  forget = _read(folder / "forget10.json")
  other = {r["question"] for r in forget if r["task_id"] != "1"}
  kept_duplicate = next(r for r in forget if r["task_id"] == "3")
  retain = [r for r in _read(folder / "retain90.json") if r["question"] not in other]
  _write(
    folder / "retain90.json", retain + [{k: kept_duplicate[k] for k in ("question", "answer")}]
  )
  return folder


def test_other_tasks_join_the_retain_set_once(thin_retain_dir):
  base = _read(thin_retain_dir / "retain90.json")
  forget_rows = _read(thin_retain_dir / "forget10.json")
  splits = data.load_unlearning_data(thin_retain_dir, "forget10", 1, retain_other_tasks=True)
  duplicate = base[-1]["question"]
  expected_added = [
    (r["question"], r["answer"])
    for r in forget_rows
    if r["task_id"] != "1" and r["question"] != duplicate
  ]
  assert splits.num_retain_added == len(expected_added) == 39
  assert [(i.question, i.answer) for i in splits.retain] == [
    (r["question"], r["answer"]) for r in base
  ] + expected_added
  assert {i.task_id for i in splits.retain[len(base) :]} == {2, 3}
  assert not {i.question for i in splits.forget} & {i.question for i in splits.retain}
  # Task 2 unlearned: tasks 1 and 3 retained.
  task2 = data.load_unlearning_data(thin_retain_dir, "forget10", 2, retain_other_tasks=True)
  assert {i.task_id for i in task2.retain if i.task_id is not None} == {1, 3}
  assert task2.num_retain_added == 39
  # Off, or every row forgotten: nothing added (today's behaviour).
  off = data.load_unlearning_data(thin_retain_dir, "forget10", 1)
  assert off.num_retain_added == 0 and len(off.retain) == len(base)
  every = data.load_unlearning_data(thin_retain_dir, "forget10", None, retain_other_tasks=True)
  assert every.num_retain_added == 0 and len(every.forget) == 60


def test_synthetic_retain_split_already_holds_the_other_tasks(data_dir):
  """The default benchmark's retain90 is task 1's complement: nothing to add."""
  on = data.load_unlearning_data(data_dir, "forget10", 1, retain_other_tasks=True)
  off = data.load_unlearning_data(data_dir, "forget10", 1)
  assert on.num_retain_added == 0 and on.retain == off.retain


def test_run_config_turns_the_other_tasks_on_and_off(thin_retain_dir):
  config = RunConfig(data=DataConfig(path=str(thin_retain_dir), forget_split="forget10"))
  assert config.data.retain_other_tasks and config.data.task_id == 1  # the defaults
  assert program.load_splits(config, str(thin_retain_dir)).num_retain_added == 39
  off = dataclasses.replace(config, data=dataclasses.replace(config.data, retain_other_tasks=False))
  assert program.load_splits(off, str(thin_retain_dir)).num_retain_added == 0


@pytest.mark.skipif(not REAL_TOFU.is_dir(), reason="needs ../shared/data/tofu (real TOFU)")
@pytest.mark.parametrize(
  "split, task, added",
  [("forget01", 1, 360), ("forget05", 1, 200), ("forget05", 2, 200), ("forget10", 1, 0)],
)
def test_real_retain_set_is_the_authors(split, task, added):
  """The authors' get_task_data: retain{100 - min(10 XX, 90)} + the file's other tasks. Ours
  (retain90 + the other tasks not in it) holds the same rows."""
  percent = int(split[-2:])
  theirs = _read(REAL_TOFU / f"retain{100 - min(10 * percent, 90):02d}.json") + [
    r for r in _read(REAL_TOFU / f"{split}.json") if int(r["task_id"]) != task
  ]
  splits = data.load_unlearning_data(REAL_TOFU, split, task, retain_other_tasks=True)
  ours = [(i.question, i.answer) for i in splits.retain]
  assert splits.retain_split == "retain90" and splits.num_retain_added == added
  assert len(ours) == len(theirs) and set(ours) == {(r["question"], r["answer"]) for r in theirs}


# --- Learning-rate schedule and the epoch ------------------------------------------------------


def _expected_factor(step, warmup, total):
  """Hugging Face's get_linear_schedule_with_warmup lr_lambda, restated."""
  if step < warmup:
    return step / max(1, warmup)
  if total is None:
    return 1.0
  return max(0.0, (total - step) / max(1, total - warmup))


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_schedule_values_at_the_landmarks(schedule):
  config = OptimizerConfig(learning_rate=1e-3, warmup_steps=4, schedule=schedule)
  fn = optimizer_lib.learning_rate_schedule(config, total_steps=20, steps_per_epoch=99)
  landmarks = {0: 0.0, 2: 0.5, 4: 1.0, 12: 0.5 if schedule == "linear" else 1.0}
  landmarks[19] = 1 / 16 if schedule == "linear" else 1.0
  for step, factor in landmarks.items():
    np.testing.assert_allclose(float(fn(step)), 1e-3 * factor, rtol=1e-6)
    host = optimizer_lib.learning_rate_at(config, step, total_steps=20, steps_per_epoch=99)
    np.testing.assert_allclose(host, 1e-3 * factor, rtol=1e-6)
    total = 20 if schedule == "linear" else None
    np.testing.assert_allclose(host, 1e-3 * _expected_factor(step, 4, total), rtol=1e-6)


def test_null_warmup_is_one_epoch_and_no_schedule_is_a_number():
  config = OptimizerConfig(learning_rate=1e-3)  # warmup null, linear
  assert (config.warmup_steps, config.schedule) == (None, "linear")
  assert optimizer_lib.resolved_warmup_steps(config, 30) == 30
  assert optimizer_lib.resolved_warmup_steps(config, 1) == 0  # the authors': none for 1 step
  assert optimizer_lib.resolved_warmup_steps(config, None) == 0
  at = lambda s: optimizer_lib.learning_rate_at(config, s, total_steps=300, steps_per_epoch=30)
  np.testing.assert_allclose(
    [at(0), at(15), at(30), at(165), at(299)],
    1e-3 * np.array([0.0, 0.5, 1.0, 0.5, 1 / 270]),
    rtol=1e-6,
  )
  constant = dataclasses.replace(config, warmup_steps=0, schedule="constant")
  assert optimizer_lib.learning_rate_schedule(constant, total_steps=300) == 1e-3
  # What OptimizerConfig.validate builds: no warmup, no horizon -> a number dualoptax checks.
  assert optimizer_lib.learning_rate_schedule(dataclasses.replace(config, warmup_steps=0)) == 1e-3


def _run_config(mode="alternating", batch=8, accum=1, forget_steps=1, retain_steps=5):
  return RunConfig(
    data=DataConfig(batch_size=batch),
    optimizer=OptimizerConfig(forget_steps=forget_steps, retain_steps=retain_steps),
    training=TrainingConfig(mode=mode, grad_accum=accum),
  )


def test_steps_per_epoch_as_the_authors_count_them():
  spe = optimizer_lib.steps_per_epoch
  # forget01 task 1 (40) with retain90 + other tasks (3960): the forget set runs out first.
  assert spe(_run_config(), 40, 3960) == (1 + 5) * math.ceil(40 / 8) == 30
  assert spe(_run_config(accum=2), 40, 3960) == 6 * math.ceil(40 / 16) == 18
  # The retain set runs out first: (1 + F_f / F_r) * ceil(|retain| / B), truncated.
  assert spe(_run_config(), 100, 30) == int(1.2 * math.ceil(30 / 8)) == 4
  assert spe(_run_config(retain_steps=0), 40, 3960) == 5  # forget steps only
  # Joint: one row of their data set per forget item.
  assert spe(_run_config(mode="joint"), 40, 3960) == 5


def test_optimizer_applies_the_schedule_and_spares_biases_and_norms():
  """Step 0 of a warmup moves nothing; weight decay reaches kernels and embeddings but not
  biases and norm weights (Hugging Face's parameter groups)."""
  params = {
    "embed": {"embedding": jnp.ones((3, 2))},
    "attn_norm": {"scale": jnp.ones(2)},
    "q_proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
  }
  zeros = jax.tree.map(jnp.zeros_like, params)
  for name in ("adam", "dualoptim", "dualoptim_plus"):
    config = OptimizerConfig(name=name, learning_rate=0.1, weight_decay=0.5, warmup_steps=2)
    tx = optimizer_lib.make_optimizer(config, total_steps=10, steps_per_epoch=5)
    state = tx.init(params)
    updates, state = tx.update(zeros, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates)), name
    updates, state = tx.update(zeros, state, params)  # lr 0.05: only the decay moves
    np.testing.assert_allclose(updates["q_proj"]["kernel"], -0.05 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(updates["embed"]["embedding"], -0.05 * 0.5, rtol=1e-6)
    assert float(jnp.abs(updates["q_proj"]["bias"]).max()) == 0
    assert float(jnp.abs(updates["attn_norm"]["scale"]).max()) == 0


# --- 8-bit states: embeddings in float32 -------------------------------------------------------


def _model_params(family, vocab):
  from train.program import modeling

  class Tok:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self):
      return vocab

  section = ModelConfig(family=family, hidden_size=64, num_layers=1, num_heads=2)
  module, config = modeling.build_model(section, Tok())
  return modeling.FunctionalModel.split(module, config)[1]


def _quantized_leaves(opt_state):
  """Parameter paths (as strings) whose moments are 8-bit codes, and all moment paths."""
  quantized, every = set(), set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    text = jax.tree_util.keystr(path)
    if "mu[" not in text and "nu[" not in text:
      continue
    name = text.split("mu", 1)[-1] if "mu[" in text else text.split("nu", 1)[-1]
    name = name.replace(".codes", "").replace(".absmax", "").replace(".value", "")
    every.add(name)
    if leaf.dtype == jnp.uint8:
      quantized.add(name)
  return quantized, every


@pytest.mark.parametrize("family, name", [("gpt2", "dualoptim_plus"), ("llama", "dualoptim")])
def test_8bit_states_keep_embeddings_in_float32(family, name):
  params = _model_params(family, vocab=512)
  marked = {
    jax.tree_util.keystr(p).replace(".value", "")
    for p, keep in jax.tree_util.tree_flatten_with_path(optimizer_lib.embedding_leaves(params))[0]
    if keep
  }
  expected = {"['embed']['embedding']"} | (
    {"['pos_embed']['embedding']"} if family == "gpt2" else set()
  )
  assert marked == expected
  big = {
    jax.tree_util.keystr(p).replace(".value", "")
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    if x.size >= 4096
  }
  assert expected < big  # the embeddings are big enough to be quantized otherwise
  for keep in (True, False):
    config = OptimizerConfig(name=name, state_bits=8, keep_fp32_embeddings=keep)
    quantized, every = _quantized_leaves(optimizer_lib.make_optimizer(config).init(params))
    assert quantized == (big - expected if keep else big), keep
    assert every >= big


# --- loss.mask=false -----------------------------------------------------------------------------


def _streams(data_dir, tokenizer, loss_name="DPO+GD", mask=True):
  config = RunConfig(
    data=DataConfig(path=str(data_dir), template="phi", max_length=64, batch_size=4),
    loss=LossSection(name=loss_name, mask=mask),
  )
  splits = program.load_splits(config, str(data_dir))
  return splits, program.make_streams(config, splits, tokenizer, config.loss.build())


def test_mask_false_scores_the_forget_questions_only(data_dir, trained_tokenizer):
  _, (forget_m, retain_m) = _streams(data_dir, trained_tokenizer, mask=True)
  _, (forget_u, retain_u) = _streams(data_dir, trained_tokenizer, mask=False)
  masked, unmasked = next(forget_m), next(forget_u)
  a, b = masked.answers, unmasked.answers
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  np.testing.assert_array_equal(a.attention_mask, b.attention_mask)
  real = b.attention_mask.astype(bool)
  real[:, 0] = False  # no position predicts the first token
  np.testing.assert_array_equal(b.labels, np.where(real, b.input_ids, data.IGNORE_INDEX))
  assert (a.loss_mask <= b.loss_mask).all()
  assert (losses.token_counts(b.labels) > losses.token_counts(a.labels) + 3).all()  # questions
  # The IDK rows of the forget set and every retain row keep their prompt masked.
  np.testing.assert_array_equal(masked.idk.labels, unmasked.idk.labels)
  for x, y in zip([next(retain_m) for _ in range(3)], [next(retain_u) for _ in range(3)]):
    np.testing.assert_array_equal(x.answers.labels, y.answers.labels)


# --- LLMU -------------------------------------------------------------------------------------


def _table_logits(params, input_ids, attention_mask):
  """Logits at position t are row ``input_ids[t]`` of a table: hand-computable losses."""
  del attention_mask
  return params["table"][input_ids]


def _lm(ids, labels):
  ids = jnp.asarray([ids], jnp.int32)
  return losses.LMBatch(ids, jnp.ones_like(ids), jnp.asarray([labels], jnp.int32))


def test_llmu_values_by_hand():
  ignore = losses.IGNORE_INDEX
  params = {"table": jnp.zeros((3, 3))}  # uniform: p = 1/3 everywhere
  ref = {"table": jnp.zeros((3, 3)).at[0].set(jnp.log(jnp.asarray([2.0, 1.0, 1.0])))}
  retain = _lm([0, 1, 2], [ignore, 1, 2])  # positions 0 and 1 predict answer tokens
  mismatch = _lm([2, 0, 1], [ignore, ignore, 1])  # a question token, then one answer token
  forget = _lm([1, 2, 0], [ignore, 2, 0])
  # KL(q || p) at position 0 with q = (1/2, 1/4, 1/4), p uniform; 0 at position 1.
  kl = (0.5 * math.log(1.5) + 0.5 * math.log(0.75)) / 2
  nll = math.log(3)
  config = losses.LossConfig.from_spec("LLMU", forget_coeff=2.0, retain_coeff=0.5)
  loss, metrics = losses.retain_loss(
    config, _table_logits, params, ref, retain, mismatch_batch=mismatch
  )
  np.testing.assert_allclose(metrics["retain/mismatch"], nll, rtol=1e-6)
  np.testing.assert_allclose(metrics["retain/KL"], kl, rtol=1e-5)
  np.testing.assert_allclose(metrics["retain/LLMU"], nll + kl, rtol=1e-6)
  np.testing.assert_allclose(loss, 0.5 * (nll + kl), rtol=1e-6)
  f_loss, f_metrics = losses.forget_loss(config, _table_logits, params, ref, forget)
  np.testing.assert_allclose(f_loss, -2.0 * nll, rtol=1e-6)  # gradient ascent
  total, _ = losses.combined_loss(
    config, _table_logits, params, ref, forget, retain, retain_mismatch_batch=mismatch
  )
  np.testing.assert_allclose(total, -2.0 * nll + 0.5 * (nll + kl), rtol=1e-6)
  # Row 0 of the table makes the logits of retain position 0 (KL: (p - q) / 2 positions) and
  # of mismatch position 1 (NLL of token 1: p - onehot(1)); no other row meets a target.
  grad = jax.grad(
    lambda p: losses.retain_loss(config, _table_logits, p, ref, retain, None, mismatch)[0]
  )(params)["table"]
  expected = np.zeros((3, 3))
  expected[0] = 0.5 * (np.array([1, -2, 1]) / 3 + (np.full(3, 1 / 3) - [0.5, 0.25, 0.25]) / 2)
  np.testing.assert_allclose(grad, expected, atol=1e-6)
  with pytest.raises(ValueError, match="LLMU loss needs a mismatch batch"):
    losses.retain_loss(config, _table_logits, params, ref, retain)


def test_llmu_retain_batches_pair_forget_questions_with_retain_answers(data_dir, trained_tokenizer):
  splits, (forget, retain) = _streams(data_dir, trained_tokenizer, loss_name="LLMU")
  assert forget.dataset.mismatch_questions == () and not forget.with_idk
  assert retain.with_mismatch and not retain.with_idk
  forget_questions = {i.question for i in splits.forget}
  decode = lambda ids, labels: trained_tokenizer.decode(
    [int(t) for t, lab in zip(ids, labels) if lab != data.IGNORE_INDEX], skip_special_tokens=True
  )
  batch = next(retain)
  rows = batch.mismatch
  assert rows.input_ids.shape == batch.answers.input_ids.shape
  np.testing.assert_array_equal(rows.item_indices, batch.answers.item_indices)
  for j in range(rows.batch_size):
    item = splits.retain[int(rows.item_indices[j])]
    text = trained_tokenizer.decode(rows.input_ids[j][rows.attention_mask[j] > 0])
    assert any(q in text for q in forget_questions) and item.question not in text
    assert (
      decode(rows.input_ids[j], rows.labels[j]).strip()
      == decode(batch.answers.input_ids[j], batch.answers.labels[j]).strip()
    )
  again = retain.batch_at(data.StreamPosition(0, 0))
  np.testing.assert_array_equal(again.mismatch.input_ids, rows.input_ids)  # seeded


def _tiny_run_config(tmp_path, data_dir, mode, name):
  return RunConfig(
    output_dir=str(tmp_path),
    model=ModelConfig(hidden_size=32, num_layers=1, num_heads=2),
    data=DataConfig(path=str(data_dir), template="phi", max_length=48, batch_size=4),
    optimizer=OptimizerConfig(
      name=name, learning_rate=1e-3, forget_lr_ratio=0.5, retain_steps=2, warmup_steps=2
    ),
    loss=LossSection(name="LLMU", forget_coeff=1.0, retain_coeff=0.5),
    training=TrainingConfig(steps=6, mode=mode, diagnostics_every=3, checkpoint_every=100),
  ).validate()


@pytest.mark.parametrize("mode, name", [("alternating", "dualoptim_plus"), ("joint", "adam")])
def test_llmu_unlearning_runs_end_to_end(tmp_path, data_dir, trained_tokenizer, mode, name):
  from train.program.modeling import FunctionalModel, build_model

  config = _tiny_run_config(tmp_path, data_dir, mode, name)
  module, model_config = build_model(config.model, trained_tokenizer)
  model, params = FunctionalModel.split(module, model_config)
  splits = program.load_splits(config, str(data_dir))
  streams = program.make_streams(config, splits, trained_tokenizer, config.loss.build())
  result = program.unlearn(config, model, params, params, *streams, tmp_path, resume=False)
  history = result.history
  assert [h["step"] for h in history] == list(range(1, 7))
  assert all(np.isfinite(h["loss"]) for h in history)
  # Warmup 2 then linear decay to 0 at step 6; forget steps at half the rate.
  factors = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
  objectives = [0, 1, 1, 0, 1, 1] if mode == "alternating" else [-1] * 6
  assert [h["objective"] for h in history] == objectives
  expected = [1e-3 * f * (0.5 if o == 0 else 1.0) for f, o in zip(factors, objectives)]
  np.testing.assert_allclose([h["learning_rate"] for h in history], expected, rtol=1e-6)
  assert "gradient_cosine" in history[2]
  # The largest update entry: none at the warmup's zero learning rate, then some.
  assert history[0]["max_update"] == 0 and all(h["max_update"] > 0 for h in history[1:])
  if name == "dualoptim_plus":  # its conditioning, on the diagnostics steps
    for objective in ("forget", "retain"):
      assert 0 <= history[2][f"{objective}_cancelled_fraction"] <= 1
      assert history[2][f"{objective}_floored_fraction"] == 0  # no floor configured
      unguarded = history[2][f"{objective}_max_unguarded_update"]
      assert history[2][f"{objective}_max_update"] == unguarded > 0
  if mode == "alternating":  # GA raises the forget NLL's negative; retain steps are finite
    assert all(h["loss"] <= 0 for h in history if h["objective"] == 0)
    assert all(h["loss"] > 0 for h in history if h["objective"] == 1)


def test_denominator_floor_reaches_dualoptim_plus_only_when_set():
  import dualoptax

  params = {"w": jnp.ones((3, 3))}

  def recorded(config):
    state = optimizer_lib.make_optimizer(config).init(params)
    return dualoptax.hyperparameters(state, dualoptax.ScaleByDualOptimPlusState)

  assert recorded(OptimizerConfig(denominator_floor=0.5))["denominator_floor"] == 0.5
  assert "denominator_floor" not in recorded(OptimizerConfig())  # the paper's denominator
  with pytest.raises(ConfigError, match=r"optimizer\.denominator_floor: .*got denominator_floor=2"):
    OptimizerConfig(denominator_floor=2.0).validate("optimizer")


def test_kl_positions_reach_the_loss():
  assert LossSection(name="NPO+KL").build().kl_tokens == "answer"
  assert LossSection(name="NPO+KL", kl_tokens="all").build().kl_tokens == "all"
  with pytest.raises(ConfigError, match=r"loss: unknown kl_tokens 'every'"):
    LossSection(name="NPO+KL", kl_tokens="every").validate("loss")


def test_eval_retain_reference_gives_forget_quality(tmp_path, data_dir, trained_tokenizer):
  from train.program.modeling import FunctionalModel, build_model

  config = _tiny_run_config(tmp_path, data_dir, "alternating", "adam")
  config = dataclasses.replace(
    config, eval=dataclasses.replace(config.eval, max_items=4, max_new_tokens=2)
  )
  module, model_config = build_model(config.model, trained_tokenizer)
  model, params = FunctionalModel.split(module, model_config)
  evaluate = program.evaluate_params
  alone = evaluate(config, model, params, trained_tokenizer, str(data_dir), tmp_path / "a")
  assert alone["forget_quality"] is None
  reference = str(tmp_path / "a" / "tofu_eval_items.json")
  config = dataclasses.replace(
    config, eval=dataclasses.replace(config.eval, retain_reference=reference)
  )
  paired = evaluate(config, model, params, trained_tokenizer, str(data_dir), tmp_path / "b")
  assert paired["forget_quality_reference"] == reference
  assert paired["forget_quality"] == pytest.approx(1.0)  # the same model: identical ratios
