"""A Mistral/Llama-style decoder in Flax linen, with named LoRA adapters and a KV cache.

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
from typing import List, NamedTuple, Optional, Tuple, TypeAlias, Union, cast

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


def _dtype(name: str):
  return jnp.dtype(name)


class Embedder(nn.Module):
  """Token embedding: pretrained rows plus CLaRa's extra rows in their own parameter.

  Keeping `extra_embedding` separate lets an optimizer mask train only the special-token
  rows while the pretrained table stays frozen. With tied embeddings, `attend` is also
  the output projection.
  """

  cfg: DecoderConfig

  def setup(self):
    cfg = self.cfg
    pdt = _dtype(cfg.param_dtype)
    self.base_embedding = self.param(
      "base_embedding",
      nn.with_logical_partitioning(default_kernel_init, ("vocab", "embed")),
      (cfg.base_vocab_size, cfg.hidden_size),
      pdt,
    )
    if cfg.num_extra_tokens:
      self.extra_embedding = self.param(
        "extra_embedding",
        nn.with_logical_partitioning(default_kernel_init, ("extra_vocab", "embed")),
        (cfg.num_extra_tokens, cfg.hidden_size),
        pdt,
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


def _vocab_logits(hidden: Array, base_hv: Array, extra_hx: Optional[Array], dtype) -> Array:
  """float32 logits [..., base + extra vocab] of hidden [..., H] against the pretrained
  columns [H, base] and the special-token columns [H, extra] (or None)."""
  x = hidden.astype(dtype)
  logits = matmul(x, base_hv, 1, dtype, out_dtype=jnp.float32)
  if extra_hx is None:
    return logits
  return jnp.concatenate([logits, matmul(x, extra_hx, 1, dtype, out_dtype=jnp.float32)], -1)


class LmHead(nn.Module):
  """Untied output projection, split like the Embedder; returns float32 logits."""

  cfg: DecoderConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.cfg
    pdt, dt = _dtype(cfg.param_dtype), _dtype(cfg.dtype)
    base = cast(
      Array,
      self.param(
        "base_head",
        nn.with_logical_partitioning(default_kernel_init, ("embed", "vocab")),
        (cfg.hidden_size, cfg.base_vocab_size),
        pdt,
      ),
    )
    extra = None
    if cfg.num_extra_tokens:
      extra = cast(
        Array,
        self.param(
          "extra_head",
          nn.with_logical_partitioning(default_kernel_init, ("embed", "extra_vocab")),
          (cfg.hidden_size, cfg.num_extra_tokens),
          pdt,
        ),
      )
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
  """Grouped-query attention as one einsum pair over [batch, kv, group] -> [b, t, h, d];
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
  """Softmax probabilities [b, g * t, s] (dtype of v's compute) of one KV head whose g
  query heads are stacked along the query axis."""
  b, q_len, _ = q_bqd.shape
  t, s = bias_bts.shape[1:]
  scores = jnp.einsum("bqd,bsd->bqs", q_bqd, k_bsd, preferred_element_type=jnp.float32)
  scores = _soft_cap(scores.reshape(b, q_len // t, t, s) * scale, softcap) + bias_bts[:, None]
  return jax.nn.softmax(scores, axis=-1).reshape(b, q_len, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_attention(
  q_bqd: Array, k_bsd: Array, v_bsd: Array, bias_bts: Array, scale: float, softcap: Optional[float]
) -> Array:
  """float32 attention output [b, g * t, d] of one KV head.

  Its own backward pass: the probabilities are kept from the forward pass (in v's dtype)
  and the softmax gradient is p * (dp - rowsum(p * dp)). Under plain autodiff the
  softmax's CPU fusions (with the score matmul and exponential fused in) cost more than
  twice as much, most of the stage2 step at 1035-token queries."""
  return _head_attention_fwd(q_bqd, k_bsd, v_bsd, bias_bts, scale, softcap)[0]


def _head_attention_fwd(q_bqd, k_bsd, v_bsd, bias_bts, scale, softcap):
  probs = _head_probs(q_bqd, k_bsd, bias_bts, scale, softcap).astype(v_bsd.dtype)
  out = jnp.einsum("bqs,bsd->bqd", probs, v_bsd, preferred_element_type=jnp.float32)
  return out, (q_bqd, k_bsd, v_bsd, probs)


def _head_attention_bwd(scale, softcap, residuals, d_out_bqd):
  q, k, v, probs = residuals
  d_out = d_out_bqd.astype(v.dtype)
  f32 = jnp.float32
  d_v = jnp.einsum("bqs,bqd->bsd", probs, d_out, preferred_element_type=f32)
  d_probs = jnp.einsum("bqd,bsd->bqs", d_out, v, preferred_element_type=f32)
  p = probs.astype(f32)
  d_scores = p * (d_probs - jnp.sum(p * d_probs, axis=-1, keepdims=True))
  if softcap is not None:
    # The cap's derivative, 1 - tanh^2, from the scores recomputed (one more matmul)
    # rather than another [b, q, s] residual kept from the forward pass.
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
  # [b, kv, groups, t, d] -> [b, t, kv * groups, d]: query head kv_j * groups + g.
  return jnp.stack(outs, 1).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


class Attention(nn.Module):
  """Grouped-query attention with RoPE and an optional KV cache."""

  cfg: DecoderConfig
  adapter: Optional[str] = None
  deterministic: bool = True

  def _linear(self, features, axes, name, n_in=1, use_bias=False):
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
    rope_btf: Tuple[Array, Array],
    bias_bqk: Array,
    cache: Optional[dict],
    cache_index_b: Optional[Array],
    query_slice: Optional[Tuple[int, int]] = None,
  ):
    """`rope_btf`: the positions' `rope_tables` (cos, sin). `query_slice` (start, stop):
    only those positions query (keys/values come from all); the output then has
    stop - start positions."""
    cfg = self.cfg
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x_q, rope_q = x_btd, rope_btf
    if query_slice is not None:
      start, stop = query_slice
      x_q = x_btd[:, start:stop]
      rope_q = (rope_btf[0][:, start:stop], rope_btf[1][:, start:stop])
      bias_bqk = bias_bqk[:, start:stop]
    bias = cfg.qkv_bias
    q = self._linear((h, hd), ("embed", "heads", "head_dim"), "q_proj", use_bias=bias)(x_q)
    k = self._linear((kv, hd), ("embed", "kv_heads", "head_dim"), "k_proj", use_bias=bias)(x_btd)
    v = self._linear((kv, hd), ("embed", "kv_heads", "head_dim"), "v_proj", use_bias=bias)(x_btd)
    q = apply_rope(q, rope_q)
    k = apply_rope(k, rope_btf)
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
    out = attend(q, k, v, bias_bqk, cfg.query_scale, cfg.attn_logit_softcapping)
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
    x_btd,
    rope_btf,
    bias_bqk,
    cache,
    cache_index_b,
    adapter: Optional[str],
    deterministic: bool,
    query_slice: Optional[Tuple[int, int]] = None,
  ):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    x_btd = constrain(x_btd, BATCH_LENGTH_EMBED)
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="attn_norm")(x_btd)
    h, new_cache = Attention(cfg, adapter, deterministic, name="attn")(
      h, rope_btf, bias_bqk, cache, cache_index_b, query_slice
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


class Decoder(nn.Module):
  """The shared CLaRa backbone. See the module docstring for the calling convention."""

  cfg: DecoderConfig

  def setup(self):
    cfg = self.cfg
    block = DecoderBlock
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
    if (tokens is None) == (embeddings is None):
      raise ValueError("pass exactly one of tokens or embeddings")
    x = (
      self.embed(cast(Array, tokens))
      if embeddings is None
      else embeddings.astype(_dtype(self.cfg.dtype))
    )
    b, t = x.shape[:2]
    steps = jnp.arange(t, dtype=jnp.int32)

    if cache is None:
      q_slot = jnp.broadcast_to(steps, (b, t))
      k_slot = q_slot
      mask = k_slot[:, None, :] <= q_slot[:, :, None]
      if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    else:
      if attention_mask is not None:
        raise ValueError("attention_mask is not used with a KV cache; right-pad prompts")
      if cache_index is None:
        raise ValueError("cache_index [batch] is required with a cache")
      # Scanned layers keep one stacked dict, else a list of per-layer dicts.
      cached_layers = cast(dict, cache)["k"].shape[0] if self.cfg.scan_layers else len(cache)
      if cached_layers != self.cfg.num_layers:
        raise ValueError(f"cache has {cached_layers} layers, model has {self.cfg.num_layers}")
      q_slot = cache_index.astype(jnp.int32)[:, None] + steps
      k_slot = jnp.arange(cache_length(cache), dtype=jnp.int32)[None]
      mask = k_slot[:, None, :] <= q_slot[:, :, None]
    windowed = self.cfg.windowed_layers
    local_mask = None
    if any(windowed):
      local_mask = mask & (
        q_slot[:, :, None] - k_slot[:, None, :] < cast(int, self.cfg.sliding_window)
      )
    # One bias per kind of layer present: {True: through the sliding window, False: global}.
    bias = {
      w: attention_bias(cast(Array, local_mask) if w else mask) for w in sorted(set(windowed))
    }
    if positions is None:
      positions = q_slot
    query_slice = None
    if readout is not None:
      if cache is not None:
        raise ValueError("readout is not supported with a KV cache")
      start, stop, _ = slice(*readout).indices(t)
      if stop <= start:
        raise ValueError(f"readout {readout} selects no position of length {t}")
      query_slice = (start, stop)

    rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
    if self.cfg.scan_layers:
      x, new_cache = self._scan_layers(x, rope, bias, cache, cache_index, adapter, deterministic)
      if query_slice is not None:
        x = x[:, query_slice[0] : query_slice[1]]
      return DecoderOutput(self.final_norm(x), new_cache)
    layer_caches: List[dict] = []
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(
        x,
        rope,
        bias[windowed[i]],
        None if cache is None else cache[i],
        cache_index,
        adapter,
        deterministic,
        query_slice if i == last else None,
      )
      if cache is not None:
        layer_caches.append(layer_cache)
    return DecoderOutput(self.final_norm(x), layer_caches if cache is not None else None)

  def _scan_layers(self, x, rope, bias, cache, cache_index, adapter, deterministic):
    """The blocks as one scan: the hidden states are the carry; each step reads its
    layer's slice of the stacked parameters (and of a stacked cache). `bias`: one per kind
    of layer, {windowed: bias}; with both kinds, each step selects its own by a scanned
    per-layer flag, as the compiled block is shared."""
    windowed = jnp.asarray(self.cfg.windowed_layers) if len(bias) > 1 else None

    def body(block, x_btd, xs):
      layer_cache, is_windowed = xs
      if is_windowed is None:
        (layer_bias,) = bias.values()
      else:
        layer_bias = jnp.where(is_windowed, bias[True], bias[False])
      return block(x_btd, rope, layer_bias, layer_cache, cache_index, adapter, deterministic, None)

    scan = nn.scan(
      body,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=0,
      out_axes=0,
      length=self.cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scan(self.layers, x, (cache, windowed))

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


def init_params(cfg: DecoderConfig, rng: Array, boxed: bool = False):
  """Initial parameters (every adapter and both heads), as a plain nested dict.

  With `boxed=True` the leaves keep their `nn.LogicallyPartitioned` boxes (what
  `clara_jax.partitioning` reads to derive shardings).
  """
  variables = Decoder(cfg).init(rng, jnp.zeros((1, 2), jnp.int32), method=Decoder.init_all)
  params = variables["params"]
  return params if boxed else nn.meta.unbox(params)


def abstract_params(cfg: DecoderConfig):
  """Shapes/dtypes of the boxed parameters, without allocating them."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), boxed=True))
