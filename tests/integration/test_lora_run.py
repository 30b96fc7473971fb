"""LoRA unlearning through the CLI: only the adapters train, the exported model is the base
plus the merged adapters, the checkpoint holds no base weight, and a run resumed from a
checkpoint repeats an uninterrupted one bit for bit (adapter dropout on, NPO's reference).

The run bounds its MLP adapter (``model.lora.bounded``, Garg et al. 2025): down_proj adds
``sin(w a @ b) / w * alpha / rank`` while q_proj and v_proj stay plain, so one run checks
both forms end to end (a second CLI run costs ~13 s, mostly start-up)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_runs import ROOT, run_cli
from flax import nnx
from safetensors.numpy import load_file

STEPS, RANK, ALPHA, FREQUENCY = 6, 4, 16.0, 1000.0
TARGETS = ("q_proj", "v_proj", "down_proj")
BOUNDED = ("down_proj",)  # the MLP targets
BOUND = ALPHA / (RANK * FREQUENCY)  # largest entry of a bounded adapter's update


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """A folder with the embedded data (``data``) and a tiny llama with its tokenizer saved
  as a Hugging Face folder (``base``): the frozen model of the runs."""
  import models
  from train.config import ModelConfig
  from train.data import synthetic
  from train.data import tokenizer as tokenizer_lib
  from train.program.modeling import build_model

  root = tmp_path_factory.mktemp("lora")
  synthetic.write_synthetic_tofu(root / "data")
  tokenizer = tokenizer_lib.train_tokenizer(tokenizer_lib.tofu_corpus_texts(root / "data"))
  module, config = build_model(ModelConfig(hidden_size=64, num_layers=1), tokenizer, seed=3)
  models.save_pretrained(module, config, root / "base", tokenizer=tokenizer)
  return root


def _unlearn(out, root):
  return [
    str(ROOT / "train" / "run.py"),
    "unlearn",
    f"output_dir={out}",
    f"model.path={root / 'base'}",
    f"data.path={root / 'data'}",
    f"training.steps={STEPS}",
    "training.checkpoint_every=2",
    "training.diagnostics_every=50",
    "data.batch_size=4",
    "data.max_length=40",
    "loss.name=NPO+GD",
    "optimizer.learning_rate=1e-2",
    "model.lora.enabled=true",
    f"model.lora.rank={RANK}",
    f"model.lora.alpha={ALPHA}",
    "model.lora.dropout=0.1",
    f"model.lora.targets=[{', '.join(TARGETS)}]",
    "model.lora.bounded=true",
    f"model.lora.frequency={FREQUENCY}",
  ]


@pytest.fixture(scope="module")
def whole(base_dir):
  out = base_dir / "whole"
  run_cli(_unlearn(out, base_dir), devices=1)
  return out


def _checkpoint(run, step):
  return ocp.StandardCheckpointer().restore(run / "checkpoints" / str(step) / "state")


def _flat_params(path):
  import models

  module, _ = models.load_pretrained(path)
  return {tuple(str(k) for k in p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module))}


def test_only_adapters_train_and_export_merged(base_dir, whole):
  state = _checkpoint(whole, STEPS)
  assert set(state) == {"params", "opt_state"}
  adapters = {
    tuple(getattr(k, "key", k) for k in p): np.asarray(x)
    for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
  }
  assert adapters and all("lora" in p for p in adapters)  # the checkpoint has no base weight
  base, merged = _flat_params(base_dir / "base"), _flat_params(whole / "model")
  saved = sum(x.nbytes for x in jax.tree.leaves(state))
  assert saved < sum(x.nbytes for x in base.values()) / 4
  targeted = {}
  for path in adapters:  # ('layers', '0', 'attn', 'q_proj', 'lora', 'a', 'value')
    kernel = (*path[:4], "kernel")
    a, b = adapters[(*path[:5], "a", "value")], adapters[(*path[:5], "b", "value")]
    assert np.abs(b).max() > 0  # trained (b starts at zero)
    delta = _update(a, b, bounded=path[3] in BOUNDED)
    targeted[kernel] = (jnp.asarray(base[kernel], jnp.float32) + delta).astype(base[kernel].dtype)
  assert {p[3] for p in targeted} == set(TARGETS)
  assert base.keys() == merged.keys()
  for path, value in base.items():
    # The base is frozen: untargeted weights come out bit-identical, targeted ones are
    # exactly base + a @ b * alpha / rank, or its sine form for the bounded ones.
    expected = targeted.get(path, value)
    np.testing.assert_array_equal(merged[path], expected, err_msg=str(path))
    if path in targeted:
      assert not np.array_equal(merged[path], value), path


def _update(a, b, bounded):
  """An adapter's update as `models.lora` computes it (float32)."""
  product = jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)
  if bounded:
    return jnp.sin(FREQUENCY * product) * (ALPHA / RANK / FREQUENCY)
  return product * (ALPHA / RANK)


def test_bounded_mlp_update_stays_within_its_bound(base_dir, whole):
  """The run's losses are finite and each exported MLP kernel is within alpha / (rank w) of
  the base, although the plain update of the same trained factors is not."""
  lines = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(v) for line in lines for v in line.values())
  params = _checkpoint(whole, STEPS)["params"]
  base, merged = _flat_params(base_dir / "base"), _flat_params(whole / "model")
  for layer, layer_params in params["layers"].items():
    lora = layer_params["mlp"]["down_proj"]["lora"]
    a, b = np.asarray(lora["a"]["value"]), np.asarray(lora["b"]["value"])
    kernel = ("layers", str(layer), "mlp", "down_proj", "kernel")
    change = np.abs(merged[kernel].astype(np.float32) - base[kernel].astype(np.float32))
    assert change.max() <= BOUND * (1 + 1e-3), change.max()
    plain = np.abs(np.asarray(_update(a, b, bounded=False))).max()
    assert plain > 2 * BOUND, plain  # the bound is active: the test can fail


def test_resumed_lora_run_repeats_the_uninterrupted_one(base_dir, whole):
  """The state a run killed after step 4 leaves: checkpoint 4 (and metrics past it, which
  the resumed run trims); resuming must give the uninterrupted run's bits."""
  resumed = base_dir / "resumed"
  shutil.copytree(whole, resumed)
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))
  shutil.rmtree(resumed / "model")
  run_cli(_unlearn(resumed, base_dir), devices=1)
  a = load_file(str(whole / "model" / "model.safetensors"))
  b = load_file(str(resumed / "model" / "model.safetensors"))
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  for x, y in zip(
    jax.tree.leaves(_checkpoint(whole, STEPS)), jax.tree.leaves(_checkpoint(resumed, STEPS))
  ):
    np.testing.assert_array_equal(x, y)
  lines = (resumed / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
