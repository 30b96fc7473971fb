"""The training step: accumulation equals one big batch; one compilation serves both
objectives; the gradient-conflict diagnostic matches a direct computation; with LoRA only
the adapters train, the reference is the base model and dropout acts in training only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from toy_lm import LENGTH as T
from toy_lm import VOCAB as V
from toy_lm import table_inputs, table_logits_fn, table_params

import dualoptax
from train import losses
from train.config import OptimizerConfig
from train.program.optimizer import make_optimizer
from train.program.step import StepShardings, TrainStep, compile_steps

_logits_fn, _params, _inputs = table_logits_fn, table_params, table_inputs


def _step(tx=None):
  return TrainStep(_logits_fn, tx or optax.sgd(0.1), losses.LossConfig.from_spec("GA+GD"))


def test_accumulated_gradient_equals_the_mean_over_micro_batches():
  params = _params()
  whole = _inputs(1, micro=2)
  step = _step()
  accumulated, _, metrics = step.alternating(
    params, step.tx.init(params), None, whole, jnp.int32(1)
  )
  halves = [jax.tree.map(lambda x, i=i: x[i : i + 1], whole) for i in range(2)]
  losses_and_grads = [
    jax.value_and_grad(
      lambda p, h=h: losses.gd_loss(
        _logits_fn(p, h.answers.input_ids[0], None), jax.tree.map(lambda x: x[0], h.answers)
      )
    )(params)
    for h in halves
  ]
  grads = [g for _, g in losses_and_grads]
  expected = jax.tree.map(lambda p, a, b: p - 0.1 * (a + b) / 2, params, *grads)
  for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The metrics (auxiliary outputs) are micro-batch means too.
  mean_loss = sum(float(loss) for loss, _ in losses_and_grads) / 2
  np.testing.assert_allclose(metrics["loss"], mean_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["nll"], mean_loss, rtol=1e-6)
  tokens = [float((h.answers.labels != losses.IGNORE_INDEX).sum()) for h in halves]
  assert float(metrics["tokens"]) == sum(tokens) / 2


def test_one_compilation_serves_both_objectives():
  step = _step(dualoptax.dualoptim_plus(1e-2))
  traces = []

  def counted(*args):
    traces.append(1)
    return step.alternating(*args)

  fn = jax.jit(counted, donate_argnums=(0, 1))
  params = _params()
  opt_state = step.tx.init(params)
  for t in range(4):
    params, opt_state, metrics = fn(params, opt_state, None, _inputs(t), jnp.int32(t % 2))
  assert len(traces) == 1
  counts = dualoptax.find_state(opt_state, dualoptax.ScaleByDualOptimPlusState).objective_counts
  np.testing.assert_array_equal(counts, [2, 2])
  assert set(metrics) >= {"loss", "nll", "tokens", "grad_norm"}


def _reference_gradients(params, forget, retain):
  """The GA forget and GD retain gradients of the first micro-batches, directly."""
  one = lambda b: jax.tree.map(lambda x: x[0], b.answers)
  g_f = jax.grad(lambda p: losses.ga_loss(_logits_fn(p, one(forget).input_ids, None), one(forget)))(
    params
  )
  g_r = jax.grad(lambda p: losses.gd_loss(_logits_fn(p, one(retain).input_ids, None), one(retain)))(
    params
  )
  return g_f, g_r


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_gradient_conflict_is_the_cosine_of_the_two_gradients():
  params = _params()
  forget, retain = _inputs(3), _inputs(4)
  total, per_leaf = _step().gradient_conflict(params, None, forget, retain)
  g_f, g_r = _reference_gradients(params, forget, retain)
  a, b = _flat(g_f), _flat(g_r)
  np.testing.assert_allclose(total, a @ b / np.linalg.norm(a) / np.linalg.norm(b), atol=1e-5)
  x, y = np.ravel(g_f["out"]), np.ravel(g_r["out"])
  np.testing.assert_allclose(
    per_leaf["out"], x @ y / np.linalg.norm(x) / np.linalg.norm(y), atol=1e-5
  )


def test_preconditioned_conflict_scales_both_gradients_elementwise():
  params = _params()
  forget, retain = _inputs(3), _inputs(4)
  scale = jax.tree.map(lambda p: jnp.linspace(0.1, 3.0, p.size).reshape(p.shape), params)
  total, _, scaled = _step().gradient_conflict(params, None, forget, retain, lambda g_f, g_r: scale)
  plain, _ = _step().gradient_conflict(params, None, forget, retain)
  np.testing.assert_allclose(total, plain, rtol=1e-6)
  g_f, g_r = _reference_gradients(params, forget, retain)
  a, b = _flat(g_f) * _flat(scale), _flat(g_r) * _flat(scale)
  np.testing.assert_allclose(scaled, a @ b / np.linalg.norm(a) / np.linalg.norm(b), atol=1e-5)
  assert abs(float(scaled) - float(total)) > 1e-3  # the scale matters here


def test_step_compiler_options_are_accepted_by_this_backend():
  """The XLA:CPU options the unlearning step compiles with are valid for this jaxlib (an
  option renamed by an upgrade would otherwise fail only inside a run)."""
  from train.runtime import compiler

  options = compiler.step_compiler_options()
  if jax.default_backend() == "cpu":
    assert options == compiler.XLA_CPU_STEP_OPTIONS
  else:
    assert options is None
  add_one = jax.jit(lambda x: x + 1, donate_argnums=0, compiler_options=options)
  np.testing.assert_array_equal(add_one(jnp.ones(3)), 2.0)


@pytest.mark.parametrize("name, alternating", [("adam", False), ("dualoptim_plus", True)])
def test_compile_steps_jits_the_step_functions(name, alternating):
  """The compiled steps compute what the step functions compute; Adam's conflict adds its
  update cosine, DualOptim+ has its own diagnostics."""
  config = OptimizerConfig(name=name, learning_rate=1e-2)
  step = _step(make_optimizer(config))
  replicated = NamedSharding(
    jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec()
  )
  shardings = StepShardings(replicated, replicated, replicated, replicated)
  compiled = compile_steps(step, shardings, config, alternating=alternating)
  params = _params()
  batch = (_inputs(1), jnp.int32(dualoptax.FORGET)) if alternating else (_inputs(1), _inputs(2))
  pure = step.alternating if alternating else step.joint
  expected = pure(params, step.tx.init(params), params, *batch)
  got = compiled.train(
    jax.tree.map(jnp.copy, params), step.tx.init(params), params, *batch, jnp.int32(0)
  )
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  opt_state = got[1]
  conflict = compiled.conflict(got[0], params, _inputs(3), _inputs(4), opt_state)
  total, _ = step.gradient_conflict(got[0], params, _inputs(3), _inputs(4))
  np.testing.assert_allclose(conflict[0], total, rtol=1e-5)
  assert len(conflict) == (3 if name == "adam" else 2)
  if name == "adam":
    assert compiled.diagnostics is None
  else:
    names = {"update_cosine", "preconditioned_cosine"}
    if name == "dualoptim_plus":  # and its conditioning, per objective
      kinds = ("cancelled_fraction", "floored_fraction", "max_update", "max_unguarded_update")
      names |= {f"{o}_{kind}" for o in ("forget", "retain") for kind in kinds}
    assert set(compiled.diagnostics(opt_state)) == names


def _tiny_lora(dropout, remat="none", num_layers=1):
  """A tiny llama, split, and the same with rank-2 adapters on q_proj and v_proj."""
  from flax import nnx

  import models
  from train.config import ModelConfig
  from train.program.modeling import FunctionalModel, tiny_hf_config

  section = ModelConfig(hidden_size=16, num_layers=num_layers, num_heads=2)
  config = models.ModelConfig.from_hf(tiny_hf_config(section, V, 0, 1, 2, max_positions=16))
  module = models.CausalLM(config, rngs=nnx.Rngs(0))
  module.set_remat(remat)
  base_model, params = FunctionalModel.split(module, module.config)
  lora = models.LoRAConfig(rank=2, alpha=4.0, dropout=dropout, targets=("q_proj", "v_proj"))
  model, weights = base_model.with_lora(params, lora)
  return base_model, params, model, weights


def test_lora_step_trains_only_the_adapters():
  """The optimizer state holds moments of the adapters only; the base (read, not donated)
  is unchanged; the step is a function of its number (dropout keys), so a resumed run
  repeats it."""
  from train.program.modeling import join_adapters

  _, params, model, weights = _tiny_lora(dropout=0.5)
  base_copy = jax.tree.map(np.array, params)
  tx = make_optimizer(OptimizerConfig(name="dualoptim_plus", learning_rate=1e-2))
  step = TrainStep(
    model.logits,
    tx,
    losses.LossConfig.from_spec("NPO+GD"),
    join=join_adapters,
    train_logits_fn=model.train_logits,
  )
  train = jax.jit(step.alternating, donate_argnums=(0, 1))
  adapters, opt_state = weights.adapters, tx.init(weights.adapters)
  adapter_shapes = {x.shape for x in jax.tree.leaves(adapters)}
  moment_shapes = {x.shape for x in jax.tree.leaves(opt_state) if x.size > 2}  # not counters
  stacked = {(2, *s) for s in adapter_shapes}  # DualOptim+'s per-objective moments
  assert moment_shapes and moment_shapes <= adapter_shapes | stacked
  fresh = jax.tree.map(jnp.copy, adapters)
  for t, objective in enumerate((dualoptax.FORGET, dualoptax.RETAIN, dualoptax.RETAIN)):
    args = (weights.base, _inputs(t), jnp.int32(objective), jnp.int32(t))
    before = jax.tree.map(jnp.copy, (adapters, opt_state))
    adapters, opt_state, _ = train(adapters, opt_state, *args)
    again = train(*jax.tree.map(jnp.copy, before), *args)[0]
    other = train(*jax.tree.map(jnp.copy, before), *args[:-1], jnp.int32(t + 7))[0]
    _assert_trees(np.testing.assert_array_equal, again, adapters)
    assert any(
      not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(adapters))
    )
  b_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if "'b'" in str(p)]
  assert b_leaves and all(np.abs(b).max() > 0 for b in b_leaves)  # b starts at zero
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(adapters))
  )
  _assert_trees(np.testing.assert_array_equal, weights.base, base_copy)


def _assert_trees(check, a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    check(x, y)


def test_lora_reference_is_the_base_model_and_dropout_acts_in_training_only():
  base_model, params, model, weights = _tiny_lora(dropout=0.5)
  rng = np.random.default_rng(0)
  weights = weights._replace(
    adapters=jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype), weights.adapters)
  )
  ids = jnp.asarray(rng.integers(0, V, size=(2, T)), jnp.int32)
  mask = jnp.ones_like(ids)
  base = base_model.logits(params, ids, mask)
  np.testing.assert_array_equal(model.logits(weights.base, ids, mask), base)
  np.testing.assert_array_equal(
    model.train_logits(weights.base, ids, mask, jax.random.key(0)), base
  )
  adapted = model.logits(weights, ids, mask)
  assert np.abs(adapted - base).max() > 1e-3  # the adapters count
  np.testing.assert_array_equal(model.logits(weights, ids, mask), adapted)  # no dropout
  train = [model.train_logits(weights, ids, mask, jax.random.key(k)) for k in (0, 0, 1)]
  np.testing.assert_array_equal(train[0], train[1])
  assert np.abs(train[0] - train[2]).max() > 1e-3 and np.abs(train[0] - adapted).max() > 1e-3
  # The exported (merged) model computes what the adapted model does, without dropout.
  merged = models_merged_logits(model, weights, ids, mask)
  np.testing.assert_allclose(merged, adapted, rtol=1e-5, atol=1e-5)


def models_merged_logits(model, weights, ids, mask):
  import models

  module = model.module(jax.tree.map(jnp.copy, weights))  # merge_lora edits it in place
  return models.merge_lora(module)(ids, attention_mask=mask)


def test_rematerialized_lora_step_computes_the_same_update():
  """``model.remat`` (an ``nnx.remat`` inside the model) works in the step's ``lax.cond``
  branches, with adapters and their dropout, and changes no number."""
  from train.program.modeling import join_adapters

  tx = make_optimizer(OptimizerConfig(name="dualoptim_plus", learning_rate=1e-2))
  results = []
  for remat in ("none", "full", "dots"):
    _, _, model, weights = _tiny_lora(dropout=0.5, remat=remat)
    step = TrainStep(
      model.logits,
      tx,
      losses.LossConfig.from_spec("NPO+GD"),
      join=join_adapters,
      train_logits_fn=model.train_logits,
    )
    args = (weights.base, _inputs(0), jnp.int32(dualoptax.FORGET), jnp.int32(1))
    results.append(jax.jit(step.alternating)(weights.adapters, tx.init(weights.adapters), *args))
  for other in results[1:]:
    _assert_trees(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), other[:2], results[0][:2]
    )


def test_lora_step_draws_dropout_masks_once_per_training_forward_pass():
  """However many adapters: one random-bits call per training forward pass (NPO+GD: the
  forget and the retain branch's), the same threefry key derivations. XLA:CPU compiles a
  threefry loop per random call: per-adapter draws made a 420-adapter step compile 5-7x
  slower than without dropout."""
  from train.program.modeling import join_adapters

  tx = make_optimizer(OptimizerConfig(name="dualoptim_plus", learning_rate=1e-2))
  counts = []
  for num_layers in (1, 3):
    _, _, model, weights = _tiny_lora(dropout=0.1, num_layers=num_layers)
    step = TrainStep(
      model.logits,
      tx,
      losses.LossConfig.from_spec("NPO+GD"),
      join=join_adapters,
      train_logits_fn=model.train_logits,
    )
    args = (weights.base, _inputs(0), jnp.int32(dualoptax.FORGET), jnp.int32(1))
    text = jax.jit(step.alternating).lower(weights.adapters, tx.init(weights.adapters), *args)
    text = text.as_text()
    counts.append((text.count("stablehlo.rng_bit_generator"), text.count("call @threefry")))
  assert counts[0] == counts[1]
  assert counts[0][0] == 2
