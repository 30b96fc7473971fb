"""A resumable replication sweep: fine-tune a target and an oracle, unlearn the target with
several optimizer variants, losses and seeds, evaluate every result and report.

``python train/run.py sweep configs/replication_smollm2.yaml [key=value ...] [--dry-run]``

A sweep file (YAML) holds:

* ``output_root``: where runs, fine-tuned models and the data of a synthetic sweep go
  (large files: keep it out of the repository); ``report_dir``: where the report goes;
* ``data_path``: a TOFU-format folder (null: the embedded synthetic benchmark);
  ``model_fetch``: a packaged checkpoint of ``models.fetch`` for ``model.path``;
  ``embedding_fetch``: one for ``eval.embedding_model`` (the paper's cosine similarity);
* ``compilation_cache``: a folder for JAX's persistent compilation cache (null: off);
* ``base``: :class:`train.config.RunConfig` fields (nested, as a run's YAML);
* ``finetune``: how the target and the oracle are trained (:class:`FinetuneSpec`);
* ``variants``: ``{label, overrides, losses}`` with dotted RunConfig keys
  (``optimizer.name``) and, optionally, the losses the variant runs with (default: all);
* ``losses``: ``{name, overrides}``; ``seeds``: each sets ``training.seed`` and ``data.seed``;
* ``extends``: another sweep file whose keys this one's override (optional).

Every stage (a fine-tuned model, a reference evaluation, an unlearning run) lives in a
folder named by the hash of everything that determines its result, and is complete only
once its marker (``COMPLETE.json``, written last) exists. A restarted sweep skips complete
stages and redoes partial ones; a changed setting gives a new hash, so stale results are
never reused. Overrides on the command line address the sweep file's own keys
(``seeds=[0]``, ``base.training.steps=2``, ``finetune.epochs=1``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from train.config import (
  ConfigError,
  RunConfig,
  apply_overrides,
  deep_merge,
  flatten_dotted,
  override_tree,
  set_dotted,
)

SWEEP_FORMAT = 1  # part of every stage's hash: bump when a stage's meaning changes
MARKER = "COMPLETE.json"


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
  """How the target (forget + retain authors) and the oracle (retain authors) are trained.

  Attributes:
    epochs: Passes over the target's questions (the oracle gets the same epochs).
    learning_rate: Peak learning rate (AdamW, warmup then cosine decay: ``program.finetune``).
    batch_size: Questions per step.
    retain_authors: How many authors of ``retain_perturbed.json`` (the retain evaluation
      set) join the forget authors; null: the whole retain split.
    questions_per_author: Consecutive rows per author in ``retain_perturbed.json``.
    control_sets: Also train on the real-authors / world-facts sets (the tiny model's
      stand-in for pretrained knowledge; a pretrained model already has it).
    seed: The fine-tuning data order.
    target_path, oracle_path: Existing checkpoints to use instead of fine-tuning (e.g.
      TOFU's released fine-tuned models, for models too large for ``program.finetune``,
      which trains every weight on one device).
  """

  epochs: float = 5.0
  learning_rate: float = 1e-4
  batch_size: int = 8
  retain_authors: int | None = 2
  questions_per_author: int = 20
  control_sets: bool = False
  seed: int = 0
  target_path: str | None = None
  oracle_path: str | None = None


@dataclasses.dataclass(frozen=True)
class Variant:
  """A variant (or a loss) of the sweep: its label, its dotted RunConfig overrides and, for
  a variant, the losses it runs with (empty: every loss of the sweep)."""

  label: str
  overrides: Mapping[str, Any]
  losses: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """A parsed sweep file (see the module docstring)."""

  output_root: str
  report_dir: str
  base: Mapping[str, Any]
  finetune: FinetuneSpec
  variants: tuple[Variant, ...]
  losses: tuple[Variant, ...]
  seeds: tuple[int, ...]
  data_path: str | None = None
  model_fetch: str | None = None
  embedding_fetch: str | None = None
  compilation_cache: str | None = None
  name: str = "sweep"
  source: str | None = None  # the sweep file read
  overrides: tuple[str, ...] = ()  # and the command line's overrides of it


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One unlearning run of the sweep: its labels, config and cache folder."""

  variant: str
  loss: str
  seed: int
  config: RunConfig
  key: str
  folder: pathlib.Path
  payload: Mapping[str, Any]

  @property
  def complete(self) -> bool:
    return (self.folder / MARKER).exists()


