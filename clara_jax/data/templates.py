"""The generator prompts of each stage (behaviour of the reference implementation).

The generator never sees document text: each document is a placeholder slot
`<MEM0>..<MEM{n-1}><SEP>` whose embeddings are replaced by the document's memories.
Prompts are rendered in the base model's chat format by the tokenizer
(`ClaraTokenizer.encode_prompt`: Mistral-Instruct with the system text merged into the
user turn, or ChatML).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, cast

import numpy as np

from clara_jax.data.tokenizer import SEP_TOKEN, mem_token

QA_SYSTEM = (
  "You are a helpful assistant. Given a document, your task is to generate some "
  "single questions to cover all key information of the document and answer "
  "them sequentially."
)
PARAPHRASE_SYSTEM = (
  "You are a helpful assistant. Your task is follow the instructions to "
  "paraphrase the background information."
)
ANSWER_SYSTEM = (
  "You are a helpful assistant. Your task is to extract relevant information "
  "from provided documents and to answer to questions as briefly as possible."
)

# The paraphrase instructions of CLaRa's compressor pretraining; one is drawn per example.
PARAPHRASE_INSTRUCTIONS: Tuple[str, ...] = (
  "Background: {docs} means the same as",
  "Background: {docs} Can you put the above sentences in your own terms?",
  "Background: {docs} Please provide a reinterpretation of the preceding background text.",
  "These two expressions are equivalent in essence:\n(1) {docs}\n(2)",
  "Background: {docs} is a paraphrase of what?",
  "Background: {docs} Could you give me a different version of the background sentences above?",
  "In other words, background: {docs} is just another way of saying:",
  "You're getting across the same point whether you say background: {docs} or",
  "Background: {docs} After unpacking the ideas in the background information above, we got:",
  "Background: {docs} Please offer a restatement of the background sentences I've just read.",
  "Background: {docs}, which also means:",
  "Strip away the mystery, and you'll find background: {docs} is simply another rendition of:",
  "The essence of background: {docs} is captured again in the following statement:",
)


# "reference": the reference's English system prompts and instructions. "short": no
# system text and one fixed instruction, for small from-scratch models whose vocabulary
# never saw those prompts (they would cost ~100 tokens of every example).
PROMPT_STYLES = ("reference", "short")


def _check_style(style: str) -> None:
  if style not in PROMPT_STYLES:
    raise ValueError(f"unknown prompt style {style!r}; known: {PROMPT_STYLES}")


def memory_slots(n_mem: int, k: int) -> str:
  """k placeholder slots, each `<MEM0>..<MEM{n-1}><SEP>`, with no separators between."""
  return ("".join(mem_token(i) for i in range(n_mem)) + SEP_TOKEN) * k


def stage1_turn(
  row: Dict, n_mem: int, rng: Optional[np.random.Generator], style: str = "reference"
) -> Tuple[str, str, str]:
  """(system, user, answer) of a stage1 row: all QA pairs, or a paraphrase. `rng`
  (picking the paraphrase instruction) is used only for paraphrase rows in full style."""
  _check_style(style)
  slots = memory_slots(n_mem, 1)
  short = style == "short"
  if row["data_type"] == "qa":
    answer = "\n".join(
      f"Question: {q}\nAnswer: {a}" for q, a in zip(row["question"], row["answers"])
    )
    return "" if short else QA_SYSTEM, f"Background:\n{slots}", answer
  if short:
    return "", PARAPHRASE_INSTRUCTIONS[0].format(docs=slots), row["answers"][0]
  instruction = PARAPHRASE_INSTRUCTIONS[
    int(cast(np.random.Generator, rng).integers(len(PARAPHRASE_INSTRUCTIONS)))
  ]
  return PARAPHRASE_SYSTEM, instruction.format(docs=slots), row["answers"][0]


def answer_turn(question: str, n_mem: int, k: int, style: str = "reference") -> Tuple[str, str]:
  """(system, user) of a question over k document slots (stage1_2, stage2, inference)."""
  _check_style(style)
  system = "" if style == "short" else ANSWER_SYSTEM
  return system, f"Background:\n{memory_slots(n_mem, k)}\n\nQuestion:{question}"
