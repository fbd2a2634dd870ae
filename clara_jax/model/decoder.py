"""A Mistral/Llama-style decoder in Flax linen, with named LoRA adapters and a KV cache.

Shape letters and suffixes as in `clara_jax.model` (D model width, H query heads, K
key/value heads, G = H / K, hd head width: `q_bthd` is [B, T, H, hd]; S key positions).

Pure functional use:

    model = Decoder(cfg)
    params = init_params(cfg, jax.random.key(0))
    out = model.apply({"params": params}, tokens_bt, attention_mask=mask_bt,
                      adapter="generator")
    logits_btv = model.apply({"params": params}, out.hidden, method=Decoder.logits)

`adapter` (a static string or None) selects which LoRA adapter is active; the generator
passes `embeddings=` instead of token ids after writing document memories into its
placeholder slots.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, TypeAlias, Union, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from clara_jax.model.config import DecoderConfig
from clara_jax.model.layers import (
  LoraLinear,
  RMSNorm,
  apply_rope,
  attention_bias,
  constrain,
  default_kernel_init,
  matmul,
  rope_tables,
)

Array: TypeAlias = jax.Array
# One dict per layer: {"k": [batch, max_len, kv_heads, head_dim], "v": same}; with
# scanned layers one dict of both stacked: {"k": [layers, batch, max_len, ...], "v": ...}.
KVCache = Union[List[dict], dict]

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")


def _dtype(name: str) -> Any:
  return jnp.dtype(name)


def _table(
  module: nn.Module, name: str, axes: Tuple[str, str], shape: Tuple[int, int], dtype: Any
) -> Array:
  """A vocabulary table parameter (embedding rows or head columns), N(0, 0.02)-initialised,
  with logical axes `axes`."""
  init = nn.with_logical_partitioning(default_kernel_init, axes)
  return cast(Array, module.param(name, init, shape, dtype))


class Embedder(nn.Module):
  """Token embedding: pretrained rows plus CLaRa's extra rows in their own parameter.

  Keeping `extra_embedding` separate lets an optimizer mask train only the special-token
  rows while the pretrained table stays frozen. With tied embeddings, `attend` is also
  the output projection.
  """

  cfg: DecoderConfig

  def setup(self) -> None:
    cfg = self.cfg
    pdt = _dtype(cfg.param_dtype)
    base_shape = (cfg.base_vocab_size, cfg.hidden_size)
    self.base_embedding = _table(self, "base_embedding", ("vocab", "embed"), base_shape, pdt)
    if cfg.num_extra_tokens:
      extra_shape = (cfg.num_extra_tokens, cfg.hidden_size)
      self.extra_embedding = _table(
        self, "extra_embedding", ("extra_vocab", "embed"), extra_shape, pdt
      )

  def __call__(self, tokens_bt: Array) -> Array:
    cfg = self.cfg
    emb = jnp.take(self.base_embedding, jnp.clip(tokens_bt, 0, cfg.base_vocab_size - 1), axis=0)
    if cfg.num_extra_tokens:
      extra_ids = jnp.clip(tokens_bt - cfg.base_vocab_size, 0, cfg.num_extra_tokens - 1)
      emb = jnp.where(
        (tokens_bt >= cfg.base_vocab_size)[..., None],
        jnp.take(self.extra_embedding, extra_ids, axis=0),
        emb,
      )
    return emb.astype(_dtype(cfg.dtype))

  def attend(self, hidden: Array) -> Array:
    """hidden [..., hidden] -> float32 logits [..., vocab] against every embedding row
    (the tied output head)."""
    extra = self.extra_embedding.T if self.cfg.num_extra_tokens else None
    return _vocab_logits(hidden, self.base_embedding.T, extra, _dtype(self.cfg.dtype))


def _vocab_logits(hidden: Array, base_dv: Array, extra_dx: Optional[Array], dtype: Any) -> Array:
  """float32 logits [..., V] of hidden [..., D] against the pretrained columns [D, base]
  and the special-token columns [D, X] (or None)."""
  x = hidden.astype(dtype)
  logits = matmul(x, base_dv, 1, dtype, out_dtype=jnp.float32)
  if extra_dx is None:
    return logits
  return jnp.concatenate([logits, matmul(x, extra_dx, 1, dtype, out_dtype=jnp.float32)], -1)


class LmHead(nn.Module):
  """Untied output projection, split like the Embedder; returns float32 logits."""

  cfg: DecoderConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.cfg
    pdt, dt = _dtype(cfg.param_dtype), _dtype(cfg.dtype)
    base = _table(
      self, "base_head", ("embed", "vocab"), (cfg.hidden_size, cfg.base_vocab_size), pdt
    )
    extra = None
    if cfg.num_extra_tokens:
      extra_shape = (cfg.hidden_size, cfg.num_extra_tokens)
      extra = _table(self, "extra_head", ("embed", "extra_vocab"), extra_shape, pdt)
    return _vocab_logits(hidden, base, extra, dt)


def _soft_cap(x: Array, cap: Optional[float]) -> Array:
  """Gemma-2's soft cap, cap * tanh(x / cap): smooth, and the identity near 0 (None: x)."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def _attend_grouped(
  q_bthd: Array,
  k_bskd: Array,
  v_bskd: Array,
  bias_bts: Array,
  scale: float,
  softcap: Optional[float],
) -> Array:
  """Grouped-query attention as one einsum pair over [B, K, G] -> [B, T, H, hd];
  scores are scaled by `scale` and soft-capped at `softcap` (None: not) before the bias."""
  b, t, h, hd = q_bthd.shape
  kv = k_bskd.shape[2]
  q = q_bthd.reshape(b, t, kv, h // kv, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd, preferred_element_type=jnp.float32)
  scores = _soft_cap(scores * scale, softcap) + bias_bts[:, None, None]
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bskd.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, hd)


