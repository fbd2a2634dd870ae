"""CLaRa's three roles on the shared decoder, as pure functions of (params, arrays).

Shape letters as in `clara_jax.model` (R rows of an encoder batch, Lt their text block,
n_mem memory tokens, J = k * n_mem memory slots of a prompt, D model width).

Token layouts (built by `clara_jax.data.templates`; all lengths static):

* encoder input (compressor on documents, reasoner on questions): the text block
  `<ENC><s> text </s>` LEFT-padded to its maximum length, then the `n_mem` memory tokens
  `<MEM0>..<MEM{n-1}>`. Left padding keeps the memory tokens right after the text with
  contiguous positions, and puts them at the static slice `[-n_mem:]`.
  Arrays: `tokens [R, Lt + n_mem]`, `mask [R, Lt + n_mem]` (1 = real token).
* generator input: a prompt region of P tokens (left-padded) followed by an answer region
  of A tokens (right-padded). The prompt holds k placeholder slots
  `<MEM0>..<MEM{n-1}><SEP>`; `slot_positions [B, k * n_mem]` says where, slot by slot.
  Arrays: `tokens [B, P + A]`, `mask [B, P + A]`, `answer_mask [B, A]` (1 on supervised
  answer tokens and the end-of-sequence token), `slot_positions`.

The compressor reads out the final-normed hidden states at the memory positions; the
generator's LM head runs only on the A positions that predict the answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, TypeAlias, cast

import jax
import jax.numpy as jnp

from clara_jax.model.decoder import Decoder, DecoderOutput
from clara_jax.ops import losses

Array: TypeAlias = jax.Array
# A nested dict of parameter arrays.
Params: TypeAlias = Any

COMPRESSOR, REASONER, GENERATOR = "compressor", "reasoner", "generator"
MAX_COMPRESSION_RATE = 256
# How memories enter the generator: "none" as the compressor read them out (final-normed
# states, as in the reference); "embedding": each vector rescaled to the token embeddings'
# RMS (`rescale_memories`).
MEMORY_SCALES = ("none", "embedding")


def num_memory_tokens(doc_max_length: int, compr_rate: int) -> int:
  """n_mem = doc_max_length // compr_rate, with a clear error when it does not divide."""
  if not 1 <= compr_rate <= MAX_COMPRESSION_RATE:
    raise ValueError(f"compr_rate must be in [1, {MAX_COMPRESSION_RATE}], got {compr_rate}")
  if doc_max_length <= 0 or doc_max_length % compr_rate:
    raise ValueError(
      f"doc_max_length ({doc_max_length}) must be a positive multiple of compr_rate ({compr_rate})"
    )
  return doc_max_length // compr_rate


@dataclasses.dataclass(frozen=True)
class ClaraConfig:
  """Static CLaRa settings shared by the stage losses.

  Attributes:
    doc_max_length: document tokens before compression (paper: 256).
    compr_rate: compression rate; n_mem = doc_max_length // compr_rate.
    k: documents selected per question (stage 2); documents per prompt otherwise.
    temperature: tau of the straight-through top-k (paper: 0.02).
    mse_weight: weight of the compressor alignment MSE in stages 1 and 1_2 (paper: 0.1).
    train_compressor: stage 2 only; the paper keeps the compressor frozen.
    train_generator: stage 2 only; the paper trains it (False: only retrieval can lower
      the answer loss, which keeps a small generator from memorising answers).
    train_base: stages 1 and 1_2: also train the shared base weights (the paper freezes
      them; a small from-scratch base may lack the capacity to learn reading otherwise).
    retrieval_temperature: InfoNCE temperature of the supervised baseline.
    memory_scale: how memories enter the generator (`MEMORY_SCALES`).
    lexical_weight: weight of the memories' bag-of-tokens loss in stages 1 and 1_2
      (`lexical_loss`; 0: off, as in the paper).
    check_nans: checkify NaN checks on retrieval scores (debug mode).
    compress_chunk: stage 2's frozen compressor reads each question's candidates in
      chunks of this many (a loop: the activations of one chunk at a time).
  """

  doc_max_length: int = 64
  compr_rate: int = 16
  k: int = 5
  temperature: float = 0.02
  mse_weight: float = 0.1
  train_compressor: bool = False
  train_generator: bool = True
  train_base: bool = False
  retrieval_temperature: float = 0.02
  memory_scale: str = "none"
  lexical_weight: float = 0.0
  check_nans: bool = False
  compress_chunk: int = 10

  @property
  def n_mem(self) -> int:
    return num_memory_tokens(self.doc_max_length, self.compr_rate)

  def __post_init__(self) -> None:
    _ = self.n_mem  # validates
    if self.k < 1:
      raise ValueError(f"ClaraConfig.k must be >= 1, got {self.k}")
    if self.temperature <= 0:
      raise ValueError(f"ClaraConfig.temperature must be positive, got {self.temperature}")
    check_memory_scale(self.memory_scale)
    if self.compress_chunk < 1:
      raise ValueError(f"ClaraConfig.compress_chunk must be >= 1, got {self.compress_chunk}")
    if self.lexical_weight < 0:
      raise ValueError(f"ClaraConfig.lexical_weight must be >= 0, got {self.lexical_weight}")