# ---------------------------------------------------------------- reading a sweep file


def _variants(items: Any, what: str, name_key: str) -> tuple[Variant, ...]:
  if not isinstance(items, list) or not items:
    raise ConfigError(f"{what} must be a non-empty list")
  out = []
  for i, item in enumerate(items):
    if not isinstance(item, Mapping) or name_key not in item:
      raise ConfigError(f"{what}[{i}] must be a mapping with {name_key!r}, got {item!r}")
    only = item.get("losses") or []
    if not isinstance(only, list):
      raise ConfigError(f"{what}[{i}].losses must be a list of loss names, got {only!r}")
    out.append(Variant(str(item[name_key]), dict(item.get("overrides") or {}), tuple(only)))
  if len({v.label for v in out}) != len(out):
    raise ConfigError(f"{what}: {name_key}s must be distinct")
  return tuple(out)


def _check_variant_losses(variants: tuple[Variant, ...], losses: tuple[Variant, ...]) -> None:
  """A variant's ``losses`` must name losses of the sweep."""
  names = [loss.label for loss in losses]
  for variant in variants:
    unknown = [name for name in variant.losses if name not in names]
    if unknown:
      raise ConfigError(
        f"variant {variant.label!r}: losses {unknown} are not among the sweep's losses {names}"
      )


def _read_sweep_file(path: pathlib.Path, seen: tuple[pathlib.Path, ...] = ()) -> dict[str, Any]:
  """A sweep file's mapping; with ``extends: other.yaml`` (relative to this file), the
  other file's mapping with this one's keys on top (nested mappings merged, lists replaced),
  so a sweep can share another's setting, stages and cached runs."""
  if not path.is_file():
    raise FileNotFoundError(f"sweep file not found: {path}")
  if path.resolve() in seen:
    raise ConfigError(f"sweep file {path} extends itself (through {[str(p) for p in seen]})")
  raw = yaml.safe_load(path.read_text()) or {}
  parent = raw.pop("extends", None)
  if parent is None:
    return raw
  return deep_merge(_read_sweep_file(path.parent / parent, (*seen, path.resolve())), raw)


