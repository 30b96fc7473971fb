"""Typed run configuration: frozen dataclasses, read from YAML plus ``key=value`` overrides.

A run is described by one :class:`RunConfig`. Every field has a default, so an empty YAML
file (or none) is a valid configuration; ``section.field=value`` overrides (as on the
command line: ``python train/run.py optimizer.name=dualoptim_plus loss.name=NPO+GD``)
are applied on top. Values are parsed as YAML scalars (``1e-4``, ``true``, ``[1, 5]``)
and checked against the field's type; unknown sections or fields, wrong types and values
outside their allowed set raise ``ConfigError`` naming the full key and the bad value.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from train import losses


class ConfigError(ValueError):
  """A configuration key or value is invalid; the message names it."""


# Projection names that LoRA can adapt (``models.lora``): attention, MLP and untied LM heads.
LORA_TARGETS = (
  "q_proj",
  "k_proj",
  "v_proj",
  "o_proj",
  "gate_proj",
  "up_proj",
  "down_proj",
  "lm_head",
)
# The MLP projections among them: the adapters that ``bounded`` LoRA bounds.
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# models.config.REMAT_OPTIONS, restated so that reading a config does not import flax
# (tests/train/test_config.py checks that the two agree).
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class LoRASection:
  """Low-rank adapters for the unlearning stage (off by default).

  With ``enabled``, unlearning trains only adapters ``dropout(x) @ A @ B * alpha / rank``
  added to the ``targets`` projections; the base weights stay frozen and also serve as the
  reference model of NPO / DPO / KL. The defaults are the paper's setting: rank 8, alpha 32,
  dropout 0.05 (``model.lora.enabled=true`` turns it on), on every attention and MLP
  projection a family has (gate_proj exists only in gated MLPs).
  """

  enabled: bool = False
  rank: int = 8
  alpha: float = 32.0
  dropout: float = 0.05  # on the adapters' input, in training steps only
  targets: tuple[str, ...] = LORA_TARGETS[:-1]  # every projection but an untied lm_head
  # Bounded parameter-efficient unlearning (Garg et al. 2025): the MLP adapters among
  # ``targets`` add ``(alpha / rank) sin(frequency A B) / frequency`` (each entry at most
  # alpha / (rank * frequency) however far ascent pushes A and B); attention adapters stay
  # plain. See ``models.lora``.
  bounded: bool = False
  frequency: float = 100.0

  def validate(self, key: str) -> None:
    _positive(key, self, ("rank", "alpha", "frequency"))
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"{key}.dropout must be in [0, 1), got {self.dropout!r}")
    if not self.targets:
      raise ConfigError(f"{key}.targets must name at least one of {list(LORA_TARGETS)}")
    unknown = [t for t in self.targets if t not in LORA_TARGETS]
    if unknown or len(set(self.targets)) != len(self.targets):
      raise ConfigError(
        f"{key}.targets must be distinct names among {list(LORA_TARGETS)}, got "
        f"{list(self.targets)!r}"
      )
    if self.bounded and not set(self.targets) & set(MLP_PROJECTIONS):
      raise ConfigError(
        f"{key}.bounded bounds the MLP adapters, but {key}.targets {list(self.targets)!r} "
        f"names none of {list(MLP_PROJECTIONS)}"
      )

  @property
  def bounded_targets(self) -> tuple[str, ...]:
    """The targets whose adapters are bounded: the MLP ones when ``bounded``, else none."""
    return tuple(t for t in self.targets if t in MLP_PROJECTIONS) if self.bounded else ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which model to train: a local Hugging Face folder or GGUF file, or a tiny one built from
  scratch; optional LoRA adapters and rematerialisation."""

  path: str | None = None  # HF checkpoint folder or .gguf file; None: the tiny default model
  family: str = "llama"  # for the tiny model: llama | phi | gpt2
  hidden_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  dtype: str = "float32"  # compute dtype: float32 | bfloat16
  # Storage dtype of the weights (LoRA adapters take their base's): float32 | bfloat16.
  # float32 master weights by default: in bfloat16 most small updates round away (one step
  # of 1e-5 changes ~2% of SmolLM2's weights).
  param_dtype: str = "float32"
  # Rematerialisation of each decoder block in the backward pass: none | full (recompute
  # the block) | dots (save matmul outputs only); trades compute for activation memory.
  remat: str = "none"
  lora: LoRASection = LoRASection()

  def validate(self, key: str) -> None:
    _one_of(f"{key}.family", self.family, ("llama", "phi", "gpt2"))
    _one_of(f"{key}.dtype", self.dtype, ("float32", "bfloat16"))
    _one_of(f"{key}.param_dtype", self.param_dtype, ("float32", "bfloat16"))
    _one_of(f"{key}.remat", self.remat, REMAT_POLICIES)
    _positive(key, self, ("hidden_size", "num_layers", "num_heads"))
    self.lora.validate(f"{key}.lora")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the TOFU-format data is and how it is batched."""

  path: str | None = None  # TOFU-format folder; None: generate the embedded benchmark
  forget_split: str = "forget10"
  # None: the complement of forget_split if its file exists, else retain90 (see
  # train.data.splits.resolve_retain_split).
  retain_split: str | None = None
  # Which forget task of the forget file (TOFU's standard forget01 is task 1's 40 questions);
  # null takes every row of the file.
  task_id: int | None = 1
  # The authors' retain set: the retain split plus the forget file's tasks not unlearned
  # in this run (forget01 task 1: retain90 + tasks 2..10).
  retain_other_tasks: bool = True
  # A prompt template preset (plain | phi | llama2-chat | phi3-chat), or "chat": the
  # model tokenizer's own chat template (answers end with its end-of-turn token).
  template: str = "plain"
  max_length: int = 128
  # Training sequences longer than max_length: "truncate" (lose answer tokens from the end;
  # the count is reported) or "refuse" (an error naming the file, row and length).
  overlong: str = "truncate"
  batch_size: int = 8
  seed: int = 0

  def validate(self, key: str) -> None:
    _positive(key, self, ("max_length", "batch_size"))
    _one_of(f"{key}.overlong", self.overlong, ("truncate", "refuse"))
    from train.data import prompting  # deferred: it imports transformers

    _one_of(f"{key}.template", self.template, prompting.template_names())


OPTIMIZERS = ("adam", "dualoptim", "dualoptim_plus")
SCHEDULES = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer and its hyperparameters (names as in ``dualoptax``)."""

  name: str = "dualoptim_plus"
  learning_rate: float = 1e-4
  forget_lr_ratio: float = 1.0
  retain_lr_ratio: float = 1.0
  forget_steps: int = 1
  retain_steps: int = 5
  b1: float = 0.9
  b2: float = 0.95
  base_b1: float = 0.9
  base_b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.01
  state_bits: int = 32
  # 8-bit states only: embedding tables keep float32 states, as the authors' optimizers do
  # (bitsandbytes' rule for nn.Embedding).
  keep_fp32_embeddings: bool = True
  # DualOptim+ only, opt-in: the denominator sqrt(|Eh + Vh|) is floored at sqrt(floor * Vh)
  # where the delta cancels the base; null is the paper's formula.
  denominator_floor: float | None = None
  clip_norm: float | None = 1.0
  # Linear warmup from 0; null: one epoch of the forget set, as the authors' trainer.
  warmup_steps: int | None = None
  # After warmup: constant, or linear decay to 0 at training.steps (the authors', through
  # Hugging Face's default scheduler).
  schedule: str = "linear"

  def validate(self, key: str) -> None:
    """Builds the optimizer: dualoptax checks the hyperparameters it uses (fields that the
    named optimizer does not use, e.g. Adam's ``base_b1``, are not checked).

    Raises:
      ConfigError: naming ``<key>.<field>`` and the bad value.
    """
    _one_of(f"{key}.name", self.name, OPTIMIZERS)
    _one_of(f"{key}.schedule", self.schedule, SCHEDULES)
    # What the program adds around dualoptax's optimizer (warmup, clipping) it checks here.
    if self.warmup_steps is not None and self.warmup_steps < 0:
      raise ConfigError(f"{key}.warmup_steps must be >= 0, got {self.warmup_steps!r}")
    if self.clip_norm is not None and not self.clip_norm > 0:
      raise ConfigError(f"{key}.clip_norm must be positive or null, got {self.clip_norm!r}")
    from train.program.optimizer import make_optimizer  # noqa: PLC0415 (it imports this module)

    try:
      # Without warmup the learning rate is a number, which dualoptax can check (it cannot
      # look inside a schedule).
      make_optimizer(dataclasses.replace(self, warmup_steps=0))
    except ValueError as e:
      raise ConfigError(f"{key}.{_field_named_in(self, str(e))}: {e}") from e