def check_memory_scale(memory_scale: str) -> None:
  if memory_scale not in MEMORY_SCALES:
    raise ValueError(f"memory_scale must be one of {MEMORY_SCALES}, got {memory_scale!r}")


def positions_from_mask(mask_bt: Array) -> Array:
  """RoPE positions that skip left padding: 0 at the first real token."""
  return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def encode(
  model: Decoder,
  params: Params,
  tokens_rt: Array,
  mask_rt: Array,
  n_mem: int,
  adapter: str,
  deterministic: bool = True,
  rng: Optional[Array] = None,
) -> Tuple[Array, Array]:
  """Runs an encoder-layout batch; returns (memory states [R, n_mem, D], all final
  states [R, Lt + n_mem, D])."""
  hidden = final_states(model, params, mask_rt, adapter, deterministic, rng, tokens=tokens_rt)
  return hidden[:, -n_mem:], hidden


def final_states(
  model: Decoder,
  params: Params,
  mask_bt: Array,
  adapter: Optional[str],
  deterministic: bool = True,
  rng: Optional[Array] = None,
  readout: Optional[Tuple[int, Optional[int]]] = None,
  *,
  tokens: Optional[Array] = None,
  embeddings: Optional[Array] = None,
) -> Array:
  """Final-normed states [B, T, D] (with a `readout`, of its positions only) of `tokens`
  [B, T] or input `embeddings` [B, T, D], at positions that skip the left padding of
  `mask_bt`; LoRA dropout from `rng` when not `deterministic`. Encoder batches are
  [R, Lt + n_mem] in the same way."""
  rngs = {"dropout": rng} if rng is not None else {}
  return cast(
    DecoderOutput,
    model.apply(
      {"params": params},
      tokens,
      embeddings=embeddings,
      attention_mask=mask_bt,
      positions=positions_from_mask(mask_bt),
      adapter=adapter,
      deterministic=deterministic,
      rngs=rngs,
      readout=readout,
    ),
  ).hidden


def memories(
  model: Decoder,
  params: Params,
  tokens_rt: Array,
  mask_rt: Array,
  n_mem: int,
  adapter: Optional[str],
  deterministic: bool = True,
  rng: Optional[Array] = None,
) -> Array:
  """Memory states [R, n_mem, D] of an encoder-layout batch, the last layer run only at
  the memory positions (for callers that need no other final state). Extra leading axes
  (e.g. [B, N, Ld + n_mem]) are flattened to R rows, as in `compress`."""
  tokens_rt = tokens_rt.reshape(-1, tokens_rt.shape[-1])
  mask_rt = mask_rt.reshape(-1, mask_rt.shape[-1])
  return final_states(
    model, params, mask_rt, adapter, deterministic, rng, (-n_mem, None), tokens=tokens_rt
  )


def compress(
  model: Decoder,
  params: Params,
  doc_tokens: Array,
  doc_mask: Array,
  n_mem: int,
  deterministic: bool = True,
  rng: Optional[Array] = None,
  adapter: str = COMPRESSOR,
) -> Tuple[Array, Array]:
  """Documents -> (memories [R, n_mem, D], MSE alignment loss).

  `doc_tokens`/`doc_mask` may carry extra leading axes (e.g. [B, N, Ld + n_mem]); they are
  flattened to R documents and the memories come back as [R, n_mem, D].
  """
  tokens = doc_tokens.reshape(-1, doc_tokens.shape[-1])
  mask = doc_mask.reshape(-1, doc_mask.shape[-1])
  mem, hidden = encode(model, params, tokens, mask, n_mem, adapter, deterministic, rng)
  mse = losses.mse_alignment_loss(mem, hidden[:, :-n_mem], mask[:, :-n_mem])
  return mem, mse


def lexical_loss(
  model: Decoder, params: Params, memories_rmd: Array, doc_tokens_rt: Array, doc_mask_rt: Array
) -> Array:
  """Mean NLL of each document's distinct tokens under its memories read by the LM head.

  The memories [R, n_mem, D] are final states, so `Decoder.logits` reads them as the
  base reads its own last layer; a document's tokens are modelled as a uniform mixture
  of its memory slots' next-token distributions. Pulling memories towards the LM head
  rows of the document's tokens (with tied embeddings, its token embeddings) gives the
  compressor a signal from the first step that depends on its own document, where the
  answer loss reaches it only once the generator reads memories.

  Args:
    doc_tokens_rt, doc_mask_rt: the encoder inputs [R, Lt + n_mem] (memory tokens last);
      only the document positions (the first Ld) are targets, each distinct id once.
  """
  n_mem = memories_rmd.shape[1]
  tokens = doc_tokens_rt[:, :-n_mem]
  mask = doc_mask_rt[:, :-n_mem].astype(bool)
  logits = cast(Array, model.apply({"params": params}, memories_rmd, method=Decoder.logits))
  log_mix = jax.nn.logsumexp(
    jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=1
  ) - jnp.log(n_mem)  # [R, V]
  target_lp = jnp.take_along_axis(log_mix, tokens, axis=-1)  # [R, Ld]
  # A repeated id counts once: keep a position only if no earlier real position holds it.
  same = (tokens[:, :, None] == tokens[:, None, :]) & mask[:, None, :]
  earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)
  first = mask & ~jnp.any(same & earlier, axis=-1)
  per_doc = -jnp.sum(jnp.where(first, target_lp, 0.0), -1) / jnp.maximum(first.sum(-1), 1)
  return jnp.mean(per_doc)


