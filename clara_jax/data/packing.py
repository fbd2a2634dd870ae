"""Token ids -> the static-shape arrays of `clara_jax.model.clara` (numpy, host side).

Two layouts:
* encoder rows: `<ENC><s> text </s>` left-padded to `body_len`, then the memory tokens;
* generator rows: a left-padded prompt region (with memory placeholder slots) followed
  by a right-padded answer region whose supervised tokens are the answer and its eos.

Truncation never fails silently: every packer returns how many rows it truncated.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

import numpy as np

# Tokens an encoder row wraps around its text: <ENC>, <s> and </s>.
ENCODER_FRAME = 3


def encoder_length(text_len: int, n_mem: int) -> int:
  """Length of an encoder row for texts of up to `text_len` tokens and n_mem memories."""
  return text_len + ENCODER_FRAME + n_mem


def pack_encoder(
  texts_ids: Sequence[Sequence[int]],
  body_len: int,
  mem_ids: Sequence[int],
  enc_id: int,
  bos_id: int,
  eos_id: int,
  pad_id: int,
) -> Tuple[np.ndarray, np.ndarray, int]:
  """Encoder rows for documents or questions.

  Args:
    texts_ids: token ids of each text (no special tokens).
    body_len: length of the `<ENC><s> text </s>` block; longer texts are cut so that
      `</s>` still ends the block.
    mem_ids: the n_mem memory token ids appended after the block.

  Returns:
    (tokens [R, body_len + n_mem] int32, mask same shape int32, rows truncated).
  """
  if body_len < 4:
    raise ValueError(f"body_len must leave room for <ENC><s> ... </s>, got {body_len}")
  n_mem = len(mem_ids)
  tokens = np.full((len(texts_ids), body_len + n_mem), pad_id, np.int32)
  mask = np.zeros_like(tokens)
  truncated = 0
  room = body_len - ENCODER_FRAME
  for row, ids in enumerate(texts_ids):
    ids = list(ids)
    if len(ids) > room:
      ids, truncated = ids[:room], truncated + 1
    block = [enc_id, bos_id] + ids + [eos_id]
    tokens[row, body_len - len(block) : body_len] = block
    mask[row, body_len - len(block) : body_len] = 1
  tokens[:, body_len:] = np.asarray(mem_ids, np.int32)
  mask[:, body_len:] = 1
  return tokens, mask, truncated


def slot_ids(n_mem: int, k: int, mem_ids: Sequence[int], sep_id: int) -> List[int]:
  """The generator's placeholders: `<MEM0>..<MEM{n-1}><SEP>` repeated k times."""
  return (list(mem_ids[:n_mem]) + [sep_id]) * k


def _fit_row(
  row: int,
  prompt: Sequence[int],
  answer: Sequence[int],
  prompt_len: int,
  answer_len: int,
  mem_set: Set[int],
  eos_id: int,
) -> Tuple[List[int], List[int], bool]:
  """(prompt, answer + eos, whether either was cut) cut to their regions: the prompt
  from the left (never through a memory slot), the answer at the right (keeping eos)."""
  prompt, answer = list(prompt), list(answer) + [eos_id]
  was_cut = False
  if len(prompt) > prompt_len:
    cut = prompt[: len(prompt) - prompt_len]
    if any(t in mem_set for t in cut):
      raise ValueError(
        f"row {row}: prompt of {len(prompt)} tokens does not fit "
        f"prompt_len={prompt_len} without cutting a memory slot"
      )
    prompt, was_cut = prompt[len(prompt) - prompt_len :], True
  if len(answer) > answer_len:
    answer, was_cut = answer[: answer_len - 1] + [eos_id], True
  return prompt, answer, was_cut


def pack_generator(
  prompts_ids: Sequence[Sequence[int]],
  answers_ids: Sequence[Sequence[int]],
  prompt_len: int,
  answer_len: int,
  mem_ids: Sequence[int],
  n_slots: int,
  eos_id: int,
  pad_id: int,
) -> Tuple[Dict[str, np.ndarray], int]:
  """Generator rows.

  Args:
    prompts_ids: full prompt ids (bos, instruction, placeholder slots, question ...),
      containing exactly `n_slots * n_mem` memory-token ids, in slot order.
    answers_ids: answer ids without eos; eos is appended and supervised.
    prompt_len, answer_len: region sizes. Prompts longer than `prompt_len` lose tokens
      from the left but never a memory slot (that is an error); answers are cut at the
      right, keeping the eos.

  Returns:
    ({"gen_tokens" [B, P + A], "gen_mask", "slot_positions" [B, n_slots * n_mem],
      "answer_mask" [B, A]}, rows truncated).
  """
  mem_set = set(int(i) for i in mem_ids)
  b = len(prompts_ids)
  n_mem = len(mem_ids)
  tokens = np.full((b, prompt_len + answer_len), pad_id, np.int32)
  mask = np.zeros_like(tokens)
  answer_mask = np.zeros((b, answer_len), np.int32)
  slots = np.zeros((b, n_slots * n_mem), np.int32)
  truncated = 0
  for row, (prompt, answer) in enumerate(zip(prompts_ids, answers_ids)):
    prompt, answer, was_cut = _fit_row(row, prompt, answer, prompt_len, answer_len, mem_set, eos_id)
    truncated += was_cut
    start = prompt_len - len(prompt)
    tokens[row, start:prompt_len] = prompt
    mask[row, start:prompt_len] = 1
    tokens[row, prompt_len : prompt_len + len(answer)] = answer
    mask[row, prompt_len : prompt_len + len(answer)] = 1
    answer_mask[row, : len(answer)] = 1
    positions = [start + i for i, t in enumerate(prompt) if t in mem_set]
    if len(positions) != n_slots * n_mem:
      raise ValueError(
        f"row {row}: prompt has {len(positions)} memory placeholders, "
        f"expected {n_slots} slots x {n_mem} = {n_slots * n_mem}"
      )
    slots[row] = positions
  return (
    {"gen_tokens": tokens, "gen_mask": mask, "slot_positions": slots, "answer_mask": answer_mask},
    truncated,
  )
