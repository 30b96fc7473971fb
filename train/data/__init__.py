"""Training data for unlearning: TOFU-format splits, tokenized batches and the samplers.

Three layers, each usable alone:

1. **Splits.** :func:`load_unlearning_data` reads a TOFU-format folder (the real TOFU copy
   or :mod:`train.data.synthetic`'s output): the forget split (one ``task_id`` of it), the
   retain split that complements it, and the IDK answers.
2. **Tokenized batches.** :class:`QADataset` formats each question with a model family's
   :class:`~train.data.prompting.PromptTemplate`, tokenizes it with its answer
   (:func:`~train.data.prompting.encode_answer`) and collates rows into a
   :class:`TokenizedQA`: right-padded numpy ``int32`` arrays whose ``labels`` are ``-100``
   on prompt and padding tokens. A :class:`QABatch` may carry the same questions with IDK
   answers (for the IDK, DPO and AP losses), row by row.
3. **Samplers.** :class:`BatchStream` walks a dataset in seeded, epoch-wise reshuffled
   batches forever; :func:`make_batch_streams` makes a run's forget and retain streams
   (IDK answers for either, a host's rows of every batch). :class:`AlternatingSampler`
   draws ``F_f`` forget batches then ``F_r`` retain batches, the optimizer's schedule
   (:func:`dualoptax.scheduled_objective`: step ``s`` is a forget step iff
   ``s mod (F_f + F_r) < F_f``); :class:`JointSampler` draws one of each per step. Both
   expose a small :class:`SamplerState` that restores them exactly, for resuming.

Everything is deterministic given the seed: epoch ``e`` of a stream is the permutation of
``numpy.random.default_rng([seed, stream_id, e, 0])``, so no random state needs saving.

Label convention (Hugging Face's, and :func:`train.evaluation.scoring.masked_mean_nll`'s):
``labels[b, t]`` is the token at position ``t`` (not shifted); the loss of token ``t`` uses
the logits at position ``t - 1``. ``labels[:, 0]`` is always ``-100`` (the BOS / first
prompt token is never predicted).
"""

from dualoptax import FORGET, RETAIN
from train.data.batches import (
  IGNORE_INDEX,
  QABatch,
  QADataset,
  TokenizationConfig,
  TokenizedQA,
  collate,
)
from train.data.samplers import AlternatingSampler, JointSampler, SamplerState
from train.data.splits import (
  FALLBACK_RETAIN_SPLIT,
  IDK_FILE_NAME,
  TofuSplits,
  complement_retain_split,
  find_idk_file,
  load_idk_answers,
  load_unlearning_data,
  resolve_retain_split,
)
from train.data.streams import BatchingConfig, BatchStream, StreamPosition, make_batch_streams

__all__ = [
  "FALLBACK_RETAIN_SPLIT",
  "FORGET",
  "IDK_FILE_NAME",
  "IGNORE_INDEX",
  "RETAIN",
  "AlternatingSampler",
  "BatchStream",
  "BatchingConfig",
  "JointSampler",
  "QABatch",
  "QADataset",
  "SamplerState",
  "StreamPosition",
  "TofuSplits",
  "TokenizationConfig",
  "TokenizedQA",
  "collate",
  "complement_retain_split",
  "find_idk_file",
  "load_idk_answers",
  "load_unlearning_data",
  "make_batch_streams",
  "resolve_retain_split",
]
