"""Prompt templates and the tokenization of (question, answer) pairs for scoring.

Two kinds of template:

* A :class:`PromptTemplate` (the presets ``"plain"``, ``"phi"``, ``"llama2-chat"``,
  ``"phi3-chat"``): ``system_prompt + question_start + question + question_end +
  answer_start``, tokenized with the tokenizer's special tokens (e.g. BOS). The answer ends
  with the tokenizer's EOS, as TOFU does.
* A :class:`ChatTemplate` (the name ``"chat"``): the tokenizer's own chat template renders the
  prompt (``apply_chat_template(..., add_generation_prompt=True)``), so any chat checkpoint
  works without a preset. The rendered text already holds the special tokens the template
  wants (BOS or not), so it is tokenized without adding any. The answer ends with the
  template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``, ...): the first
  special token the template writes after an assistant answer. What the template writes
  after that token (a newline, the next turn) is never part of the sequence.

In both cases the scored text is the prompt followed directly by the answer (plus the end
token when ``append_eos``: the end of the answer is part of what is scored).

Which tokens are answer tokens (the *answer boundary* convention, :data:`ANSWER_BOUNDARIES`):
the prompt and the prompt+answer text are always tokenized separately, then

* ``"answer"`` (the default): the answer tokens are the tokens of prompt+answer after their
  longest common prefix with the prompt's tokens. This is exact when the tokenizer splits at
  the prompt/answer boundary and, when a boundary token merges the two (``"Answer: "`` +
  ``"The"`` gives ``"ĠThe"`` in byte-level BPE), it counts the merged token as an answer
  token instead of masking one answer token too many.
* ``"open-unlearning"``: open-unlearning's ``preprocess_chat_instance``: the labels start at
  ``len(prompt tokens)`` in the prompt+answer tokens, whether or not those are a prefix. With
  the ``"phi"`` template the prompt ``"...Answer: "`` ends in a lone ``"Ġ"`` while
  prompt+answer has ``"ĠThe"`` there, so the first answer token is never scored. EOS (the
  tokenizer's) is appended unless the sequence already ends with it. With a chat template the
  scored text is the whole rendered conversation: the answer, the end-of-turn token, whatever
  the template writes after it (e.g. a newline), then EOS.

Over-long sequences: :func:`encode_answer` cuts to ``max_length`` after appending the end
token (the end is lost; the training data's behaviour, as the DualOptim authors' training
code), or with ``end_after_cut`` cuts the text's tokens first and then appends the end token,
so it is always scored (open-unlearning's evaluation: ``max_length`` tokens plus the end).

:class:`PromptEncoder` applies either kind with one tokenizer; the data and evaluation code
use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeAlias

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


# A question and an answer no chat template alters, to find what follows an answer.
_PROBE_QUESTION = "What is the probe question"
_PROBE_ANSWER = "This is the probe answer"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Prompts rendered by the tokenizer's own chat template.

  Attributes:
    system_prompt: A system message before the question; ``None`` sends none (the
      template may still add its default one, as SmolLM2's does).
    end_of_turn: The token that ends the assistant's turn, appended to (and scored with)
      each answer; ``None`` finds it: the first special token the template writes after
      an assistant answer.
  """

  system_prompt: str | None = None
  end_of_turn: str | None = None

  def messages(self, question: str) -> list[dict[str, str]]:
    """The conversation that asks ``question``."""
    system = (
      [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
    )
    return [*system, {"role": "user", "content": question}]

  def prompt(self, question: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The rendered conversation up to the assistant's answer (the generation prompt).

    Raises:
      ValueError: The tokenizer has no chat template, or the template fails to render.
    """
    return _apply_chat_template(tokenizer, self.messages(question), add_generation_prompt=True)

  def end_of_turn_token(self, tokenizer: PreTrainedTokenizerBase) -> str:
    """The token that ends an assistant answer: :attr:`end_of_turn`, else found by rendering
    a conversation with an answer and taking the first special token after that answer.

    Raises:
      ValueError: No chat template; the template does not write the answer as given; or no
        special token follows it with only whitespace between (the message names the
        tokenizer and shows the text; pass ``end_of_turn``).
    """
    if self.end_of_turn is not None:
      return self.end_of_turn
    after = self.text_after_answer(tokenizer)
    found = _first_special_token(after, _special_tokens(tokenizer))
    if found is None or after[: found[0]].strip():
      raise ValueError(
        f"cannot find the end-of-turn token of {_tokenizer_name(tokenizer)}'s chat template: "
        f"no special token directly follows the assistant's answer (it is followed by "
        f"{after[:80]!r}); pass ChatTemplate(end_of_turn=...)"
      )
    return found[1]

  def text_after_answer(self, tokenizer: PreTrainedTokenizerBase) -> str:
    """What the template writes after an assistant answer that ends the conversation (the
    end-of-turn token and anything after it), found by rendering a probe conversation.

    Raises:
      ValueError: No chat template, or the template does not write the answer as given.
    """
    answered = [*self.messages(_PROBE_QUESTION), {"role": "assistant", "content": _PROBE_ANSWER}]
    rendered = _apply_chat_template(tokenizer, answered, add_generation_prompt=False)
    position = rendered.rfind(_PROBE_ANSWER)
    if position < 0:
      raise ValueError(
        f"the chat template of {_tokenizer_name(tokenizer)} does not write the assistant's "
        f"answer as given (rendered {rendered[-200:]!r}); pass ChatTemplate(end_of_turn=...)"
      )
    return rendered[position + len(_PROBE_ANSWER) :]


Template: TypeAlias = PromptTemplate | ChatTemplate
"""Either kind of template."""

ANSWER_BOUNDARIES: tuple[str, ...] = ("answer", "open-unlearning")
"""The answer-boundary conventions (see the module docstring)."""

CHAT_TEMPLATE_NAME = "chat"
"""The template name that selects the tokenizer's chat template (:class:`ChatTemplate`)."""

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


def template_names() -> tuple[str, ...]:
  """Every name :func:`get_prompt_template` accepts: the presets, then ``"chat"``."""
  return (*PROMPT_TEMPLATES, CHAT_TEMPLATE_NAME)


def get_prompt_template(name_or_template: str | Template) -> Template:
  """Returns a preset template by name, or ``ChatTemplate()`` for ``"chat"`` (a template is
  returned as is).

  Raises:
    ValueError: An unknown name; the message lists the names.
  """
  if isinstance(name_or_template, (PromptTemplate, ChatTemplate)):
    return name_or_template
  if name_or_template == CHAT_TEMPLATE_NAME:
    return ChatTemplate()
  try:
    return PROMPT_TEMPLATES[name_or_template]
  except KeyError:
    raise ValueError(
      f"unknown prompt template {name_or_template!r}; presets: {sorted(PROMPT_TEMPLATES)}, "
      f"or {CHAT_TEMPLATE_NAME!r} for the tokenizer's own chat template"
    ) from None


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
  name = getattr(tokenizer, "name_or_path", "") or "(unnamed)"
  return f"the tokenizer {name!r} ({type(tokenizer).__name__})"


def _apply_chat_template(
  tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool
) -> str:
  """``messages`` rendered as text by the tokenizer's chat template; errors name it."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(
      f"the prompt template {CHAT_TEMPLATE_NAME!r} needs a tokenizer with a chat template, and "
      f"{_tokenizer_name(tokenizer)} has none; use a chat model's tokenizer, set "
      f"tokenizer.chat_template, or a preset: {sorted(PROMPT_TEMPLATES)}"
    )
  try:
    import jinja2  # noqa: PLC0415 (transformers renders chat templates with it)
  except ImportError as e:
    raise ImportError("chat templates need jinja2: pip install jinja2") from e
  try:
    return tokenizer.apply_chat_template(
      messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
  except jinja2.TemplateError as e:
    roles = [m["role"] for m in messages]
    raise ValueError(
      f"the chat template of {_tokenizer_name(tokenizer)} fails on the roles {roles}: {e}"
    ) from e


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> set[str]:
  """The tokenizer's special tokens and added tokens (chat templates' control tokens)."""
  added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
  return set(tokenizer.all_special_tokens) | {getattr(t, "content", str(t)) for t in added.values()}


def _first_special_token(text: str, tokens: set[str]) -> tuple[int, str] | None:
  """``(position, token)`` of the earliest token of ``tokens`` in ``text`` (the longest one
  when several start there), or ``None``."""
  found = [(text.find(t), -len(t), t) for t in tokens if t and t in text]
  if not found:
    return None
  position, _, token = min(found)
  return position, token


@dataclasses.dataclass(frozen=True)
class EncodedAnswer:
  """A prompt+answer token sequence and where its answer starts.

  Attributes:
    input_ids: Prompt tokens then answer tokens (then the end token when appended).
    num_prompt_tokens: How many leading tokens are prompt (not scored); at least 1.
    truncated: Whether the sequence was cut to the maximum length.
  """

  input_ids: tuple[int, ...]
  num_prompt_tokens: int
  truncated: bool = False

  @property
  def num_answer_tokens(self) -> int:
    return len(self.input_ids) - self.num_prompt_tokens


def encode_prompt(
  tokenizer: PreTrainedTokenizerBase, prompt: str, *, add_special_tokens: bool = True
) -> list[int]:
  """Token ids of a prompt, with the tokenizer's special tokens (e.g. BOS) unless
  ``add_special_tokens=False`` (a chat-rendered prompt holds them already)."""
  return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])


def _common_prefix_length(a: list[int], b: list[int]) -> int:
  length = 0
  for x, y in zip(a, b):
    if x != y:
      break
    length += 1
  return length


def _num_prompt_tokens(
  prompt_ids: list[int], full_ids: list[int], boundary: str, max_length: int | None
) -> int:
  """Where the answer starts in ``full_ids`` under the ``boundary`` convention."""
  if boundary == "answer":
    return _common_prefix_length(prompt_ids, full_ids)
  if boundary == "open-unlearning":
    # open-unlearning tokenizes the prompt with the same truncation as prompt+answer.
    return len(prompt_ids) if max_length is None else min(len(prompt_ids), max_length)
  raise ValueError(f"answer boundary must be one of {ANSWER_BOUNDARIES}, got {boundary!r}")


def _end_id(tokenizer: PreTrainedTokenizerBase, eos_token_id: int | None) -> int:
  end_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
  if end_id is None:
    raise ValueError(
      "append_eos=True but the tokenizer has no eos_token; set one or pass append_eos=False"
    )
  return end_id


def _with_end(ids: list[int], end_id: int, num_prompt: int, boundary: str) -> list[int]:
  """``ids`` with the end token appended unless it already ends with it (open-unlearning's
  rule; the ``"answer"`` convention also appends it when no answer token precedes it)."""
  if not ids or ids[-1] != end_id or (boundary == "answer" and len(ids) == num_prompt):
    return [*ids, end_id]
  return ids


def encode_answer(
  tokenizer: PreTrainedTokenizerBase,
  prompt: str,
  answer: str,
  *,
  append_eos: bool = True,
  max_length: int | None = None,
  add_special_tokens: bool = True,
  eos_token_id: int | None = None,
  boundary: str = "answer",
  end_after_cut: bool = False,
  answer_suffix: str = "",
) -> EncodedAnswer:
  """Tokenizes ``prompt + answer`` and finds the answer tokens (see the module docstring).

  Args:
    tokenizer: Any Hugging Face tokenizer.
    prompt: The formatted prompt (:meth:`PromptEncoder.prompt`).
    answer: The answer text.
    append_eos: Append the end token to the answer (scored like the answer).
    max_length: Cut the sequence to this many tokens (answer tokens are dropped from the
      end); ``None`` keeps all.
    add_special_tokens: Let the tokenizer add its special tokens (e.g. BOS); ``False`` for
      text that holds them already (a chat template's).
    eos_token_id: The end token; ``None`` uses the tokenizer's EOS.
    boundary: Which tokens are the answer's: ``"answer"`` or ``"open-unlearning"``.
    end_after_cut: Cut to ``max_length`` first, then append the end token (always scored;
      up to ``max_length + 1`` tokens); by default the end token is appended first and
      lost with the cut.
    answer_suffix: Text after the answer that is scored with it (open-unlearning's chat
      rendering: the end-of-turn token and what follows).

  Raises:
    ValueError: No end token while ``append_eos``; the prompt has no token; an unknown
      ``boundary``; or no answer token is left (an empty answer without the end token, or
      the prompt alone reaching ``max_length``).
  """
  prompt_ids = encode_prompt(tokenizer, prompt, add_special_tokens=add_special_tokens)
  full_ids = encode_prompt(
    tokenizer, prompt + answer + answer_suffix, add_special_tokens=add_special_tokens
  )
  num_prompt = _num_prompt_tokens(prompt_ids, full_ids, boundary, max_length)
  if num_prompt == 0:
    raise ValueError(
      f"the prompt {prompt!r} gives no token before the answer; the first answer token "
      "cannot be scored (use a template with text before the answer or a BOS token)"
    )
  end_id = _end_id(tokenizer, eos_token_id) if append_eos else None
  if end_after_cut:  # cut, then end: the end token is always scored
    truncated = max_length is not None and len(full_ids) > max_length
    full_ids = full_ids[:max_length]
    if end_id is not None:
      full_ids = _with_end(full_ids, end_id, num_prompt, boundary)
  else:  # end, then cut: an over-long sequence loses its end token
    if end_id is not None:
      full_ids = _with_end(full_ids, end_id, num_prompt, boundary)
    truncated = max_length is not None and len(full_ids) > max_length
    full_ids = full_ids[:max_length]
  if len(full_ids) <= num_prompt:
    raise ValueError(
      f"no answer token to score for prompt {prompt[:80]!r} and answer {answer[:80]!r} "
      f"({num_prompt} prompt tokens, max_length={max_length})"
    )
  return EncodedAnswer(tuple(full_ids), num_prompt, truncated)


@dataclasses.dataclass(frozen=True, eq=False)
class PromptEncoder:
  """A template applied with one tokenizer: prompts, their tokens and the scored sequences.

  Make one with :meth:`create`.

  Attributes:
    template: The template.
    tokenizer: The tokenizer.
    end_token_id: The token that ends each answer (appended when ``append_eos``): the chat
      template's end-of-turn token (the tokenizer's EOS under the ``"open-unlearning"``
      boundary, which scores the end-of-turn token as part of :attr:`answer_suffix`), or
      the tokenizer's EOS (``None`` if it has none) for a :class:`PromptTemplate`.
    add_special_tokens: Whether tokenizing adds the tokenizer's special tokens: yes for a
      :class:`PromptTemplate`, no for chat-rendered text (it holds them already).
    boundary: The answer-boundary convention (:data:`ANSWER_BOUNDARIES`).
    answer_suffix: Text scored after each answer (``"open-unlearning"`` with a chat
      template: what the template writes after an answer); empty otherwise.
    turn_end_id: A chat template's end-of-turn token (generations stop at it); ``None`` for
      a :class:`PromptTemplate`.
  """

  template: Template
  tokenizer: PreTrainedTokenizerBase
  end_token_id: int | None
  add_special_tokens: bool
  boundary: str = "answer"
  answer_suffix: str = ""
  turn_end_id: int | None = None

  @classmethod
  def create(
    cls, template: str | Template, tokenizer: PreTrainedTokenizerBase, boundary: str = "answer"
  ) -> PromptEncoder:
    """The encoder of ``template`` (a name or a template) with ``tokenizer``.

    Raises:
      ValueError: An unknown template name or boundary; for a chat template, a tokenizer
        without one, or an end-of-turn token that is not found or not a single token.
    """
    if boundary not in ANSWER_BOUNDARIES:
      raise ValueError(f"answer boundary must be one of {ANSWER_BOUNDARIES}, got {boundary!r}")
    template = get_prompt_template(template)
    if isinstance(template, PromptTemplate):
      return cls(template, tokenizer, tokenizer.eos_token_id, True, boundary)
    token = template.end_of_turn_token(tokenizer)
    ids = encode_prompt(tokenizer, token, add_special_tokens=False)
    if len(ids) != 1:
      raise ValueError(
        f"the end-of-turn token {token!r} is not one token of {_tokenizer_name(tokenizer)} "
        f"(it encodes as {ids})"
      )
    if boundary == "open-unlearning":
      suffix = template.text_after_answer(tokenizer)
      return cls(template, tokenizer, tokenizer.eos_token_id, False, boundary, suffix, ids[0])
    return cls(template, tokenizer, ids[0], False, boundary, "", ids[0])

  def prompt(self, question: str) -> str:
    """The prompt the model sees for ``question`` (its answer follows directly)."""
    if isinstance(self.template, ChatTemplate):
      return self.template.prompt(question, self.tokenizer)
    return self.template.prompt(question)

  def encode_prompt(self, prompt: str) -> list[int]:
    """Token ids of a prompt made by :meth:`prompt`."""
    return encode_prompt(self.tokenizer, prompt, add_special_tokens=self.add_special_tokens)

  def encode_answer(
    self,
    prompt: str,
    answer: str,
    *,
    append_eos: bool = True,
    max_length: int | None = None,
    end_after_cut: bool = False,
  ) -> EncodedAnswer:
    """:func:`encode_answer` with this template's special tokens, end token, suffix and
    boundary convention."""
    return encode_answer(
      self.tokenizer,
      prompt,
      answer,
      append_eos=append_eos,
      max_length=max_length,
      add_special_tokens=self.add_special_tokens,
      eos_token_id=self.end_token_id,
      boundary=self.boundary,
      end_after_cut=end_after_cut,
      answer_suffix=self.answer_suffix,
    )

  @property
  def stop_token_ids(self) -> tuple[int, ...]:
    """Tokens that end a generated answer: the end-of-turn token, the end token, then the
    tokenizer's EOS."""
    ids = (self.turn_end_id, self.end_token_id, self.tokenizer.eos_token_id)
    return tuple(dict.fromkeys(i for i in ids if i is not None))

  def describe(self) -> dict[str, Any]:
    """The template as JSON (with the end-of-turn token a chat template uses)."""
    described: dict[str, Any] = dataclasses.asdict(self.template)
    if isinstance(self.template, ChatTemplate):
      end = self.tokenizer.convert_ids_to_tokens(self.turn_end_id)
      described.update(kind=CHAT_TEMPLATE_NAME, end_of_turn=end)
    return described

  def describe_tokenizer(self) -> dict[str, Any]:
    """The tokenizer's name, class and vocabulary size (recorded with every evaluation)."""
    return describe_tokenizer(self.tokenizer)


def describe_tokenizer(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
  """``{"name_or_path", "class", "vocab_size"}`` of a tokenizer (``vocab_size`` counts
  added tokens: ``len(tokenizer)``)."""
  return {
    "name_or_path": getattr(tokenizer, "name_or_path", "") or None,
    "class": type(tokenizer).__name__,
    "vocab_size": len(tokenizer),
  }