def load_sweep(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> SweepSpec:
  """Reads a sweep file and applies ``key.path=value`` overrides to it.

  Raises:
    ConfigError: unknown keys, or malformed variants, losses or seeds.
    FileNotFoundError: ``path`` does not exist.
  """
  path = pathlib.Path(path)
  raw = deep_merge(_read_sweep_file(path), override_tree(overrides))
  known = {f.name for f in dataclasses.fields(SweepSpec)}
  unknown = sorted(set(raw) - known)
  if unknown:
    raise ConfigError(f"unknown sweep key(s) {unknown}; known: {sorted(known)}")
  finetune_raw = raw.get("finetune") or {}
  ft_known = {f.name for f in dataclasses.fields(FinetuneSpec)}
  if set(finetune_raw) - ft_known:
    raise ConfigError(f"unknown finetune key(s) {sorted(set(finetune_raw) - ft_known)}")
  seeds = raw.get("seeds", [0])
  if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
    raise ConfigError(f"seeds must be a non-empty list of integers, got {seeds!r}")
  variants = _variants(raw.get("variants"), "variants", "label")
  losses = _variants(raw.get("losses"), "losses", "name")
  _check_variant_losses(variants, losses)
  return SweepSpec(
    output_root=str(raw.get("output_root", "runs/sweep")),
    report_dir=str(raw.get("report_dir", "runs/sweep/report")),
    base=dict(raw.get("base") or {}),
    finetune=FinetuneSpec(**finetune_raw),
    variants=variants,
    losses=losses,
    seeds=tuple(seeds),
    data_path=raw.get("data_path"),
    model_fetch=raw.get("model_fetch"),
    embedding_fetch=raw.get("embedding_fetch"),
    compilation_cache=raw.get("compilation_cache"),
    name=str(raw.get("name", path.stem)),
    source=str(path),
    overrides=tuple(overrides),
  )


# ---------------------------------------------------------------- configs and hashes


def stage_key(payload: Mapping[str, Any]) -> str:
  """The hash naming a stage's folder: of its canonical JSON and :data:`SWEEP_FORMAT`."""
  text = json.dumps({"format": SWEEP_FORMAT, **payload}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat_overrides(overrides: Mapping[str, Any]) -> list[str]:
  return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def base_config(spec: SweepSpec) -> RunConfig:
  """The sweep's base RunConfig: ``base``, the data path and the fetched model path."""
  values = deep_merge({}, spec.base)
  if spec.data_path is not None:
    set_dotted(values, "data.path", os.path.abspath(os.path.expanduser(spec.data_path)))
  _set_path(values, "model", "path", spec.model_fetch)
  _set_path(values, "eval", "embedding_model", spec.embedding_fetch)
  values["output_dir"] = spec.output_root
  return apply_overrides(RunConfig(), _flat_overrides(flatten_dotted(values)))


def _set_path(values: dict[str, Any], section: str, key: str, fetch_name: str | None) -> None:
  """``values[section][key]``: made absolute if given, else the packaged checkpoint
  ``fetch_name`` of ``models.fetch`` (fetched on first use), else left unset."""
  given = values.get(section, {}).get(key)
  if given is None and fetch_name is not None:
    from models import fetch  # noqa: PLC0415 (only for a packaged model)

    found = fetch.cached_path(fetch_name) or fetch.fetch(fetch_name)
    set_dotted(values, f"{section}.{key}", str(found))
  elif given is not None:
    set_dotted(values, f"{section}.{key}", os.path.abspath(os.path.expanduser(given)))


def finetune_payload(spec: SweepSpec, base: RunConfig, role: str) -> dict[str, Any]:
  """What determines a fine-tuned model: the start model, the data and the recipe."""
  model = dataclasses.asdict(base.model)
  model.pop("lora", None)  # fine-tuning trains every weight
  data = dataclasses.asdict(base.data)
  data.pop("batch_size")
  data.pop("seed")
  return {
    "kind": "finetune",
    "role": role,
    "model": model,
    "data": data,
    "finetune": dataclasses.asdict(spec.finetune),
  }


def reference_payload(base: RunConfig, finetune_keys: Mapping[str, str]) -> dict[str, Any]:
  """What determines the target's and the oracle's evaluations."""
  return {
    "kind": "reference",
    "finetune": dict(finetune_keys),
    "data": dataclasses.asdict(base.data),
    "eval": dataclasses.asdict(base.eval),
  }


def plan(spec: SweepSpec, base: RunConfig | None = None) -> dict[str, Any]:
  """Every stage of the sweep, with its hash and folder (nothing is computed). A stage not
  complete under its hash adopts a complete one whose configuration differs only by fields
  it predates, now at their defaults (:func:`compatible`).

  Returns:
    ``{"finetune": {role: (key, folder)}, "reference": (key, folder), "runs": [PlannedRun]}``.
  """
  base = base or base_config(spec)
  root = pathlib.Path(spec.output_root)
  finetune = {}
  for role in ("target", "oracle"):
    given = given_model(spec, role)
    if given is not None:  # an existing checkpoint: its path is its identity
      finetune[role] = (stage_key({"kind": "given", "path": given}), pathlib.Path(given))
      continue
    payload = finetune_payload(spec, base, role)
    key = stage_key(payload)
    finetune[role] = adopt(root / "finetune" / f"{role}-{key}", payload)
  payload = reference_payload(base, {r: k for r, (k, _) in finetune.items()})
  reference = adopt(root / "reference" / stage_key(payload), payload)
  target_model = model_path(spec, finetune, "target")
  runs = []
  # Seeds outermost: a sweep stopped early has every variant and loss at its first seeds.
  for seed in spec.seeds:
    for loss in spec.losses:
      for variant in spec.variants:
        if variant.losses and loss.label not in variant.losses:
          continue
        overrides = {"loss.name": loss.label, **loss.overrides, **variant.overrides}
        overrides.update({"training.seed": seed, "data.seed": seed, "model.path": target_model})
        config = apply_overrides(base, _flat_overrides(overrides))
        hashed = config.to_dict()
        hashed["output_dir"] = ""
        hashed["model"]["path"] = f"finetune:{finetune['target'][0]}"
        payload = {"kind": "unlearn", "config": hashed, "reference": reference[0]}
        payload["retain"] = dataclasses.asdict(spec.finetune)  # the unlearning retain subset
        key, folder = adopt(root / "unlearn" / stage_key(payload), payload)
        config = dataclasses.replace(config, output_dir=str(folder))
        runs.append(PlannedRun(variant.label, loss.label, seed, config, key, folder, payload))
  return {"finetune": finetune, "reference": reference, "runs": runs}


def given_model(spec: SweepSpec, role: str) -> str | None:
  """The absolute path of an existing ``role`` checkpoint the sweep file names, or None."""
  given = getattr(spec.finetune, f"{role}_path")
  return None if given is None else os.path.abspath(os.path.expanduser(given))


def model_path(spec: SweepSpec, finetune: Mapping[str, Any], role: str) -> str:
  """Where the ``role`` model is: the given checkpoint or the fine-tuning stage's model."""
  return given_model(spec, role) or str((finetune[role][1] / "model").resolve())


def _defaults() -> dict[str, Any]:
  """Default values by payload section (for :func:`compatible`)."""
  run = RunConfig().to_dict()
  finetune = dataclasses.asdict(FinetuneSpec())
  return {"config": run, **run, "finetune": finetune, "retain": finetune}


def compatible(stored: Any, wanted: Any, defaults: Any) -> bool:
  """Whether a stored payload describes the same stage as ``wanted``: equal, except fields
  that ``stored`` lacks (added to the code since) and ``wanted`` holds at their default."""
  if not (isinstance(stored, Mapping) and isinstance(wanted, Mapping)):
    return stored == wanted
  defaults = defaults if isinstance(defaults, Mapping) else {}
  if set(stored) - set(wanted):
    return False  # a field since removed
  for key, value in wanted.items():
    if key not in stored:
      if key not in defaults or value != defaults[key]:
        return False
    elif not compatible(stored[key], value, defaults.get(key)):
      return False
  return True


def adopt(folder: pathlib.Path, payload: Mapping[str, Any]) -> tuple[str, pathlib.Path]:
  """``(key, folder)`` of the stage: ``folder`` if complete or if no complete sibling has a
  :func:`compatible` payload, else that sibling (its key is its folder name's suffix)."""
  key = folder.name.rsplit("-", 1)[-1]
  if (folder / MARKER).exists() or not folder.parent.is_dir():
    return key, folder
  prefix = folder.name[: -len(key)]
  defaults = _defaults()
  payload = json.loads(json.dumps(payload, default=str))  # as stored: tuples are lists
  for other in sorted(folder.parent.glob(f"{prefix}*/{MARKER}")):
    stage = other.parent / "stage.json"
    if stage.exists() and compatible(json.loads(stage.read_text()), payload, defaults):
      return other.parent.name.rsplit("-", 1)[-1], other.parent
  return key, folder


# ---------------------------------------------------------------- the cache


def read_marker(folder: pathlib.Path) -> dict[str, Any] | None:
  """A complete stage's record, or None if the stage is absent or partial."""
  marker = folder / MARKER
  return json.loads(marker.read_text()) if marker.exists() else None


def code_version() -> str:
  """The checkout's commit, with ``+dirty`` when tracked files differ from it (recorded in
  each stage's marker: the hash covers the configuration, not the code)."""
  import subprocess  # noqa: PLC0415

  root = pathlib.Path(__file__).resolve().parents[1]
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return commit + ("+dirty" if dirty else "")


def cached_stage(
  folder: pathlib.Path, payload: Mapping[str, Any], compute: Callable[[pathlib.Path], dict]
) -> dict[str, Any]:
  """The record of the stage in ``folder``: read if complete, else computed afresh.

  ``compute(folder)`` returns a JSON-able record; it is written as the marker only after
  ``compute`` returned, so a stage interrupted midway is redone from scratch."""
  record = read_marker(folder)
  if record is not None:
    return record
  if folder.exists():
    shutil.rmtree(folder)  # a partial stage
  folder.mkdir(parents=True)
  (folder / "stage.json").write_text(json.dumps(payload, indent=1, default=str))
  record = {**compute(folder), "code": code_version()}
  tmp = folder / (MARKER + ".tmp")
  tmp.write_text(json.dumps(record, indent=1, default=str))
  tmp.replace(folder / MARKER)
  return record


# ---------------------------------------------------------------- the data of the sweep


def retain_subset(spec: FinetuneSpec, splits: Any, data_dir: str) -> tuple[Any, list[str]]:
  """The retain items of the first ``retain_authors`` authors of ``retain_perturbed.json``
  (the retain evaluation set), with a description of the rows taken."""
  if spec.retain_authors is None:
    return splits.retain, [f"all {len(splits.retain)} retain questions"]
  from train.data import tofu  # noqa: PLC0415

  rows = tofu.load_tofu(pathlib.Path(data_dir) / "retain_perturbed.json")
  wanted = [item.question for item in rows[: spec.retain_authors * spec.questions_per_author]]
  by_question = {item.question: item for item in splits.retain}
  missing = [q for q in wanted if q not in by_question]
  if missing:
    raise ValueError(f"{len(missing)} retain_perturbed questions are not in the retain split")
  chosen = tuple(by_question[q] for q in wanted)
  return chosen, [f"retain_perturbed rows 0..{len(wanted) - 1} ({spec.retain_authors} authors)"]


class CountingStream:
  """A batch stream that counts the tokens it hands out (real and padded)."""

  def __init__(self, stream: Any):
    self._stream = stream
    self.real_tokens = 0
    self.padded_tokens = 0

  def __iter__(self):
    return self

  def __next__(self):
    qa = next(self._stream)
    mask = qa.answers.attention_mask
    self.real_tokens += int(mask.sum())
    self.padded_tokens += int(mask.size)
    return qa


# ---------------------------------------------------------------- the stages


@dataclasses.dataclass
class SweepContext:
  """What the stages share: the tokenizer, data folder, splits and the loaded target."""

  spec: SweepSpec
  base: RunConfig
  tokenizer: Any
  data_dir: str
  splits: Any  # the fine-tuning and unlearning data: forget + the chosen retain authors
  retain_rows: list[str]
  loaded: dict[str, Any] = dataclasses.field(default_factory=dict)
  paper: Any = None  # the paper's models for base.eval, loaded once (see paper_models_for)

  def paper_models_for(self, config: RunConfig) -> Any:
    """The sentence encoder and IDK answers of ``config.eval``: the ones loaded for the
    base config when its eval settings are the base's, else None (evaluate loads them)."""
    return self.paper if config.eval == self.base.eval else None


def make_context(spec: SweepSpec, base: RunConfig) -> SweepContext:
  """Loads the tokenizer and the splits (writing the synthetic data if ``data_path`` is
  null, under ``output_root``)."""
  from train import program  # noqa: PLC0415 (heavy imports)

  pathlib.Path(spec.output_root).mkdir(parents=True, exist_ok=True)
  tokenizer, data_dir = program.prepare_data(base)
  splits = program.load_splits(base, data_dir)
  retain, rows = retain_subset(spec.finetune, splits, data_dir)
  splits = dataclasses.replace(splits, retain=retain)
  paper = program.evaluate.paper_models(base, data_dir)
  return SweepContext(spec, base, tokenizer, data_dir, splits, rows, paper=paper)


def load_model(ctx: SweepContext, path: str | None, seed: int = 0) -> tuple[Any, Any]:
  """``(FunctionalModel, params)`` of ``path`` (None: the tiny model of the base config),
  loaded once per process."""
  from train.program.modeling import FunctionalModel, build_model  # noqa: PLC0415

  key = f"{path}:{seed}"
  if key not in ctx.loaded:
    section = dataclasses.replace(ctx.base.model, path=path)
    module, model_config = build_model(section, ctx.tokenizer, seed=seed)
    ctx.loaded.clear()  # one model at a time: SmolLM2's weights are 0.5 GB
    ctx.loaded[key] = FunctionalModel.split(module, model_config)
  return ctx.loaded[key]


def _control_items(data_dir: str) -> tuple[Any, ...]:
  from train.data import tofu  # noqa: PLC0415

  return tuple(
    item
    for name in ("real_authors_perturbed", "world_facts_perturbed")
    for item in tofu.load_tofu(
      pathlib.Path(data_dir) / f"{name}.json", required_keys=tofu.OPTION_KEYS
    )
  )


def finetune_stage(ctx: SweepContext, role: str, folder: pathlib.Path) -> dict[str, Any]:
  """Fine-tunes the start model on the target's (forget + retain authors) or the oracle's
  (retain authors) questions and saves it as a Hugging Face folder ``folder/model``."""
  from train import program  # noqa: PLC0415
  from train.program.modeling import save_model  # noqa: PLC0415

  ft = ctx.spec.finetune
  facts = ctx.splits.retain + (ctx.splits.forget if role == "target" else ())
  if ft.control_sets:
    facts += _control_items(ctx.data_dir)
  config = dataclasses.replace(ctx.base, data=dataclasses.replace(ctx.base.data, seed=ft.seed))
  splits = dataclasses.replace(ctx.splits, retain=facts)
  _, stream = program.make_streams(
    config, splits, ctx.tokenizer, config.loss.build(), batch_size=ft.batch_size
  )
  counter = CountingStream(stream)
  # At least 2: program.finetune warms up for steps // 10 and decays over the rest.
  steps = max(2, math.ceil(ft.epochs * len(facts) / ft.batch_size))
  model, params = load_model(ctx, ctx.base.model.path, seed=ctx.base.training.seed)
  began = time.perf_counter()
  params = program.finetune(model, params, counter, steps, ft.learning_rate, desc=role)
  import jax  # noqa: PLC0415

  jax.block_until_ready(params)
  seconds = time.perf_counter() - began
  save_model(model, params, str(folder / "model"), ctx.tokenizer)
  record = {
    "role": role,
    "questions": len(facts),
    "steps": steps,
    "seconds": seconds,
    "real_tokens": counter.real_tokens,
    "padded_tokens": counter.padded_tokens,
    "padded_tokens_per_second": counter.padded_tokens / seconds,
    "retain_rows": ctx.retain_rows,
  }
  print(f"[sweep] fine-tuned {role}: {steps} steps in {seconds:.0f} s", flush=True)
  return record


def _forget_probability(summary: Mapping[str, Any]) -> float | None:
  for values in summary.get("sets", {}).values():
    if values.get("role") == "forget":
      return values.get("probability")
  return None


def reference_stage(ctx: SweepContext, models: Mapping[str, str], folder: pathlib.Path) -> dict:
  """Evaluates the oracle (whose per-item file is the forget-quality reference) and the
  target; records both summaries."""
  from train import program  # noqa: PLC0415

  record: dict[str, Any] = {}
  reference = None
  for role in ("oracle", "target"):
    model, params = load_model(ctx, models[role])
    began = time.perf_counter()
    summary = program.evaluate_params(
      ctx.base, model, params, ctx.tokenizer, ctx.data_dir, folder / role, reference, ctx.paper
    )
    seconds = time.perf_counter() - began
    if role == "oracle":
      reference = str(folder / "oracle" / "tofu_eval_items.json")
    record[role] = {
      "summary": summary,
      "eval_seconds": seconds,
      "forget_probability": _forget_probability(summary),
    }
    print(f"[sweep] evaluated {role} in {seconds:.0f} s", flush=True)
  record["reference"] = reference
  return record


def unlearn_stage(
  ctx: SweepContext, run: PlannedRun, target: str, reference: str, folder: pathlib.Path
) -> dict[str, Any]:
  """Unlearns the target with ``run.config``, evaluates the result and drops the run's
  checkpoints (full-weight optimizer states take gigabytes; the marker makes them moot)."""
  from train import program  # noqa: PLC0415
  from train.config import save_config  # noqa: PLC0415

  config = run.config
  save_config(config, folder / "config.yaml")
  model, params = load_model(ctx, target)
  streams = program.make_streams(config, ctx.splits, ctx.tokenizer, config.loss.build())
  began = time.perf_counter()
  result = program.unlearn(config, model, params, params, *streams, folder, resume=False)
  unlearn_seconds = time.perf_counter() - began
  began = time.perf_counter()
  summary = program.evaluate_params(
    config,
    result.model,
    result.params,
    ctx.tokenizer,
    ctx.data_dir,
    folder / "eval",
    reference,
    ctx.paper_models_for(config),
  )
  eval_seconds = time.perf_counter() - began
  shutil.rmtree(folder / "checkpoints", ignore_errors=True)
  tokens = config.training.steps * config.data.batch_size * config.data.max_length
  if config.training.mode == "joint":
    tokens *= 2
  return {
    "variant": run.variant,
    "loss": run.loss,
    "seed": run.seed,
    "summary": summary,
    "unlearn_seconds": unlearn_seconds,
    "eval_seconds": eval_seconds,
    "steps": config.training.steps,
    "padded_tokens": tokens * config.training.grad_accum,
    "state_bytes": result.state_bytes,
  }


# ---------------------------------------------------------------- the sweep


def enable_compilation_cache(folder: str | None) -> None:
  """JAX's persistent compilation cache in ``folder``: runs whose programs have the same
  shapes (seeds, repeated evaluations, a restarted sweep) load them instead of compiling."""
  if folder is None:
    return
  import jax  # noqa: PLC0415

  pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def describe(spec: SweepSpec, planned: Mapping[str, Any]) -> str:
  """The dry-run listing: every stage, its folder and whether it is cached."""
  lines = [f"sweep {spec.name}: output under {spec.output_root}, report in {spec.report_dir}"]
  for role, (_, folder) in planned["finetune"].items():
    state = "given  " if given_model(spec, role) else _state(folder)
    lines.append(f"  finetune {role:<7} {state}  {folder}")
  lines.append(f"  reference        {_state(planned['reference'][1])}  {planned['reference'][1]}")
  runs = planned["runs"]
  for run in runs:
    name = f"{run.loss} / {run.variant} / seed {run.seed}"
    lines.append(f"  unlearn {name:<48} {_state(run.folder)}  {run.folder}")
  done = sum(run.complete for run in runs)
  lines.append(f"{done} of {len(runs)} unlearning runs cached")
  return "\n".join(lines)


def _state(folder: pathlib.Path) -> str:
  if (folder / MARKER).exists():
    return "cached "
  return "partial" if folder.exists() else "todo   "


def collect(spec: SweepSpec, planned: Mapping[str, Any]) -> dict[str, Any]:
  """The records of every complete stage (for the report), labelled by the current spec."""
  records = []
  for run in planned["runs"]:
    record = read_marker(run.folder)
    if record is not None:
      record = {**record, "variant": run.variant, "loss": run.loss, "seed": run.seed}
      record["metrics_path"] = str(run.folder / "metrics.jsonl")
      records.append(record)
  finetune = {
    role: read_marker(folder) or ({"given": str(folder)} if given_model(spec, role) else None)
    for role, (_, folder) in planned["finetune"].items()
  }
  return {
    "runs": records,
    "finetune": finetune,
    "reference": read_marker(planned["reference"][1]),
    "planned": len(planned["runs"]),
  }


def settings(spec: SweepSpec, planned: Mapping[str, Any]) -> dict[str, Any]:
  """The settings a report states: the sweep file's, its overrides and a run's config."""
  runs = planned["runs"]
  return {
    "source": spec.source,
    "overrides": list(spec.overrides),
    "output_root": spec.output_root,
    "data_path": spec.data_path,
    "model_fetch": spec.model_fetch,
    "embedding_fetch": spec.embedding_fetch,
    "compilation_cache": spec.compilation_cache,
    "finetune": dataclasses.asdict(spec.finetune),
    "base": flatten_dotted(spec.base),
    "variants": {v.label: dict(v.overrides) for v in spec.variants},
    "losses": {v.label: dict(v.overrides) for v in spec.losses},
    "seeds": list(spec.seeds),
    "first_run_config": runs[0].config.to_dict() if runs else None,
  }


def write_report(spec: SweepSpec, planned: Mapping[str, Any], wall_seconds: float | None) -> str:
  """Writes the report of what is complete so far (imported late: a long sweep picks up
  the report code as it is when it reports)."""
  from train import report  # noqa: PLC0415

  collected = collect(spec, planned)
  collected["wall_seconds"] = wall_seconds
  collected["sweep"] = spec.name
  collected["variants"] = [v.label for v in spec.variants]
  collected["losses"] = [v.label for v in spec.losses]
  collected["seeds"] = list(spec.seeds)
  collected["settings"] = settings(spec, planned)
  if spec.source is not None:  # the sweep file, comments (every choice) included
    pathlib.Path(spec.report_dir).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.source, pathlib.Path(spec.report_dir) / "sweep.yaml")
  return str(report.write_sweep(pathlib.Path(spec.report_dir), collected))


def run_sweep(spec: SweepSpec, dry_run: bool = False) -> dict[str, Any]:
  """Runs (or, with ``dry_run``, lists) every stage not yet complete, then reports."""
  base = base_config(spec)
  planned = plan(spec, base)
  print(describe(spec, planned), flush=True)
  if dry_run:
    return planned
  enable_compilation_cache(spec.compilation_cache)
  began = time.perf_counter()
  ctx = make_context(spec, base)
  models = {}
  for role, (_, folder) in planned["finetune"].items():
    if given_model(spec, role) is None:
      payload = finetune_payload(spec, base, role)
      cached_stage(folder, payload, lambda f, role=role: finetune_stage(ctx, role, f))
    models[role] = model_path(spec, planned["finetune"], role)
  ref_key, ref_folder = planned["reference"]
  payload = reference_payload(base, {r: k for r, (k, _) in planned["finetune"].items()})
  reference = cached_stage(ref_folder, payload, lambda f: reference_stage(ctx, models, f))
  for i, run in enumerate(planned["runs"]):
    if run.complete:
      continue
    print(
      f"[sweep] run {i + 1}/{len(planned['runs'])}: {run.loss} / {run.variant} / seed {run.seed}",
      flush=True,
    )
    record = cached_stage(
      run.folder,
      run.payload,
      lambda f, run=run: unlearn_stage(ctx, run, models["target"], reference["reference"], f),
    )
    print(
      f"[sweep]   done: unlearn {record['unlearn_seconds']:.0f} s, "
      f"eval {record['eval_seconds']:.0f} s",
      flush=True,
    )
    _report_safely(spec, planned, time.perf_counter() - began)
  wall = time.perf_counter() - began
  path = _report_safely(spec, planned, wall)
  print(f"[sweep] complete in {wall:.0f} s; report: {path}", flush=True)
  return planned


def _report_safely(spec: SweepSpec, planned: Mapping[str, Any], wall: float) -> str | None:
  """The report so far; a failing report never stops the runs (it can be redone with
  ``--report-only``)."""
  try:
    return write_report(spec, planned, wall)
  except Exception as e:  # noqa: BLE001 (the computed runs matter more than their report)
    print(f"[sweep] report failed: {type(e).__name__}: {e}", flush=True)
    return None