def _head_probs(
  q_bqd: Array, k_bsd: Array, bias_bts: Array, scale: float, softcap: Optional[float]
) -> Array:
  """Softmax probabilities [B, Q, S] (Q = G * T; dtype of v's compute) of one KV head
  whose G query heads are stacked along the query axis."""
  b, q_len, _ = q_bqd.shape
  t, s = bias_bts.shape[1:]
  scores = jnp.einsum("bqd,bsd->bqs", q_bqd, k_bsd, preferred_element_type=jnp.float32)
  scores = _soft_cap(scores.reshape(b, q_len // t, t, s) * scale, softcap) + bias_bts[:, None]
  return jax.nn.softmax(scores, axis=-1).reshape(b, q_len, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_attention(
  q_bqd: Array, k_bsd: Array, v_bsd: Array, bias_bts: Array, scale: float, softcap: Optional[float]
) -> Array:
  """float32 attention output [B, Q, hd] (Q = G * T) of one KV head.

  Its own backward pass: the probabilities are kept from the forward pass (in v's dtype)
  and the softmax gradient is p * (dp - rowsum(p * dp)). Under plain autodiff the
  softmax's CPU fusions (with the score matmul and exponential fused in) cost more than
  twice as much, most of the stage2 step at 1035-token queries."""
  return _head_attention_fwd(q_bqd, k_bsd, v_bsd, bias_bts, scale, softcap)[0]


def _head_attention_fwd(
  q_bqd: Array, k_bsd: Array, v_bsd: Array, bias_bts: Array, scale: float, softcap: Optional[float]
) -> Tuple[Array, Tuple[Array, Array, Array, Array]]:
  probs = _head_probs(q_bqd, k_bsd, bias_bts, scale, softcap).astype(v_bsd.dtype)
  out = jnp.einsum("bqs,bsd->bqd", probs, v_bsd, preferred_element_type=jnp.float32)
  return out, (q_bqd, k_bsd, v_bsd, probs)


def _head_attention_bwd(
  scale: float,
  softcap: Optional[float],
  residuals: Tuple[Array, Array, Array, Array],
  d_out_bqd: Array,
) -> Tuple[Array, Array, Array, None]:
  q, k, v, probs = residuals
  d_out = d_out_bqd.astype(v.dtype)
  f32 = jnp.float32
  d_v = jnp.einsum("bqs,bqd->bsd", probs, d_out, preferred_element_type=f32)
  d_probs = jnp.einsum("bqd,bsd->bqs", d_out, v, preferred_element_type=f32)
  p = probs.astype(f32)
  d_scores = p * (d_probs - jnp.sum(p * d_probs, axis=-1, keepdims=True))
  if softcap is not None:
    # The cap's derivative, 1 - tanh^2, from the scores recomputed (one more matmul)
    # rather than another [B, Q, S] residual kept from the forward pass.
    scores = jnp.einsum("bqd,bsd->bqs", q, k, preferred_element_type=f32) * scale
    d_scores = d_scores * (1.0 - jnp.square(jnp.tanh(scores / softcap)))
  d_scores = (d_scores * scale).astype(q.dtype)
  d_q = jnp.einsum("bqs,bsd->bqd", d_scores, k, preferred_element_type=f32)
  d_k = jnp.einsum("bqs,bqd->bsd", d_scores, q, preferred_element_type=f32)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_head_attention.defvjp(_head_attention_fwd, _head_attention_bwd)


def _attend_per_kv_head(
  q_bthd: Array,
  k_bskd: Array,
  v_bskd: Array,
  bias_bts: Array,
  scale: float,
  softcap: Optional[float],
) -> Array:
  """The same attention as a loop over KV heads: the query heads of one group are stacked
  along the query axis, so each head is two batched 3-D matmuls (one batch dimension),
  which XLA's CPU backend fuses with the softmax far better than the 5-D einsum."""
  b, t, h, hd = q_bthd.shape
  kv = k_bskd.shape[2]
  groups = h // kv
  q = q_bthd.reshape(b, t, kv, groups, hd)
  outs = []
  for j in range(kv):
    q_bqd = q[:, :, j].transpose(0, 2, 1, 3).reshape(b, groups * t, hd)
    out = _head_attention(q_bqd, k_bskd[:, :, j], v_bskd[:, :, j], bias_bts, scale, softcap)
    outs.append(out.reshape(b, groups, t, hd))
  # [B, K, G, T, hd] -> [B, T, K * G, hd]: query head kv_j * groups + g.
  return jnp.stack(outs, 1).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


class Attention(nn.Module):
  """Grouped-query attention with RoPE and an optional KV cache."""

  cfg: DecoderConfig
  adapter: Optional[str] = None
  deterministic: bool = True

  def _linear(
    self,
    features: Tuple[int, ...],
    axes: Tuple[str, ...],
    name: str,
    n_in: int = 1,
    use_bias: bool = False,
  ) -> LoraLinear:
    cfg = self.cfg
    return LoraLinear(
      features=features,
      kernel_axes=axes,
      n_in=n_in,
      lora=cfg.lora,
      active_adapter=self.adapter,
      deterministic=self.deterministic,
      dtype=_dtype(cfg.dtype),
      param_dtype=_dtype(cfg.param_dtype),
      use_bias=use_bias,
      name=name,
    )

  @nn.compact
  def __call__(
    self,
    x_btd: Array,
    rope: Tuple[Array, Array],
    bias_bts: Array,
    cache: Optional[dict],
    cache_index_b: Optional[Array],
    query_slice: Optional[Tuple[int, int]] = None,
  ) -> Tuple[Array, Optional[dict]]:
    """`rope`: the positions' `rope_tables` (cos, sin). `query_slice` (start, stop):
    only those positions query (keys/values come from all); the output then has
    stop - start positions."""
    cfg = self.cfg
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x_q, rope_q = x_btd, rope
    if query_slice is not None:
      start, stop = query_slice
      x_q = x_btd[:, start:stop]
      rope_q = (rope[0][:, start:stop], rope[1][:, start:stop])
      bias_bts = bias_bts[:, start:stop]
    bias = cfg.qkv_bias
    q = self._linear((h, hd), ("embed", "heads", "head_dim"), "q_proj", use_bias=bias)(x_q)
    k = self._linear((kv, hd), ("embed", "kv_heads", "head_dim"), "k_proj", use_bias=bias)(x_btd)
    v = self._linear((kv, hd), ("embed", "kv_heads", "head_dim"), "v_proj", use_bias=bias)(x_btd)
    q = apply_rope(q, rope_q)
    k = apply_rope(k, rope)
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))

    new_cache = None
    if cache is not None:
      write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (i, 0, 0)))
      new_cache = {
        "k": write(cache["k"], k.astype(cache["k"].dtype), cache_index_b),
        "v": write(cache["v"], v.astype(cache["v"].dtype), cache_index_b),
      }
      k, v = new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype)

    attend = _attend_per_kv_head if cfg.attention_layout == "per_kv_head" else _attend_grouped
    out = attend(q, k, v, bias_bts, cfg.query_scale, cfg.attn_logit_softcapping)
    out = out.astype(_dtype(cfg.dtype))
    out = self._linear((cfg.hidden_size,), ("heads", "head_dim", "embed"), "o_proj", n_in=2)(out)
    return out, new_cache


