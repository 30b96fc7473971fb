"""A small byte-level BPE tokenizer trained offline, for runs without a model hub.

The default experiment trains a tiny model from scratch on the synthetic benchmark
(:mod:`train.data.synthetic`), so it needs a tokenizer without downloading one. A byte-level BPE
(GPT-2 style) covers any text, so no token is ever unknown, and a vocabulary of about a
thousand tokens keeps every question-and-answer sequence of that benchmark short.

Special tokens: ``<pad>`` (id 0), ``<s>`` (BOS, id 1) and ``</s>`` (EOS, id 2). Encoding
with special tokens puts BOS first (so the first answer token of an empty prompt could still
be scored) and never appends EOS: :func:`train.data.prompting.encode_answer` appends
EOS after the answer itself.

Typical use::

    texts = tofu_corpus_texts("runs/data")      # every string of the TOFU-format files
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    save_tokenizer(tokenizer, "runs/tokenizer")
    tokenizer = load_tokenizer("runs/tokenizer")
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from train.data import tofu
from train.data.prompting import PromptTemplate, Template, get_prompt_template
from train.data.splits import IDK_FILE_NAME

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
"""In id order: the trainer gives special tokens the first ids."""


def train_tokenizer(
  texts: Iterable[str], vocab_size: int = 1024, *, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
  """Trains a byte-level BPE tokenizer on ``texts``.

  Training is deterministic: the same texts give the same vocabulary and merges.

  Args:
    texts: The training corpus, one string per document (e.g. one answer).
    vocab_size: Largest vocabulary, special tokens and the 256 byte tokens included; the
      vocabulary stops growing earlier when no pair of tokens occurs ``min_frequency``
      times.
    min_frequency: A pair of tokens must occur this often to be merged.

  Returns:
    A Hugging Face fast tokenizer with ``pad_token``, ``bos_token`` and ``eos_token`` set.
    Its size (``len(tokenizer)``) is the model's vocabulary size.

  Raises:
    ValueError: ``vocab_size`` cannot hold the special and byte tokens, ``min_frequency``
      is below 1, or ``texts`` is empty.
  """
  min_vocab = len(SPECIAL_TOKENS) + 256
  if vocab_size < min_vocab:
    raise ValueError(
      f"vocab_size must be >= {min_vocab} (special tokens + 256 bytes), got {vocab_size}"
    )
  if min_frequency < 1:
    raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
  corpus = list(texts)
  if not corpus:
    raise ValueError("texts is empty; a tokenizer needs some training text")

  bpe = Tokenizer(models.BPE())
  # add_prefix_space=False: "Answer: " + "The" must tokenize like the running text it
  # came from; a forced leading space would change the first token of every prompt.
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=list(SPECIAL_TOKENS),
    # Every byte is in the vocabulary even if the corpus lacks it: nothing is unknown.
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  bpe.train_from_iterator(corpus, trainer=trainer)
  bos_id = bpe.token_to_id(BOS_TOKEN)
  bpe.post_processor = processors.TemplateProcessing(
    single=f"{BOS_TOKEN} $A",
    pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
    special_tokens=[(BOS_TOKEN, bos_id)],
  )
  return PreTrainedTokenizerFast(
    tokenizer_object=bpe,
    bos_token=BOS_TOKEN,
    eos_token=EOS_TOKEN,
    pad_token=PAD_TOKEN,
    padding_side="right",
  )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | os.PathLike[str]) -> str:
  """Saves a tokenizer (Hugging Face format) to ``folder``, created if needed; returns it."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  tokenizer.save_pretrained(folder)
  return folder


def load_tokenizer(folder: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
  """Loads a tokenizer saved by :func:`save_tokenizer` (offline: a local folder only).

  Raises:
    FileNotFoundError: ``folder`` holds no ``tokenizer.json``.
  """
  folder = os.fspath(folder)
  if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
    raise FileNotFoundError(f"no tokenizer.json in {folder!r}; save one with save_tokenizer first")
  return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)


def item_corpus_texts(items: Iterable[tofu.TofuItem], template: str | Template) -> list[str]:
  """The prompt (as ``template`` renders it, so a preset's tags get tokens of their own;
  a chat template's question as is) and the answer of every item, in order: the corpus of
  a tiny model's tokenizer for data read as items (instruction files, multi-task files)."""
  preset = get_prompt_template(template)
  texts: list[str] = []
  for item in items:
    prompt = preset.prompt(item.question) if isinstance(preset, PromptTemplate) else item.question
    texts += [prompt, item.answer]
  return texts


def tofu_corpus_texts(
  data_dir: str | os.PathLike[str], template: str | Template | None = None
) -> list[str]:
  """Every string of the TOFU-format files in ``data_dir``, to train a tokenizer on.

  Reads every ``*.json`` file (questions, answers, paraphrases, perturbed answers, original
  answers) and ``idontknow.jsonl`` (the refusal answers) in sorted file order, so the
  corpus, and hence the trained tokenizer, is the same on every machine.

  Args:
    data_dir: The TOFU-format folder.
    template: When given, questions enter the corpus as formatted prompts, so the
      template's tags (``"Question: "``, ``"Answer: "``) get tokens of their own instead
      of being spelled out letter by letter in every sequence. A chat template (``"chat"``)
      adds nothing: it comes with a tokenizer, not from the trained one.

  Raises:
    FileNotFoundError: ``data_dir`` holds no ``*.json`` file.
  """
  data_dir = os.fspath(data_dir)
  paths = sorted(glob.glob(os.path.join(data_dir, "*.json")))
  if not paths:
    raise FileNotFoundError(f"no *.json TOFU file in {data_dir!r}")
  prompt_template = None if template is None else get_prompt_template(template)
  if not isinstance(prompt_template, PromptTemplate):
    prompt_template = None  # a chat template: rendered by a tokenizer, which is being made
  texts: list[str] = []
  for path in paths:
    for _, row in tofu.iter_json_lines(path):
      if prompt_template is not None and isinstance(row.get("question"), str):
        texts.append(prompt_template.prompt(row["question"]))
      for key in (
        "question",
        "answer",
        "paraphrased_answer",
        "paraphrased_question",
        "original_answer",
      ):
        if isinstance(row.get(key), str):
          texts.append(row[key])
      texts.extend(t for t in row.get("perturbed_answer", ()) if isinstance(t, str))
  idk_path = os.path.join(data_dir, IDK_FILE_NAME)
  if os.path.isfile(idk_path):
    with open(idk_path, encoding="utf-8") as f:
      texts.extend(line.strip() for line in f if line.strip())
  return texts
