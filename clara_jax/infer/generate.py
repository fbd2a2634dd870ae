"""Batched generation with a KV cache from generator prompts whose memory slots hold
document memories: greedy, or temperature / top-p sampling (seeded).

`generate` is one jitted program per (batch, prompt length, max_new_tokens) shape, so
callers pad prompts to a few bucket lengths (`bucket_length`) and never recompile per
question. Prompts arrive in the training layout (left-padded); they are shifted to the
right-padded layout the cache path needs (causality then hides the padding).

Every answering prompt starts with the same tokens (the chat header and system text,
up to the first memory slot). `prefix_cache` runs them once into a batch-1 KV cache;
`generate(..., prefix=that cache)` then reads only the rest of each prompt and copies
the prefix's keys and values into every row.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple, TypeAlias, Union, cast

import jax
import jax.numpy as jnp

from clara_jax.model import clara
from clara_jax.model.config import DecoderConfig
from clara_jax.model.decoder import Decoder, DecoderOutput, KVCache, cache_length, init_cache

Array: TypeAlias = jax.Array


def bucket_length(length: int, buckets: Sequence[int] = (64, 128, 256, 512, 1024, 2048)) -> int:
  """The smallest bucket that holds `length` (a multiple of the largest beyond it)."""
  for b in buckets:
    if length <= b:
      return b
  top = buckets[-1]
  return -(-length // top) * top


def left_to_right_padding(
  tokens_bt: Array, mask_bt: Array, slot_positions_bj: Array
) -> Tuple[Array, Array, Array]:
  """Moves each row's real tokens to the front; returns (tokens, lengths, slots)."""
  t = tokens_bt.shape[1]
  lengths = jnp.sum(mask_bt, axis=-1).astype(jnp.int32)
  shift = t - lengths  # left padding of each row
  index = (jnp.arange(t)[None, :] + shift[:, None]) % t
  tokens = jnp.take_along_axis(tokens_bt, index, axis=1)
  return tokens, lengths, slot_positions_bj - shift[:, None]


def _sample(logits_bv: Array, key: Array, temperature: float, top_p: float) -> Array:
  if temperature <= 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits = logits_bv / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefix_cache(params: Any, cfg: DecoderConfig, prefix_tokens_p: Array) -> KVCache:
  """The generator's keys and values of prompt tokens [P0] every row shares: a KV cache
  of batch 1 and length P0 for `generate(..., prefix=)`."""
  model = Decoder(cfg)
  cache = init_cache(cfg, 1, prefix_tokens_p.shape[0])
  out = cast(
    DecoderOutput,
    model.apply(
      {"params": params},
      prefix_tokens_p[None],
      adapter=clara.GENERATOR,
      cache=cache,
      cache_index=jnp.zeros(1, jnp.int32),
    ),
  )
  return cast(KVCache, out.cache)


def _with_prefix(cache: KVCache, prefix: KVCache) -> KVCache:
  """`cache` [..., B, T, kv, d] with positions [0, P0) of every row set to the batch-1
  `prefix` [..., 1, P0, kv, d] (either cache layout)."""

  def put(c: Array, p: Array) -> Array:
    return jax.lax.dynamic_update_slice_in_dim(
      c, jnp.broadcast_to(p, c.shape[:-3] + p.shape[-3:]).astype(c.dtype), 0, c.ndim - 3
    )

  return jax.tree_util.tree_map(put, cache, prefix)


