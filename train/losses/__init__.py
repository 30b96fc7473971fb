"""Unlearning losses: forget GA / NPO / SimNPO / DPO / ME / LMF / IDK / SFT, retain GD / KL /
AP / LLMU (``"LLMU"`` alone is the method: GA forget, LLMU's mismatch + KL retain; ``SFT``
descends on the forget rows' own answers, for safety alignment; ``LMF`` flattens the logits
toward uniform without a softmax, Entesari et al. 2025).

Every loss is a pure, jittable function of **logits** (and, where it needs one, the logits
of a frozen reference model), never of a model. :func:`forget_loss`, :func:`retain_loss` and
:func:`combined_loss` run a generic ``logits_fn(params, input_ids, attention_mask)`` on the
right batches for a :class:`LossConfig` such as ``LossConfig.from_spec("NPO+GD")``.

Conventions
-----------

**Batches.** A batch (:class:`LMBatch`, any mapping, or any object with these attributes)
holds right- or left-padded int ``[B, T]`` arrays:

* ``input_ids`` — the tokens of prompt + answer (+ padding);
* ``attention_mask`` — 1 on real tokens, 0 on padding (only passed on to ``logits_fn``);
* ``labels`` — Hugging Face style: ``labels[b, t]`` is the token that must be predicted at
  position ``t`` (normally ``input_ids[b, t]``) or :data:`IGNORE_INDEX` (``-100``) where the
  position is not scored (prompt, padding).

**Shift.** Logits at position ``t`` predict token ``t + 1``, so a loss pairs
``logits[:, :-1]`` with ``labels[:, 1:]`` (``labels[:, 0]`` is never scored), exactly like
``transformers``' causal-LM loss and the reference trainer's ``get_batch_loss``. The
*targets* of a row are the positions ``t < T - 1`` with ``labels[b, t + 1] != -100``;
:func:`token_counts` counts them. An evaluator-style ``target_mask`` aligned with
``input_ids`` converts with :func:`labels_from_target_mask`.

**Numerics.** Log-softmax and LMF's logit variance are always taken in float32 (bf16
logits are upcast first); log-sigmoid is ``jax.nn.log_sigmoid`` (``-softplus(-x)``, no
overflow).

**Reductions** (they follow the reference trainer, CityU-MLO/DualOptim ``LLM/trainer/losses.py``,
which uses Hugging Face's ``outputs.loss`` for the token-level losses):

* *token-level* losses (GA, IDK, GD, ME, LMF, KL, both LLMU terms) average over all target tokens:
  ``sum over targets / max(number of targets, 1)``;
* *sequence-level* losses (NPO, SimNPO, DPO, AP) compute one value per row from the row's
  **summed** answer NLL ``NLL_b = -sum_t log p(y_t | y_<t)`` and average over rows.

**Empty rows.** A row with no target (e.g. a dummy row that pads a batch to a fixed size)
has ``NLL_b = 0`` and contributes **nothing**: token-level losses simply have no tokens from
it; sequence-level losses average only over *valid* rows (rows with at least one target, in
every batch the loss pairs), dividing by ``max(number of valid rows, 1)``. A batch with no
target at all gives a loss of 0 with zero gradient, never NaN. (The reference has no such
rows; for batches without empty rows the two agree exactly.)

Example:

>>> import numpy as np
>>> logits = np.zeros((1, 3, 4), np.float32)           # uniform over a vocabulary of 4
>>> labels = np.array([[-100, 2, 3]], np.int32)          # two answer tokens
>>> bool(np.isclose(sequence_nll(logits, labels)[0], 2 * np.log(4)))
True
>>> round(float(me_loss(logits, labels)), 6)             # uniform is ME's optimum
0.0
>>> float(lmf_loss(logits + 3.0, labels))               # and LMF's, at any offset
0.0
>>> config = LossConfig.from_spec("NPO+GD", beta=0.1)
>>> config.spec, needs_reference_model(config), needs_idk_batch(config)
('NPO+GD', True, False)
"""

from train.losses.forget import (
  dpo_loss,
  ga_loss,
  idk_loss,
  lmf_loss,
  me_loss,
  npo_loss,
  sft_loss,
  simnpo_loss,
)
from train.losses.objectives import combined_loss, forget_loss, retain_loss
from train.losses.retain import ap_loss, gd_loss, kl_loss, llmu_terms
from train.losses.spec import (
  DESCENT_FORGET_LOSSES,
  FORGET_LOSSES,
  KL_TOKENS,
  LLMU_SPEC,
  RETAIN_LOSSES,
  LossConfig,
  needs_idk_batch,
  needs_mismatch_batch,
  needs_reference_model,
  parse_loss_spec,
)
from train.losses.tokens import (
  IGNORE_INDEX,
  LMBatch,
  LogitsFn,
  as_batch,
  labels_from_target_mask,
  mean_token_nll,
  sequence_nll,
  shifted_log_probs,
  target_mask,
  token_counts,
  token_log_likelihoods,
)

__all__ = [
  "DESCENT_FORGET_LOSSES",
  "FORGET_LOSSES",
  "IGNORE_INDEX",
  "KL_TOKENS",
  "LLMU_SPEC",
  "LMBatch",
  "LogitsFn",
  "LossConfig",
  "RETAIN_LOSSES",
  "ap_loss",
  "as_batch",
  "combined_loss",
  "dpo_loss",
  "forget_loss",
  "ga_loss",
  "gd_loss",
  "idk_loss",
  "kl_loss",
  "labels_from_target_mask",
  "llmu_terms",
  "lmf_loss",
  "me_loss",
  "mean_token_nll",
  "needs_idk_batch",
  "needs_mismatch_batch",
  "needs_reference_model",
  "npo_loss",
  "sft_loss",
  "parse_loss_spec",
  "retain_loss",
  "sequence_nll",
  "shifted_log_probs",
  "simnpo_loss",
  "target_mask",
  "token_counts",
  "token_log_likelihoods",
]