class Mlp(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); act is SiLU (SwiGLU) or tanh-approximated
  GELU (GeGLU, Gemma), per `cfg.hidden_act`."""

  cfg: DecoderConfig
  adapter: Optional[str] = None
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_btd: Array) -> Array:
    cfg = self.cfg
    kw = dict(
      lora=cfg.lora,
      active_adapter=self.adapter,
      deterministic=self.deterministic,
      dtype=_dtype(cfg.dtype),
      param_dtype=_dtype(cfg.param_dtype),
    )
    gate = LoraLinear((cfg.intermediate_size,), ("embed", "mlp"), name="gate_proj", **kw)(x_btd)
    up = LoraLinear((cfg.intermediate_size,), ("embed", "mlp"), name="up_proj", **kw)(x_btd)
    # In float32: XLA's CPU backend evaluates a bf16 logistic about twice as slowly.
    gate32 = gate.astype(jnp.float32)
    act = jax.nn.silu(gate32) if cfg.hidden_act == "silu" else jax.nn.gelu(gate32, approximate=True)
    hidden = (act * up.astype(jnp.float32)).astype(gate.dtype)
    hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
    return LoraLinear((cfg.hidden_size,), ("mlp", "embed"), name="down_proj", **kw)(hidden)


class DecoderBlock(nn.Module):
  """Pre-norm transformer block (with `cfg.post_norms`, the attention and MLP outputs are
  normed too before their residual adds); activations constrained at its boundaries."""

  cfg: DecoderConfig

  @nn.compact
  def __call__(
    self,
    x_btd: Array,
    rope: Tuple[Array, Array],
    bias_bts: Array,
    cache: Optional[dict],
    cache_index_b: Optional[Array],
    adapter: Optional[str],
    deterministic: bool,
    query_slice: Optional[Tuple[int, int]] = None,
  ) -> Tuple[Array, Optional[dict]]:
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    x_btd = constrain(x_btd, BATCH_LENGTH_EMBED)
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="attn_norm")(x_btd)
    h, new_cache = Attention(cfg, adapter, deterministic, name="attn")(
      h, rope, bias_bts, cache, cache_index_b, query_slice
    )
    if cfg.post_norms:
      h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="attn_post_norm")(h)
    if query_slice is not None:
      x_btd = x_btd[:, query_slice[0] : query_slice[1]]
    x_btd = x_btd + h
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="mlp_norm")(x_btd)
    h = Mlp(cfg, adapter, deterministic, name="mlp")(h)
    if cfg.post_norms:
      h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="mlp_post_norm")(h)
    x_btd = x_btd + h
    return constrain(x_btd, BATCH_LENGTH_EMBED), new_cache


_REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderOutput(NamedTuple):
  hidden: Array  # [batch, length, hidden] after the final norm
  cache: Optional[KVCache]  # updated cache, or None without one


def _check_cache(
  cfg: DecoderConfig,
  cache: KVCache,
  cache_index: Optional[Array],
  attention_mask: Optional[Array],
) -> None:
  """Raises on a call that cannot run with a KV cache."""
  if attention_mask is not None:
    raise ValueError("attention_mask is not used with a KV cache; right-pad prompts")
  if cache_index is None:
    raise ValueError("cache_index [batch] is required with a cache")
  # Scanned layers keep one stacked dict, else a list of per-layer dicts.
  cached_layers = cast(dict, cache)["k"].shape[0] if cfg.scan_layers else len(cache)
  if cached_layers != cfg.num_layers:
    raise ValueError(f"cache has {cached_layers} layers, model has {cfg.num_layers}")


def _slots(
  b: int, t: int, cache: Optional[KVCache], cache_index: Optional[Array]
) -> Tuple[Array, Array]:
  """(query slots [B, T], key slots [B, S] or [1, S]): each position's index in the
  sequence the keys come from (this call's, or the cache's after `cache_index`)."""
  steps = jnp.arange(t, dtype=jnp.int32)
  if cache is None:
    q_slot_bt = jnp.broadcast_to(steps, (b, t))
    return q_slot_bt, q_slot_bt
  q_slot_bt = cast(Array, cache_index).astype(jnp.int32)[:, None] + steps
  return q_slot_bt, jnp.arange(cache_length(cache), dtype=jnp.int32)[None]


def _layer_biases(
  cfg: DecoderConfig, q_slot_bt: Array, k_slot_bs: Array, attention_mask: Optional[Array]
) -> Dict[bool, Array]:
  """One attention bias [B, T, S] per kind of layer present: {True: through the sliding
  window, False: global}; causal, without the keys `attention_mask` marks as padding."""
  mask_bts = k_slot_bs[:, None, :] <= q_slot_bt[:, :, None]
  if attention_mask is not None:
    mask_bts = mask_bts & attention_mask.astype(bool)[:, None, :]
  windowed = cfg.windowed_layers
  local_mask_bts = None
  if any(windowed):
    local_mask_bts = mask_bts & (
      q_slot_bt[:, :, None] - k_slot_bs[:, None, :] < cast(int, cfg.sliding_window)
    )
  return {
    w: attention_bias(cast(Array, local_mask_bts) if w else mask_bts) for w in sorted(set(windowed))
  }


def _query_slice(
  readout: Optional[Tuple[int, int]], t: int, cache: Optional[KVCache]
) -> Optional[Tuple[int, int]]:
  """`readout` as (start, stop) within the T positions (Python slice rules), or None."""
  if readout is None:
    return None
  if cache is not None:
    raise ValueError("readout is not supported with a KV cache")
  start, stop, _ = slice(*readout).indices(t)
  if stop <= start:
    raise ValueError(f"readout {readout} selects no position of length {t}")
  return start, stop


class _BlockInputs(NamedTuple):
  """What every block of one call reads besides its input states and its cache."""

  rope: Tuple[Array, Array]  # `rope_tables` of the positions
  bias: Dict[bool, Array]  # one per kind of layer present: {windowed: bias [B, T, S]}
  cache_index: Optional[Array]  # [B] entries in the cache before this call
  adapter: Optional[str]
  deterministic: bool

  def run(
    self,
    block: DecoderBlock,
    x_btd: Array,
    bias_bts: Array,
    cache: Optional[dict],
    query_slice: Optional[Tuple[int, int]],
  ) -> Tuple[Array, Optional[dict]]:
    """`block` on `x_btd` with these inputs, `bias_bts` its layer's bias."""
    return block(
      x_btd,
      self.rope,
      bias_bts,
      cache,
      self.cache_index,
      self.adapter,
      self.deterministic,
      query_slice,
    )