@functools.partial(
  jax.jit,
  static_argnames=("cfg", "max_new_tokens", "eos_id", "temperature", "top_p", "memory_scale"),
)
def generate(
  params: Any,
  cfg: DecoderConfig,
  tokens_bt: Array,
  mask_bt: Array,
  slot_positions_bj: Array,
  memories_bkmd: Array,
  *,
  max_new_tokens: int,
  eos_id: int,
  temperature: float = 0.0,
  top_p: float = 1.0,
  rng: Optional[Array] = None,
  memory_scale: str = "none",
  prefix: Optional[KVCache] = None,
) -> Tuple[Array, Array]:
  """Generates up to `max_new_tokens` per row after the prompt.

  Args:
    tokens_bt, mask_bt: left-padded generator prompts [B, P] (placeholders included);
      with `prefix`, the part of each prompt after it.
    slot_positions_bj: [B, k * n_mem] placeholder positions in that layout.
    memories_bkmd: [B, k, n_mem, D] memories to write into the slots.
    memory_scale: how they enter the generator (`clara.MEMORY_SCALES`).
    prefix: `prefix_cache` of the P0 tokens that precede every row's prompt (it holds
      no slot), or None.

  Returns:
    (new tokens [B, max_new_tokens] (after eos: eos), lengths [B] including the eos).
  """
  model = Decoder(cfg)
  last_hidden, cache, filled = _prefill(
    model,
    params,
    (tokens_bt, mask_bt, slot_positions_bj, memories_bkmd),
    max_new_tokens,
    memory_scale,
    prefix,
  )
  rng = jax.random.key(0) if rng is None else rng

  def sample(hidden_bd: Array, step: Union[int, Array]) -> Array:
    logits = cast(Array, model.apply({"params": params}, hidden_bd, method=Decoder.logits))
    return _sample(logits, jax.random.fold_in(rng, step), temperature, top_p)

  first = sample(last_hidden, 0)
  generated = _decode(model, params, sample, cache, filled, first, eos_id, max_new_tokens)
  is_eos = generated == eos_id
  lengths_out = jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1) + 1, max_new_tokens)
  return generated, lengths_out


def _decode(
  model: Decoder,
  params: Any,
  sample: Callable[[Array, Array], Array],
  cache: Optional[KVCache],
  filled: Array,
  first: Array,
  eos_id: int,
  max_new_tokens: int,
) -> Array:
  """The new tokens [B, max_new_tokens]: `first`, then one decoder step per token from
  the prefilled `cache` (`filled` valid entries per row) until every row has produced
  `eos_id` (eos after it); `sample(hidden [B, D], step)` picks each token."""
  generated = jnp.full((first.shape[0], max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)
  done = first == eos_id

  def cond(carry: Tuple[Array, Optional[KVCache], Array, Array, Array]) -> Array:
    step, _, _, _, done = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(
    carry: Tuple[Array, Optional[KVCache], Array, Array, Array],
  ) -> Tuple[Array, Optional[KVCache], Array, Array, Array]:
    step, cache, generated, token, done = carry
    out = cast(
      DecoderOutput,
      model.apply(
        {"params": params},
        token[:, None],
        adapter=clara.GENERATOR,
        cache=cache,
        cache_index=filled + step - 1,
      ),
    )
    nxt = jnp.where(done, eos_id, sample(out.hidden[:, 0], step))
    generated = generated.at[:, step].set(nxt)
    return step + 1, out.cache, generated, nxt, done | (nxt == eos_id)

  _, _, generated, _, _ = jax.lax.while_loop(
    cond, body, (jnp.int32(1), cache, generated, first, done)
  )
  return generated


def _prefill(
  model: Decoder,
  params: Any,
  prompts: Tuple[Array, Array, Array, Array],
  max_new_tokens: int,
  memory_scale: str,
  prefix: Optional[KVCache],
) -> Tuple[Array, Optional[KVCache], Array]:
  """Runs the prompts (tokens, mask, slot positions, memories, as `generate` takes
  them) through the generator: (the last prompt position's hidden state [B, D], the KV
  cache with room for `max_new_tokens` more, its valid length per row [B])."""
  tokens_bt, mask_bt, slot_positions_bj, memories_bkmd = prompts
  b = tokens_bt.shape[0]
  tokens, lengths, slots = left_to_right_padding(tokens_bt, mask_bt, slot_positions_bj)
  embeddings = clara.generator_inputs(
    model,
    params,
    tokens,
    slots,
    memories_bkmd.reshape(b, -1, memories_bkmd.shape[-1]),
    memory_scale,
  )
  p0 = 0 if prefix is None else cache_length(prefix)
  cache = init_cache(model.cfg, b, p0 + tokens.shape[1] + max_new_tokens)
  if prefix is not None:
    cache = _with_prefix(cache, prefix)
  out = cast(
    DecoderOutput,
    model.apply(
      {"params": params},
      embeddings=embeddings,
      adapter=clara.GENERATOR,
      cache=cache,
      cache_index=jnp.full(b, p0, jnp.int32),
    ),
  )
  last_hidden = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  filled = p0 + lengths  # valid cache entries of each row after its prompt
  return last_hidden, out.cache, filled
