"""Prompt templates and the tokenization of (question, answer) pairs for scoring.

A prompt is ``system_prompt + question_start + question + question_end + answer_start``;
the scored text is the prompt followed directly by the answer (plus the EOS token when
``append_eos``, as TOFU does: the end of the answer is part of what is scored).

Which tokens are answer tokens: the prompt and the prompt+answer text are tokenized
separately (both with the tokenizer's special tokens, e.g. BOS); the answer tokens are the
tokens of prompt+answer after their longest common prefix with the prompt's tokens. This
is exact when the tokenizer splits at the prompt/answer boundary and, when a boundary token
merges the two (``"Answer: "`` + ``"The"`` gives ``"ĠThe"`` in byte-level BPE), it counts
the merged token as an answer token instead of masking one answer token too many.
"""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """How a question becomes a prompt.

  Attributes:
    question_start: Text before the question.
    question_end: Text after the question.
    answer_start: Text after ``question_end``, right before the answer.
    system_prompt: Text before everything else.
  """

  question_start: str = ""
  question_end: str = "\n"
  answer_start: str = ""
  system_prompt: str = ""

  def prompt(self, question: str) -> str:
    """The prompt the model sees for ``question`` (its answer follows directly)."""
    return (
      f"{self.system_prompt}{self.question_start}{question}{self.question_end}{self.answer_start}"
    )


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
  # The question on its own line, the answer on the next.
  "plain": PromptTemplate(question_start="", question_end="\n", answer_start=""),
  # TOFU's Phi-1.5 format: "Question: ...\nAnswer: ...".
  "phi": PromptTemplate(question_start="Question: ", question_end="\n", answer_start="Answer: "),
  # TOFU's Llama-2-chat format: "[INST] ... [/INST]..." (the answer follows the tag directly).
  "llama2-chat": PromptTemplate(question_start="[INST] ", question_end=" [/INST]", answer_start=""),
  # Phi-3 chat format, as the DualOptim authors' code writes it.
  "phi3-chat": PromptTemplate(
    question_start="<|user|>\n", question_end="<|end|>\n<|assistant|>\n", answer_start=""
  ),
}
"""Preset templates by name; see :func:`get_prompt_template`."""


def get_prompt_template(name_or_template: str | PromptTemplate) -> PromptTemplate:
  """Returns a preset template by name (a template is returned as is).

  Raises:
    ValueError: An unknown name; the message lists the presets.
  """
  if isinstance(name_or_template, PromptTemplate):
    return name_or_template
  try:
    return PROMPT_TEMPLATES[name_or_template]
  except KeyError:
    raise ValueError(
      f"unknown prompt template {name_or_template!r}; presets: {sorted(PROMPT_TEMPLATES)}"
    ) from None


@dataclasses.dataclass(frozen=True)
class EncodedAnswer:
  """A prompt+answer token sequence and where its answer starts.

  Attributes:
    input_ids: Prompt tokens then answer tokens (then EOS when appended).
    num_prompt_tokens: How many leading tokens are prompt (not scored); at least 1.
    truncated: Whether the sequence was cut to the maximum length.
  """

  input_ids: tuple[int, ...]
  num_prompt_tokens: int
  truncated: bool = False

  @property
  def num_answer_tokens(self) -> int:
    return len(self.input_ids) - self.num_prompt_tokens


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
  """Token ids of a prompt, with the tokenizer's special tokens (e.g. BOS)."""
  return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_answer(
  tokenizer: PreTrainedTokenizerBase,
  prompt: str,
  answer: str,
  *,
  append_eos: bool = True,
  max_length: int | None = None,
) -> EncodedAnswer:
  """Tokenizes ``prompt + answer`` and finds the answer tokens (see the module docstring).

  Args:
    tokenizer: Any Hugging Face tokenizer.
    prompt: The formatted prompt (:meth:`PromptTemplate.prompt`).
    answer: The answer text.
    append_eos: Append the tokenizer's EOS token to the answer (scored like the answer).
    max_length: Cut the sequence to this many tokens (answer tokens are dropped from the
      end); ``None`` keeps all.

  Raises:
    ValueError: The tokenizer has no EOS token while ``append_eos``; the prompt has no
      token; or no answer token is left (an empty answer without EOS, or the prompt alone
      reaching ``max_length``).
  """
  prompt_ids = encode_prompt(tokenizer, prompt)
  full_ids = list(tokenizer(prompt + answer, add_special_tokens=True)["input_ids"])
  num_prompt = 0
  for a, b in zip(prompt_ids, full_ids):
    if a != b:
      break
    num_prompt += 1
  if append_eos:
    if tokenizer.eos_token_id is None:
      raise ValueError(
        "append_eos=True but the tokenizer has no eos_token; set one or pass append_eos=False"
      )
    if not full_ids or full_ids[-1] != tokenizer.eos_token_id or len(full_ids) == num_prompt:
      full_ids.append(tokenizer.eos_token_id)
  if num_prompt == 0:
    raise ValueError(
      f"the prompt {prompt!r} gives no token before the answer; the first answer token "
      "cannot be scored (use a template with text before the answer or a BOS token)"
    )
  truncated = False
  if max_length is not None and len(full_ids) > max_length:
    full_ids, truncated = full_ids[:max_length], True
  if len(full_ids) <= num_prompt:
    raise ValueError(
      f"no answer token to score for prompt {prompt[:80]!r} and answer {answer[:80]!r} "
      f"({num_prompt} prompt tokens, max_length={max_length})"
    )
  return EncodedAnswer(tuple(full_ids), num_prompt, truncated)