class Decoder(nn.Module):
  """The shared CLaRa backbone. See the module docstring for the calling convention."""

  cfg: DecoderConfig

  def setup(self) -> None:
    cfg = self.cfg
    block: Any = DecoderBlock
    if cfg.remat_policy != "none":
      # Arguments 6-8 (adapter, deterministic, query_slice; self is 0) pick code paths.
      block = nn.remat(
        DecoderBlock,
        policy=_REMAT_POLICIES[cfg.remat_policy],
        prevent_cse=True,
        static_argnums=(6, 7, 8),
      )
    self.embedder = Embedder(cfg)
    if cfg.scan_layers:  # one block whose parameters carry a leading [num_layers] axis
      self.layers = block(cfg, name="layers")
    else:
      self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, _dtype(cfg.dtype), _dtype(cfg.param_dtype))
    if not cfg.tie_embeddings:
      self.lm_head = LmHead(cfg)

  def embed(self, tokens_bt: Array) -> Array:
    """Token ids [batch, length] -> input embeddings [batch, length, hidden]."""
    return self.embedder(tokens_bt)

  def embedding_rms(self) -> Array:
    """float32 scalar: the root mean square of the pretrained token embedding table's
    entries (the scale at which the first layer is used to reading its inputs)."""
    table = self.embedder.base_embedding.astype(jnp.float32)
    return jnp.sqrt(jnp.mean(jnp.square(table)))

  def logits(self, hidden: Array) -> Array:
    """Final-normed hidden states [..., hidden] -> float32 logits [..., vocab] (soft-capped
    with `cfg.final_logit_softcapping`)."""
    logits = self.embedder.attend(hidden) if self.cfg.tie_embeddings else self.lm_head(hidden)
    return _soft_cap(logits, self.cfg.final_logit_softcapping)

  def lens_logits(self, states: Array) -> Array:
    """The logit lens: any states [..., hidden] through final norm + LM head."""
    return self.logits(self.final_norm(states))

  def __call__(
    self,
    tokens: Optional[Array] = None,
    *,
    embeddings: Optional[Array] = None,
    positions: Optional[Array] = None,
    attention_mask: Optional[Array] = None,
    adapter: Optional[str] = None,
    deterministic: bool = True,
    cache: Optional[KVCache] = None,
    cache_index: Optional[Array] = None,
    readout: Optional[Tuple[int, int]] = None,
  ) -> DecoderOutput:
    """Runs the decoder.

    Args:
      tokens: [batch, length] int ids; or give `embeddings` [batch, length, hidden].
      positions: [batch, length] RoPE positions; default `arange` (offset by
        `cache_index` with a cache).
      attention_mask: [batch, length], 1 for real tokens, 0 for padding (no cache only;
        with a cache, prompts are right-padded and causality hides the padding).
      adapter: name of the active LoRA adapter, or None for the base model.
      deterministic: False enables LoRA dropout (needs a "dropout" rng).
      cache: per-layer KV cache from `init_cache`; new keys/values are written at
        `cache_index` [batch] (the number of valid entries before this call).
      readout: static (start, stop): only those positions are computed in the last
        layer (queries, MLP, final norm), the rest only provide its keys/values; the
        hidden output is then [batch, stop - start, hidden]. Python slice rules
        (negative indices count from the end). No cache.

    Returns:
      DecoderOutput(hidden [batch, length, hidden] after the final norm, cache).
    """
    x_btd = self._input_states(tokens, embeddings)
    b, t = x_btd.shape[:2]
    if cache is not None:
      _check_cache(self.cfg, cache, cache_index, attention_mask)
    q_slot_bt, k_slot_bs = _slots(b, t, cache, cache_index)
    bias = _layer_biases(self.cfg, q_slot_bt, k_slot_bs, attention_mask)
    query_slice = _query_slice(readout, t, cache)
    if positions is None:
      positions = q_slot_bt
    rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
    inputs = _BlockInputs(rope, bias, cache_index, adapter, deterministic)
    if self.cfg.scan_layers:
      x_btd, new_cache = self._scan_layers(x_btd, inputs, cache)
      if query_slice is not None:
        x_btd = x_btd[:, query_slice[0] : query_slice[1]]
    else:
      x_btd, new_cache = self._unrolled_layers(x_btd, inputs, cache, query_slice)
    return DecoderOutput(self.final_norm(x_btd), new_cache)

  def _input_states(self, tokens: Optional[Array], embeddings: Optional[Array]) -> Array:
    """The first layer's input [B, T, D]: the tokens' embeddings, or `embeddings` as given."""
    if (tokens is None) == (embeddings is None):
      raise ValueError("pass exactly one of tokens or embeddings")
    if embeddings is None:
      return self.embed(cast(Array, tokens))
    return embeddings.astype(_dtype(self.cfg.dtype))

  def _unrolled_layers(
    self,
    x_btd: Array,
    inputs: _BlockInputs,
    cache: Optional[KVCache],
    query_slice: Optional[Tuple[int, int]],
  ) -> Tuple[Array, Optional[KVCache]]:
    """The blocks one after another (only the last one reads out `query_slice`); returns
    the last block's states and the per-layer caches (None without a cache)."""
    windowed = self.cfg.windowed_layers
    layer_caches: List[dict] = []
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache[i]
      layer_slice = query_slice if i == last else None
      x_btd, layer_cache = inputs.run(
        layer, x_btd, inputs.bias[windowed[i]], layer_cache, layer_slice
      )
      if cache is not None:  # a block given its cache returns the updated one
        layer_caches.append(cast(dict, layer_cache))
    return x_btd, layer_caches if cache is not None else None

  def _scan_layers(
    self, x_btd: Array, inputs: _BlockInputs, cache: Optional[KVCache]
  ) -> Tuple[Array, Optional[KVCache]]:
    """The blocks as one scan: the hidden states are the carry; each step reads its
    layer's slice of the stacked parameters (and of a stacked cache). `bias`: one per kind
    of layer, {windowed: bias}; with both kinds, each step selects its own by a scanned
    per-layer flag, as the compiled block is shared."""
    bias = inputs.bias
    windowed = jnp.asarray(self.cfg.windowed_layers) if len(bias) > 1 else None

    def body(
      block: DecoderBlock, x_btd: Array, xs: Tuple[Optional[dict], Optional[Array]]
    ) -> Tuple[Array, Optional[dict]]:
      layer_cache, is_windowed = xs
      if is_windowed is None:
        (layer_bias,) = bias.values()
      else:
        layer_bias = jnp.where(is_windowed, bias[True], bias[False])
      return inputs.run(block, x_btd, layer_bias, layer_cache, None)

    scan = nn.scan(
      body,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=0,
      out_axes=0,
      length=self.cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    # Scanned layers keep their cache as one stacked dict (`init_cache`).
    return scan(self.layers, x_btd, (cast(Optional[dict], cache), windowed))

  def init_all(self, tokens_bt: Array) -> Array:
    """Touches every parameter (all adapters, head) so `init` creates them all."""
    hidden = self(tokens_bt).hidden
    for name in self.cfg.adapters:
      hidden = hidden + self(tokens_bt, adapter=name).hidden
    return self.logits(hidden)


def init_cache(
  cfg: DecoderConfig, batch: int, max_length: int, dtype: Optional[str] = None
) -> KVCache:
  """Zeroed KV cache: per layer k, v of [batch, max_length, kv_heads, head_dim]; with
  `scan_layers`, one dict of k, v stacked as [num_layers, batch, max_length, ...]."""
  shape = (batch, max_length, cfg.num_kv_heads, cfg.head_dim)
  dt = _dtype(dtype or cfg.dtype)
  if cfg.scan_layers:
    stacked = (cfg.num_layers,) + shape
    return {"k": jnp.zeros(stacked, dt), "v": jnp.zeros(stacked, dt)}
  return [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(cfg.num_layers)]


def cache_length(cache: KVCache) -> int:
  """Positions a cache holds (either layout)."""
  return cache["k"].shape[-3] if isinstance(cache, dict) else cache[0]["k"].shape[1]


def init_params(cfg: DecoderConfig, rng: Array, boxed: bool = False) -> Any:
  """Initial parameters (every adapter and both heads), as a plain nested dict.

  With `boxed=True` the leaves keep their `nn.LogicallyPartitioned` boxes (what
  `clara_jax.partitioning` reads to derive shardings).
  """
  variables = Decoder(cfg).init(rng, jnp.zeros((1, 2), jnp.int32), method=Decoder.init_all)
  params = variables["params"]
  return params if boxed else nn.meta.unbox(params)


def abstract_params(cfg: DecoderConfig) -> Any:
  """Shapes/dtypes of the boxed parameters, without allocating them."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), boxed=True))