def reason(
  model: Decoder,
  params: Params,
  q_tokens: Array,
  q_mask: Array,
  n_mem: int,
  deterministic: bool = True,
  rng: Optional[Array] = None,
) -> Array:
  """Questions [B, Lq + n_mem] -> query memories [B, n_mem, D] (reasoner adapter)."""
  return memories(model, params, q_tokens, q_mask, n_mem, REASONER, deterministic, rng)


def score(query_mem_bmd: Array, doc_mem_bnmd: Array) -> Array:
  """Cosine scores [B, N] (float32) over flattened, L2-normalised memories."""
  return losses.cosine_scores(query_mem_bmd, doc_mem_bnmd)


def select(weights_bkn: Array, doc_mem_bnmd: Array) -> Array:
  """Selected memories [B, k, n_mem, D]: the top-k weights applied to the candidates
  (an einsum, so the straight-through gradient reaches the scores)."""
  out = jnp.einsum(
    "bkn,bnmd->bkmd", weights_bkn.astype(jnp.float32), doc_mem_bnmd.astype(jnp.float32)
  )
  return out.astype(doc_mem_bnmd.dtype)


def splice(embeddings_btd: Array, slot_positions_bj: Array, memories_bjd: Array) -> Array:
  """Writes memories [B, J, D] into the placeholder positions [B, J] of embeddings
  [B, T, D] (one vectorised scatter; gradients flow into the memories)."""
  batch = jnp.arange(embeddings_btd.shape[0])[:, None]
  return embeddings_btd.at[batch, slot_positions_bj].set(memories_bjd.astype(embeddings_btd.dtype))


def rescale_memories(memories_bjd: Array, target_rms: Array) -> Array:
  """Each memory vector [..., D] rescaled to root mean square `target_rms` (float32).

  The compressor reads out final-normed states, whose scale is the final norm's (for
  SmolLM2-135M an RMS about 15x that of its token embeddings); a pre-norm generator adds
  its layers' updates to that input, so an oversized input keeps the memory positions'
  states close to the memories themselves."""
  mem = memories_bjd.astype(jnp.float32)
  rms = jnp.sqrt(jnp.mean(jnp.square(mem), axis=-1, keepdims=True))
  return mem * (target_rms / jnp.maximum(rms, 1e-12))


def generator_inputs(
  model: Decoder,
  params: Params,
  tokens_bt: Array,
  slot_positions_bj: Array,
  memories_bjd: Array,
  memory_scale: str = "none",
) -> Array:
  """Input embeddings [B, T, D] of generator prompts `tokens_bt` with the memories
  [B, J, D] written into `slot_positions_bj` [B, J], scaled per `memory_scale`."""
  check_memory_scale(memory_scale)
  embeddings = cast(Array, model.apply({"params": params}, tokens_bt, method=Decoder.embed))
  if memory_scale == "embedding":
    target = jax.lax.stop_gradient(
      cast(Array, model.apply({"params": params}, method=Decoder.embedding_rms))
    )
    memories_bjd = rescale_memories(memories_bjd, target)
  return splice(embeddings, slot_positions_bj, memories_bjd)


def generator_loss(
  model: Decoder,
  params: Params,
  tokens_bt: Array,
  mask_bt: Array,
  slot_positions_bj: Array,
  memories_bkmd: Array,
  answer_mask_ba: Array,
  deterministic: bool = True,
  rng: Optional[Array] = None,
  memory_scale: str = "none",
) -> Tuple[Array, Array]:
  """Masked next-token CE of the answer, given memories for the prompt's slots.

  Args:
    memories_bkmd: [B, k, n_mem, D], written slot by slot into `slot_positions_bj`
      [B, k * n_mem].
    memory_scale: how they enter the generator (`MEMORY_SCALES`).

  Returns:
    (mean CE over supervised answer tokens, number of those tokens).
  """
  b, t = tokens_bt.shape
  a = answer_mask_ba.shape[1]
  memories = memories_bkmd.reshape(b, -1, memories_bkmd.shape[-1])
  embeddings = generator_inputs(model, params, tokens_bt, slot_positions_bj, memories, memory_scale)
  # Position i predicts token i + 1, so the answer region [P, T) is read from [P-1, T-1);
  # the last layer runs only there.
  answer_hidden = final_states(
    model,
    params,
    mask_bt,
    GENERATOR,
    deterministic,
    rng,
    readout=(t - a - 1, t - 1),
    embeddings=embeddings,
  )
  logits = cast(Array, model.apply({"params": params}, answer_hidden, method=Decoder.logits))
  return losses.masked_cross_entropy(logits, tokens_bt[:, t - a :], answer_mask_ba)