def _field_named_in(config: Any, message: str) -> str:
  """The field of ``config`` that ``message`` names first (whole words only, so that
  ``b1`` is not read inside ``base_b1``); ``"?"`` if none."""
  found = {}
  for field in dataclasses.fields(config):
    match = re.search(rf"(?<![A-Za-z0-9_]){field.name}(?![A-Za-z0-9_])", message)
    if match:
      found[match.start()] = field.name
  return found[min(found)] if found else "?"


@dataclasses.dataclass(frozen=True)
class LossSection:
  """The unlearning loss pair, e.g. ``ME+GD`` or ``NPO+GD`` (see ``train.losses``)."""

  name: str = "ME+GD"
  forget_coeff: float = 1.0
  retain_coeff: float = 1.0
  beta: float = 0.1  # NPO / SimNPO / DPO / AP inverse temperature
  # The forget loss scores the answer tokens only; false: the question's too (the authors'
  # mask=false, which their joint-loss ME+GD and NPO+GD scripts use with forget_coeff 0.1;
  # their DualOptim scripts keep mask=true and forget_coeff 1.0).
  mask: bool = True
  # Positions the KL retain loss (KL, LLMU) averages over: "answer" tokens, or "all"
  # positions of the batch (the authors' kl_div "batchmean" over every position).
  kl_tokens: str = "answer"

  def validate(self, key: str) -> None:
    self.build(key)

  def build(self, key: str = "loss") -> losses.LossConfig:
    """The ``train.losses.LossConfig`` this section describes."""
    try:
      return losses.LossConfig.from_spec(
        self.name,
        forget_coeff=self.forget_coeff,
        retain_coeff=self.retain_coeff,
        beta=self.beta,
        kl_tokens=self.kl_tokens,
      )
    except ValueError as e:
      raise ConfigError(f"{key}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ConstraintSection:
  """Primal-dual constrained unlearning (Entesari et al. 2025): minimise the forget loss
  subject to ``retain loss <= bound``, with a Lagrange multiplier ``lambda`` that rises by
  dual ascent while the bound is exceeded and falls (to 0 at most) while it holds
  (``dualoptax.scale_by_lagrange_multiplier``). ``lambda`` lives in the optimizer state, so
  checkpoints keep it. Alternating steps apply it as the retain steps' learning-rate ratio
  (each objective's step is normalised by its own moments, so weighting the retain loss
  would barely change it); joint steps weight the retain loss by it."""

  enabled: bool = False
  # The bound on the retain loss; null: bound_ratio times the first retain loss of the run
  # (the paper's eps = (1 + alpha) L_r(reference) with alpha = bound_ratio - 1).
  bound: float | None = None
  bound_ratio: float = 1.1
  dual_learning_rate: float = 1.0  # lambda += dual_learning_rate * (retain loss - bound)
  initial_multiplier: float = 1.0  # 1: the unconstrained schedule's first steps
  max_multiplier: float | None = None  # null: no upper limit

  def validate(self, key: str) -> None:
    from dualoptax import scale_by_lagrange_multiplier  # noqa: PLC0415 (pure optax)

    try:
      scale_by_lagrange_multiplier(**self.transform_kwargs())
    except ValueError as e:
      raise ConfigError(f"{key}.{_field_named_in(self, str(e))}: {e}") from e

  def transform_kwargs(self) -> dict[str, Any]:
    """The keyword arguments of ``dualoptax.scale_by_lagrange_multiplier``."""
    return dict(
      bound=self.bound,
      bound_ratio=None if self.bound is not None else self.bound_ratio,
      dual_learning_rate=self.dual_learning_rate,
      initial_multiplier=self.initial_multiplier,
      max_multiplier=self.max_multiplier,
    )


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """Steps, modes and periodic work of the unlearning run."""

  steps: int = 60
  mode: str = "alternating"  # alternating: one objective per step; joint: weighted sum
  grad_accum: int = 1
  diagnostics_every: int = 10  # both objectives' gradients at the same params, every N
  checkpoint_every: int = 20
  keep_checkpoints: int = 2
  # A step whose loss or gradients are not finite is skipped (parameters and optimizer
  # state unchanged) and counted; this many in a row stop the run, keeping the last good
  # checkpoint.
  max_nonfinite_steps: int = 3
  seed: int = 0

  def validate(self, key: str) -> None:
    _one_of(f"{key}.mode", self.mode, ("alternating", "joint"))
    _positive(
      key,
      self,
      (
        "steps",
        "grad_accum",
        "diagnostics_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite_steps",
      ),
    )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh: sizes of the data-parallel and FSDP axes (-1: all remaining devices)."""

  data: int = 1
  fsdp: int = -1

  def validate(self, key: str) -> None:
    for name in ("data", "fsdp"):
      value = getattr(self, name)
      if value == 0 or value < -1:
        raise ConfigError(f"{key}.{name} must be a positive size or -1, got {value!r}")


ANSWER_BOUNDARIES = ("answer", "open-unlearning")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation after the run."""

  # The first N items of each set, as TOFU and the authors (ds_size: 300); null: all.
  max_items: int | None = 300
  max_new_tokens: int = 200  # greedy generation for ROUGE (the authors' 200)
  # Scored sequences (prompt + answer + EOS) are cut to this many tokens, EOS kept
  # (open-unlearning's 512).
  max_length: int = 512
  # Which tokens are the answer's: "answer" (exactly the answer's) or "open-unlearning"
  # (prompt and prompt+answer tokenized apart; see train.data.prompting). Recorded in
  # every evaluation file; forget quality refuses a reference with another convention.
  answer_boundary: str = "answer"
  # all-MiniLM-L6-v2 folder (python -m models.fetch minilm) for the paper's cosine
  # similarity; null: that term is not computed (and named missing in the summary).
  embedding_model: str | None = None
  # Forget quality's reference: a retain-only model's per-item file (its
  # eval/tofu_eval_items.json) or an open-unlearning TOFU_EVAL.json; null: not computed
  # (the experiment and the sweep pass their oracle's).
  retain_reference: str | None = None
  batch_size: int = 16

  def validate(self, key: str) -> None:
    _positive(key, self, ("max_new_tokens", "batch_size", "max_length"))
    _one_of(f"{key}.answer_boundary", self.answer_boundary, ANSWER_BOUNDARIES)
    if self.max_items is not None and self.max_items <= 0:
      raise ConfigError(f"{key}.max_items must be positive or null, got {self.max_items!r}")


SCENARIOS = ("tofu", "real_world", "safety", "multitask")
"""What a run does: ``tofu`` unlearns a forget set of TOFU-format data; ``real_world``
unlearns real people a pretrained model knows (the authors' real-world format);
``safety`` aligns a model on harmful instructions with refusals and ordinary instructions
with answers; ``multitask`` learns K >= 2 tasks as K objectives (``train.scenarios``)."""
ANSWER_KEYS = ("golden_answer", "answer")


@dataclasses.dataclass(frozen=True)
class RealWorldSection:
  """Real-world unlearning (``scenario=real_world``): forget what a pretrained model knows
  about real people.

  The authors' format (JSON lines): ``forget.json`` rows ``name``, ``question``,
  ``answer``, ``golden_answer``, ``task_id`` (20 questions about one person per task);
  ``neighbor.json`` the same without ``task_id`` (other people: the retain role); the
  ``*_perturbed.json`` files add ``paraphrased_question``, ``paraphrased_answer`` and 5
  ``perturbed_answer``. Training uses ``answer``; evaluation scores ``answer_key``.
  """

  # Folder of the four files; null: the embedded generator's, written to <output_dir>/data.
  path: str | None = None
  # The people to forget (one task each); empty: every task of the forget file.
  task_ids: tuple[int, ...] = (1,)
  forget: str = "forget.json"
  neighbor: str = "neighbor.json"
  forget_eval: str = "forget_perturbed.json"
  neighbor_eval: str = "neighbor_perturbed.json"
  # The answer evaluation scores (ROUGE-L, probability): golden_answer | answer.
  answer_key: str = "golden_answer"
  # Extra utility sets (question, answer, perturbed_answer rows, e.g. TOFU's
  # world_facts_perturbed.json), paths relative to ``path`` or absolute.
  utility_sets: tuple[str, ...] = ()

  def validate(self, key: str) -> None:
    _one_of(f"{key}.answer_key", self.answer_key, ANSWER_KEYS)
    if len(set(self.task_ids)) != len(self.task_ids) or any(t < 1 for t in self.task_ids):
      raise ConfigError(f"{key}.task_ids must be distinct ids >= 1, got {list(self.task_ids)!r}")


@dataclasses.dataclass(frozen=True)
class MultitaskSection:
  """Multi-task learning (``scenario=multitask``): K >= 2 named tasks, each a question /
  answer file learnt by descent (NLL) as an objective of its own: one base + K deltas with
  DualOptim+, K Adam states with DualOptim, one Adam on the summed loss with ``adam``.

  A task's rows are ``<path>/<task>.json`` (training) and ``<path>/<task>_eval.json``
  (held out), JSON lines with ``question`` and ``answer``; tuples below are per task, in
  ``tasks`` order, and empty means 1 for every task. Adam takes one batch of every task per
  step (K times the batches of the K-objective optimizers, one task per step).
  """

  # Folder of the task files; null: the embedded tasks, written to <output_dir>/data.
  path: str | None = None
  tasks: tuple[str, ...] = ("facts", "arithmetic", "strings")
  coeffs: tuple[float, ...] = ()  # loss coefficient per task
  steps: tuple[int, ...] = ()  # consecutive steps per task in the alternating schedule
  lr_ratios: tuple[float, ...] = ()  # learning-rate ratio per task

  def validate(self, key: str) -> None:
    if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
      raise ConfigError(f"{key}.tasks must name >= 2 distinct tasks, got {list(self.tasks)!r}")
    for name in ("coeffs", "steps", "lr_ratios"):
      values = getattr(self, name)
      if values and len(values) != len(self.tasks):
        raise ConfigError(
          f"{key}.{name} must have one value per task ({len(self.tasks)}: "
          f"{list(self.tasks)}) or none, got {list(values)!r}"
        )
      if any(v <= 0 for v in values):
        raise ConfigError(f"{key}.{name} must be positive, got {list(values)!r}")

  def per_task(self, name: str) -> tuple[float, ...]:
    """``coeffs``, ``steps`` or ``lr_ratios`` with the empty default filled in."""
    return getattr(self, name) or (1,) * len(self.tasks)


@dataclasses.dataclass(frozen=True)
class ContinualSection:
  """Continual unlearning (``python train/run.py continual``): forget tasks one after
  another, each from the model the previous one left, for ``training.steps`` steps each;
  the retain set holds the forget tasks not yet unlearned (the authors' ``forget.py`` with
  ``TASK_LIST``)."""

  task_ids: tuple[int, ...] = (1, 2, 3)
  # A fresh optimizer state for every task, as the authors' (one Trainer per task);
  # false carries the moments (and DualOptim+'s deltas) from task to task.
  reset_optimizer: bool = True

  def validate(self, key: str) -> None:
    if not self.task_ids or len(set(self.task_ids)) != len(self.task_ids):
      raise ConfigError(f"{key}.task_ids must be distinct ids, got {list(self.task_ids)!r}")
    if any(t < 1 for t in self.task_ids):
      raise ConfigError(f"{key}.task_ids must be >= 1, got {list(self.task_ids)!r}")


@dataclasses.dataclass(frozen=True)
class SafetySection:
  """Safety alignment (``scenario=safety``): both objectives descend.

  The first objective (the program's "forget" role) fine-tunes on harmful instructions
  with refusals, the second ("retain") on ordinary instructions with helpful answers,
  alternated through one optimizer (DualOptim+ keeps a delta per objective). Files are in
  the instruction-tuning JSON format (``train.data.instructions``), named relative to
  ``path`` (or absolute). Evaluation: the refusal rate of greedy generations on held-out
  harmful instructions (should rise) and on benign but scary-sounding ones (over-refusal,
  should stay low), and the NLL / ROUGE-L recall of the utility answers.
  """

  # Folder of the files; null: the embedded synthetic set, written to <output_dir>/data.
  path: str | None = None
  harmful_train: str = "harmful_train.json"
  utility_train: str = "utility_train.json"
  harmful_eval: str = "harmful_eval.json"
  benign_eval: str = "benign_eval.json"
  utility_eval: str = "utility_eval.json"
  # Tokens generated for the refusal judge, which reads a generation's beginning.
  refusal_tokens: int = 48

  def validate(self, key: str) -> None:
    _positive(key, self, ("refusal_tokens",))
    for name in ("harmful_train", "utility_train", "harmful_eval", "benign_eval", "utility_eval"):
      if not getattr(self, name):
        raise ConfigError(f"{key}.{name} must name a file, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a run needs; see the section classes for the fields."""

  output_dir: str = "runs/default"
  scenario: str = "tofu"  # one of SCENARIOS
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  loss: LossSection = LossSection()
  training: TrainingConfig = TrainingConfig()
  constraint: ConstraintSection = ConstraintSection()
  mesh: MeshConfig = MeshConfig()
  eval: EvalConfig = EvalConfig()
  real_world: RealWorldSection = RealWorldSection()
  safety: SafetySection = SafetySection()
  multitask: MultitaskSection = MultitaskSection()
  continual: ContinualSection = ContinualSection()

  def validate(self) -> RunConfig:
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if dataclasses.is_dataclass(value):
        value.validate(field.name)
    _one_of("scenario", self.scenario, SCENARIOS)
    if self.scenario == "safety" and self.loss.build().forget not in losses.DESCENT_FORGET_LOSSES:
      raise ConfigError(
        f"scenario=safety trains both objectives by descent, so loss.name must start with one "
        f"of {list(losses.DESCENT_FORGET_LOSSES)} (e.g. SFT+GD), got {self.loss.name!r}"
      )
    self._check_constraint()
    if self.data.template == "chat" and self.model.path is None:
      raise ConfigError(
        "data.template='chat' renders prompts with the model's own chat template, but the "
        "tiny default model's tokenizer has none: set model.path to a chat model, or pick a "
        "preset template"
      )
    return self

  def _check_constraint(self) -> None:
    if not self.constraint.enabled:
      return
    if self.loss.build().retain is None:
      raise ConfigError(
        f"constraint.enabled bounds the retain loss, but loss.name {self.loss.name!r} has none "
        "(use e.g. FLAT+GD)"
      )
    if self.scenario == "multitask":
      raise ConfigError("constraint.enabled is not supported with scenario=multitask")

  def to_dict(self) -> dict[str, Any]:
    """Plain values (tuples as lists), as YAML writes and :func:`load_config` reads them."""
    return dataclasses.asdict(self, dict_factory=_plain_dict)


def _plain_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


def _one_of(key: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _positive(section: str, obj: Any, names: Sequence[str]) -> None:
  for name in names:
    value = getattr(obj, name)
    if value <= 0:
      raise ConfigError(f"{section}.{name} must be positive, got {value!r}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
  """``value`` checked (and, for int -> float, converted) against a field annotation."""
  hint = annotation
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(hint)
    if value is None and type(None) in options:
      return None
    hint = next(a for a in options if a is not type(None))
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if hint is float and isinstance(value, str):
    # YAML 1.1 reads "3e-4" (no dot) as a string; accept what Python reads as a float.
    try:
      return float(value)
    except ValueError:
      pass
  if typing.get_origin(hint) is tuple:  # tuple[str, ...]: a YAML list of items
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key} must be a list, got {value!r} ({type(value).__name__})")
    item = typing.get_args(hint)[0]
    return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
  if hint in (int, float, str, bool) and (type(value) is not hint):
    raise ConfigError(f"{key} must be a {hint.__name__}, got {value!r} ({type(value).__name__})")
  return value


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    where = f"{prefix}." if prefix else ""
    raise ConfigError(
      f"unknown config key(s) {[where + k for k in unknown]}; known: {sorted(fields)}"
    )
  kwargs = {}
  for name, value in values.items():
    key = f"{prefix}.{name}" if prefix else name
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping of {hint.__name__} fields, got {value!r}")
      kwargs[name] = _build(hint, value, key)
    else:
      kwargs[name] = _coerce(key, value, hint)
  return cls(**kwargs)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
  """Sets ``tree[a][b][c] = value`` for ``key = "a.b.c"``, creating the mappings on the way.

  Raises:
    ConfigError: A part of the path already holds a value that is not a mapping.
  """
  node = tree
  parts = key.split(".")
  for part in parts[:-1]:
    node = node.setdefault(part, {})
    if not isinstance(node, dict):
      raise ConfigError(f"override {key} conflicts with another value of {part}")
  node[parts[-1]] = value


def flatten_dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the inverse of :func:`set_dotted`."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_dotted(value, f"{name}."))
    else:
      out[name] = value
  return out


def override_tree(overrides: Sequence[str]) -> dict[str, Any]:
  """``["a.b=1", "a.c=x"]`` -> ``{"a": {"b": 1, "c": "x"}}``, values parsed as YAML scalars.

  Raises:
    ConfigError: An item is not ``key=value``, or its value does not parse.
  """
  tree: dict[str, Any] = {}
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"an override must look like section.field=value, got {item!r}")
    try:
      value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"cannot parse the value of {key}: {raw!r} ({e})") from e
    set_dotted(tree, key, value)
  return tree


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
  """``base`` with ``extra``'s values on top, merging nested mappings key by key."""
  out = dict(base)
  for key, value in extra.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = deep_merge(out[key], value)
    else:
      out[key] = value
  return out


def load_config(path: str | pathlib.Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
  """Reads a YAML file (optional), applies ``key=value`` overrides, validates.

  Raises:
    ConfigError: naming the key and value at fault.
    FileNotFoundError: if ``path`` does not exist.
  """
  values: dict[str, Any] = {}
  if path is not None:
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, Mapping):
      raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    values = dict(loaded)
  values = deep_merge(values, override_tree(overrides))
  return _build(RunConfig, values, "").validate()


def save_config(config: RunConfig, path: str | pathlib.Path) -> None:
  """Writes ``config`` as YAML that :func:`load_config` reads back to an equal config."""
  pathlib.Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def apply_overrides(config: RunConfig, overrides: Sequence[str]) -> RunConfig:
  """``config`` with ``section.key=value`` overrides applied, validated."""
  merged = deep_merge(config.to_dict(), override_tree(overrides))
  return _build(RunConfig, merged, "").validate()
