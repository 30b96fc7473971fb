"""Which losses a run uses: :class:`LossConfig`, parsed from specs such as ``"NPO+GD"``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

FORGET_LOSSES: tuple[str, ...] = ("GA", "NPO", "SimNPO", "DPO", "ME", "IDK", "SFT", "LMF")
"""Canonical names of the forget losses. ``SFT`` is supervised fine-tuning on the forget
batch's own answers (descent, not ascent): the first objective of safety alignment, whose
"forget" rows are harmful instructions with refusals (``scenario=safety``). ``LMF`` is the
logit-margin flattening loss (Entesari et al. 2025, see :func:`lmf_loss`): like ME it pushes
forget predictions toward uniform, from the logits alone (no reference model, no IDK
answers)."""
DESCENT_FORGET_LOSSES: tuple[str, ...] = ("IDK", "SFT")
"""Forget losses that descend on answers the model should give (IDK answers, the rows' own
answers), rather than push the forget answers away: the ones safety alignment can use."""
RETAIN_LOSSES: tuple[str, ...] = ("GD", "KL", "AP", "LLMU")
"""Canonical names of the retain (regularization) losses. ``LLMU`` is LLMU's (Yao et al.
2024): the NLL of forget questions with random retain answers plus KL to the reference on
the retain batch."""
LLMU_SPEC = "LLMU"
"""The spec ``"LLMU"`` alone: gradient ascent forget, LLMU retain (the authors' ``LLMU``)."""
KL_TOKENS: tuple[str, ...] = ("answer", "all")
"""Positions the KL retain loss averages over (see :func:`kl_loss`)."""

_REFERENCE_FORGET = frozenset({"NPO", "DPO"})
_REFERENCE_RETAIN = frozenset({"KL", "LLMU"})
_IDK_FORGET = frozenset({"DPO", "IDK"})
_IDK_RETAIN = frozenset({"AP"})
_MISMATCH_RETAIN = frozenset({"LLMU"})


def _canonical(name: str, valid: tuple[str, ...], kind: str, spec: str | None = None) -> str:
  lookup = {v.upper(): v for v in valid}
  key = name.strip().upper() if isinstance(name, str) else None
  if key not in lookup:
    where = f" in loss spec {spec!r}" if spec is not None else ""
    raise ValueError(
      f"unknown {kind} loss {name!r}{where}; valid {kind} losses: {', '.join(valid)}"
    )
  return lookup[key]


def parse_loss_spec(spec: str) -> tuple[str, str | None]:
  """Parses ``"FORGET+RETAIN"`` (or just ``"FORGET"``) into canonical names.

  Names are case-insensitive and may have spaces around them: ``"simnpo + gd"`` gives
  ``("SimNPO", "GD")``, ``"GA"`` gives ``("GA", None)`` (no retain loss). ``"LLMU"`` alone
  is the method: ``("GA", "LLMU")``.

  Raises:
    ValueError: For an unknown name or a malformed spec; the message names the bad part and
      lists the valid names.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(
      f"loss spec must be a string like 'NPO+GD', got {spec!r}; forget losses: "
      f"{', '.join(FORGET_LOSSES)}; retain losses: {', '.join(RETAIN_LOSSES)}"
    )
  parts = spec.split("+")
  if len(parts) == 1 and parts[0].strip().upper() == LLMU_SPEC:
    return "GA", "LLMU"
  if len(parts) > 2:
    raise ValueError(
      f"loss spec {spec!r} has {len(parts)} parts; expected 'FORGET+RETAIN' or 'FORGET'"
    )
  forget = _canonical(parts[0], FORGET_LOSSES, "forget", spec)
  retain = _canonical(parts[1], RETAIN_LOSSES, "retain", spec) if len(parts) == 2 else None
  return forget, retain


def _check_number(name: str, value: Any, positive: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  if positive and value <= 0:
    raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which unlearning losses to use, and their hyperparameters.

  Hashable, so it can be a static argument of ``jax.jit``.

  Attributes:
    forget: Forget loss, one of :data:`FORGET_LOSSES` (any case; stored canonical).
    retain: Retain loss, one of :data:`RETAIN_LOSSES`, or ``None`` for none.
    forget_coeff: Multiplies the forget loss (reference ``forget_coeff``; its TOFU config
      suggests 0.1 for ME+GD and 1.0 otherwise).
    retain_coeff: Multiplies the retain loss (reference ``regularization_coeff``).
    beta: Inverse temperature of NPO, SimNPO, DPO and AP (one shared value, as in the
      reference; 0.1 there).
    simnpo_gamma: SimNPO's reward margin ``gamma``.
    kl_tokens: Positions the KL retain loss averages over, see :func:`kl_loss`.
  """

  forget: str = "ME"
  retain: str | None = "GD"
  forget_coeff: float = 1.0
  retain_coeff: float = 1.0
  beta: float = 0.1
  simnpo_gamma: float = 0.0
  kl_tokens: str = "answer"

  def __post_init__(self):
    object.__setattr__(self, "forget", _canonical(self.forget, FORGET_LOSSES, "forget"))
    if self.retain is not None:
      object.__setattr__(self, "retain", _canonical(self.retain, RETAIN_LOSSES, "retain"))
    _check_number("forget_coeff", self.forget_coeff)
    _check_number("retain_coeff", self.retain_coeff)
    _check_number("beta", self.beta, positive=True)
    _check_number("simnpo_gamma", self.simnpo_gamma)
    if self.kl_tokens not in KL_TOKENS:
      raise ValueError(f"unknown kl_tokens {self.kl_tokens!r}; valid: {', '.join(KL_TOKENS)}")

  @classmethod
  def from_spec(cls, spec: str, **kwargs: Any) -> LossConfig:
    """``LossConfig.from_spec("IDK+AP", beta=0.1)``; see :func:`parse_loss_spec`."""
    forget, retain = parse_loss_spec(spec)
    return cls(forget=forget, retain=retain, **kwargs)

  @property
  def spec(self) -> str:
    """The canonical ``"FORGET+RETAIN"`` (or ``"FORGET"``, or ``"LLMU"``) string."""
    if (self.forget, self.retain) == ("GA", "LLMU"):
      return LLMU_SPEC
    return self.forget if self.retain is None else f"{self.forget}+{self.retain}"


def needs_reference_model(config: LossConfig) -> bool:
  """Whether the losses need a frozen reference model (NPO, DPO, KL, LLMU)."""
  return config.forget in _REFERENCE_FORGET or config.retain in _REFERENCE_RETAIN


def needs_idk_batch(
  config: LossConfig, objective: Literal["forget", "retain"] | None = None
) -> bool:
  """Whether the losses need IDK-answer batches.

  Args:
    config: The losses.
    objective: ``"forget"``: IDK answers to *forget* questions (DPO, IDK). ``"retain"``:
      IDK answers to *retain* questions (AP). ``None``: either.
  """
  forget = config.forget in _IDK_FORGET
  retain = config.retain in _IDK_RETAIN
  if objective is None:
    return forget or retain
  if objective == "forget":
    return forget
  if objective == "retain":
    return retain
  raise ValueError(f"objective must be 'forget', 'retain' or None, got {objective!r}")


def needs_mismatch_batch(config: LossConfig) -> bool:
  """Whether retain batches need mismatch rows: forget questions with retain answers (LLMU)."""
  return config.retain in _MISMATCH_RETAIN
