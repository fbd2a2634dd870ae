"""Decoder and LoRA hyper-parameters, and the named model sizes.

The configs are frozen dataclasses (hashable, so they can be static arguments of jitted
functions); `configs/` builds ml_collections on top of them for the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

# The three CLaRa roles, each a LoRA adapter on the shared frozen decoder.
CLARA_ADAPTERS: Tuple[str, ...] = ("compressor", "reasoner", "generator")

# Policies for `jax.checkpoint` on each decoder block ("none" keeps every activation).
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "minimal")
ATTENTION_LAYOUTS = ("grouped", "per_kv_head")
HIDDEN_ACTS = ("silu", "gelu_tanh")  # SwiGLU (Mistral, Llama, Qwen2, Phi-3), GeGLU (Gemma)
# The DecoderConfig fields that size its tensors (V, D, F, L, H, K, hd in the shape
# letters of `clara_jax.model`), each a positive int.
SHAPE_FIELDS = (
  "base_vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "head_dim",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Named low-rank adapters applied to every linear layer of the decoder.

  Attributes:
    adapters: names of the adapters; each gets its own `lora_<name>` subtree in every
      linear layer, so an optimizer mask can train any subset.
    rank: inner dimension r of the A [in, r] and B [r, out] factors.
    alpha: the adapter output is scaled by alpha / rank (PEFT convention).
    dropout: dropout rate on the adapter's input (training only; applied in steps of
      1/256, see `layers.dropout`).
  """

  adapters: Tuple[str, ...] = CLARA_ADAPTERS
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.1

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def __post_init__(self) -> None:
    if self.rank <= 0:
      raise ValueError(f"LoraConfig.rank must be positive, got {self.rank}")
    if len(set(self.adapters)) != len(self.adapters):
      raise ValueError(f"LoraConfig.adapters has duplicates: {self.adapters}")
    for name in self.adapters:
      if not name.isidentifier():
        raise ValueError(f"LoraConfig.adapters: {name!r} is not an identifier")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3's frequency-dependent RoPE scaling (`rope_type: "llama3"` in HF configs).

  Rotary frequencies whose wavelength exceeds `original_max_position /
  low_freq_factor` are divided by `factor`, those shorter than `original_max_position /
  high_freq_factor` are kept, and those between are interpolated linearly in
  `original_max_position / wavelength` (the Llama 3 report's context extension)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position: int

  def __post_init__(self) -> None:
    if self.factor <= 0 or self.original_max_position <= 0:
      raise ValueError(
        f"RopeScaling: factor and original_max_position must be positive, "
        f"got {self.factor}, {self.original_max_position}"
      )
    if not 0 < self.low_freq_factor < self.high_freq_factor:
      raise ValueError(
        f"RopeScaling: need 0 < low_freq_factor < high_freq_factor, got "
        f"{self.low_freq_factor}, {self.high_freq_factor}"
      )


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A Mistral/Llama-style decoder.

  Attributes:
    base_vocab_size: rows of the pretrained (or SentencePiece) vocabulary.
    num_extra_tokens: rows appended for CLaRa's special tokens (<ENC>, <SEP>, <AE>,
      <MEM*>). They live in separate parameters so that they alone can be trained.
    hidden_size: model width (logical axis "embed").
    intermediate_size: SwiGLU inner width (logical axis "mlp").
    num_layers: decoder blocks.
    num_heads: query heads; num_kv_heads: key/value heads (grouped-query attention).
    head_dim: per-head width (Mistral: hidden_size // num_heads).
    rope_theta: rotary embedding base.
    rope_scaling: Llama-3 frequency scaling of the rotary embedding, or None.
    rms_norm_eps: epsilon of every RMSNorm.
    sliding_window: Mistral v0.1 style local attention span: a query at position q sees
      the keys at q - sliding_window < k <= q; None attends to all keys.
    sliding_layer_pattern: which layers use `sliding_window`, cycled over the layers
      (layer i is local iff pattern[i % len(pattern)]); None: every layer. Gemma-2
      alternates local and global layers, local first: (True, False). A tuple (not a
      per-layer array) so that the config stays hashable and a depth override keeps it.
    dtype: compute dtype of matmuls ("bfloat16" on TPU, "float32" on CPU).
    param_dtype: storage dtype of parameters.
    remat_policy: one of REMAT_POLICIES, applied per block.
    scan_layers: run the blocks as one `lax.scan` over parameters stacked on a leading
      "layers" axis (`layers/...` [num_layers, ...]) instead of an unrolled loop
      (`layers_{i}/...`): one block is compiled instead of num_layers, so compile time
      stops growing with depth. Exports are written unrolled either way
      (`clara_jax.model.layout`). With a `readout`, the last layer then computes every
      position.
    attention_layout: "grouped" (one einsum over all heads; shards over the "tensor"
      mesh axis) or "per_kv_head" (a loop of batched 3-D matmuls, one per KV head: XLA
      fuses scores/softmax/values better on CPU, but the loop slices the head axis, so
      it is for unsharded heads).
    tie_embeddings: the output head is the transposed embedding table (Gemma, Phi-4-mini,
      Llama-3.2-1B style): no `lm_head` parameters; the logit lens then decodes a memory
      through the same rows that embed the generator's input (docs/results.md, "Tied vs untied embeddings").
    qkv_bias: the query, key and value projections have biases (Qwen2).
    hidden_act: the gated MLP's activation, one of HIDDEN_ACTS.
    attn_logit_softcapping: Gemma-2's attention score cap: scaled scores become
      cap * tanh(scores / cap) before masking; None: uncapped.
    final_logit_softcapping: the same cap on the LM head's logits (`Decoder.logits`).
    query_pre_attn_scalar: attention scores are scaled by query_pre_attn_scalar ** -0.5
      (Gemma-2); None: head_dim ** -0.5.
    post_norms: an RMSNorm on the attention output and one on the MLP output before each
      residual add (Gemma-2's post_attention/post_feedforward norms: `attn_post_norm`,
      `mlp_post_norm`); False adds no parameters.
    lora: the adapters; None builds a plain decoder.
  """

  base_vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  num_extra_tokens: int = 0
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  rms_norm_eps: float = 1e-5
  sliding_window: Optional[int] = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_layout: str = "grouped"
  tie_embeddings: bool = False
  qkv_bias: bool = False
  hidden_act: str = "silu"
  sliding_layer_pattern: Optional[Tuple[bool, ...]] = None
  attn_logit_softcapping: Optional[float] = None
  final_logit_softcapping: Optional[float] = None
  query_pre_attn_scalar: Optional[float] = None
  post_norms: bool = False
  lora: Optional[LoraConfig] = LoraConfig()

  @property
  def vocab_size(self) -> int:
    return self.base_vocab_size + self.num_extra_tokens

  @property
  def adapters(self) -> Tuple[str, ...]:
    return self.lora.adapters if self.lora is not None else ()

  @property
  def windowed_layers(self) -> Tuple[bool, ...]:
    """Per layer, whether it attends through `sliding_window`."""
    if self.sliding_window is None:
      return (False,) * self.num_layers
    pattern = self.sliding_layer_pattern or (True,)
    return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

  @property
  def query_scale(self) -> float:
    """The factor on the attention scores."""
    scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
    return scalar**-0.5

  def __post_init__(self) -> None:
    for field in SHAPE_FIELDS:
      if getattr(self, field) <= 0:
        raise ValueError(f"DecoderConfig.{field} must be positive, got {getattr(self, field)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"DecoderConfig.num_heads ({self.num_heads}) must be a multiple of "
        f"num_kv_heads ({self.num_kv_heads})"
      )
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig.head_dim must be even for RoPE, got {self.head_dim}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"DecoderConfig.remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
    if self.hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"DecoderConfig.hidden_act {self.hidden_act!r} not in {HIDDEN_ACTS}")
    if self.attention_layout not in ATTENTION_LAYOUTS:
      raise ValueError(
        f"DecoderConfig.attention_layout {self.attention_layout!r} not in {ATTENTION_LAYOUTS}"
      )
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"DecoderConfig.{field} {getattr(self, field)!r} is not a float dtype")
    for field in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
      value = getattr(self, field)
      if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
        raise ValueError(f"DecoderConfig.{field} must be None or a positive number, got {value!r}")
    pattern = self.sliding_layer_pattern
    if pattern is not None:
      # JSON and ml_collections hand back lists; a list would make the config unhashable.
      object.__setattr__(self, "sliding_layer_pattern", tuple(pattern))
      pattern = self.sliding_layer_pattern
      if not pattern or not all(isinstance(x, bool) for x in pattern):
        raise ValueError(
          f"DecoderConfig.sliding_layer_pattern must be a non-empty tuple of bools, got {pattern!r}"
        )
      if self.sliding_window is None:
        raise ValueError("DecoderConfig.sliding_layer_pattern needs a sliding_window")

  def replace(self, **changes: Any) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self, include_lora: bool = True) -> int:
    """Parameter count, computed from shapes (used by benchmarks and the plan)."""
    d, f, h, kv, hd = (
      self.hidden_size,
      self.intermediate_size,
      self.num_heads,
      self.num_kv_heads,
      self.head_dim,
    )
    linears = [(d, h * hd), (d, kv * hd), (d, kv * hd), (h * hd, d), (d, f), (d, f), (f, d)]
    per_layer = sum(i * o for i, o in linears) + (4 if self.post_norms else 2) * d
    if self.qkv_bias:
      per_layer += (h + 2 * kv) * hd
    if include_lora and self.lora is not None:
      per_layer += len(self.lora.adapters) * sum(self.lora.rank * (i + o) for i, o in linears)
    tables = 1 if self.tie_embeddings else 2
    return self.num_layers * per_layer + tables * self.vocab_size * d + d


def _shape(vocab: int, d: int, f: int, layers: int, h: int, kv: int, hd: int) -> Dict[str, int]:
  """A size's SHAPE_FIELDS from its V, D, F, L, H, K, hd."""
  return dict(zip(SHAPE_FIELDS, (vocab, d, f, layers, h, kv, hd)))


_CPU: Dict[str, Any] = {"attention_layout": "per_kv_head"}
_BF16: Dict[str, Any] = {"dtype": "bfloat16", "param_dtype": "bfloat16"}

# Named sizes. `tiny` keeps CPU tests fast, `small` is the CPU demo/benchmark size,
# `ref_tiny` matches the shapes at which the official PyTorch code runs on a CPU, and
# the others have the real shapes of the base models they are named after. The CPU sizes
# attend per KV head (faster there); the real ones keep the grouped einsum that shards
# over "tensor".
MODEL_SIZES: Dict[str, Dict[str, Any]] = {
  "tiny": {**_shape(512, 64, 128, 2, 4, 2, 16), "lora": LoraConfig(rank=4, alpha=8.0), **_CPU},
  "small": {**_shape(2048, 256, 768, 4, 8, 4, 32), "lora": LoraConfig(rank=16, alpha=32.0), **_CPU},
  "ref_tiny": {**_shape(8000, 256, 768, 4, 8, 4, 32), **_CPU},
  # SmolLM2-135M(-Instruct)'s shapes (`clara-jax fetch-base smollm2`, `import-gguf`).
  "smollm2_135m": {
    **_shape(49152, 576, 1536, 30, 9, 3, 64),
    "rope_theta": 1e5,
    "rms_norm_eps": 1e-5,
    "lora": LoraConfig(rank=16, alpha=32.0),
  },
  # Llama-3.1-8B and Llama-3.2-1B (tied embeddings): the HF configs' shapes and their
  # Llama-3 RoPE scaling (factor 8 and 32 of an 8192-token original context).
  "llama3_1_8b": {
    **_shape(128256, 4096, 14336, 32, 32, 8, 128),
    "rope_theta": 5e5,
    "rope_scaling": RopeScaling(8.0, 1.0, 4.0, 8192),
    **_BF16,
  },
  "llama3_2_1b": {
    **_shape(128256, 2048, 8192, 16, 32, 8, 64),
    "rope_theta": 5e5,
    "rope_scaling": RopeScaling(32.0, 1.0, 4.0, 8192),
    "tie_embeddings": True,
    **_BF16,
  },
  # Qwen2.5-0.5B: query/key/value biases, tied embeddings.
  "qwen2_5_0_5b": {
    **_shape(151936, 896, 4864, 24, 14, 2, 64),
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
    "qkv_bias": True,
    "tie_embeddings": True,
    **_BF16,
  },
  # Phi-3-mini-4k: fused projections in its checkpoints, a 2047-token sliding window.
  "phi3_mini_4k": {**_shape(32064, 3072, 8192, 32, 32, 32, 96), "sliding_window": 2047, **_BF16},
  # Gemma-2B as `import-hf` loads it: GeGLU, the sqrt(hidden) input scale and (1 + w)
  # norms folded into the weights, the tied head imported as its own copy.
  "gemma_2b": {
    **_shape(256000, 2048, 16384, 18, 8, 1, 256),
    "rms_norm_eps": 1e-6,
    "hidden_act": "gelu_tanh",
    **_BF16,
  },
  # Gemma-2-2B likewise: local (4096-token window) and global layers alternating, soft-
  # capped attention scores and logits, norms before and after attention and MLP.
  "gemma2_2b": {
    **_shape(256000, 2304, 9216, 26, 8, 4, 256),
    "rms_norm_eps": 1e-6,
    "hidden_act": "gelu_tanh",
    "sliding_window": 4096,
    "sliding_layer_pattern": (True, False),
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "query_pre_attn_scalar": 256.0,
    "post_norms": True,
    **_BF16,
  },
  "mistral_7b": {**_shape(32000, 4096, 14336, 32, 32, 8, 128), "rope_theta": 1e6, **_BF16},
}


def model_config(name: str, **overrides: Any) -> DecoderConfig:
  """Returns the named size, with fields overridden (e.g. `num_extra_tokens`)."""
  if name not in MODEL_SIZES:
    raise ValueError(f"unknown model size {name!r}; known: {sorted(MODEL_SIZES)}")
  return DecoderConfig(**{**MODEL_SIZES[name], **overrides})


def config_to_dict(cfg: DecoderConfig) -> Dict[str, Any]:
  """JSON-ready dict of a DecoderConfig (LoRA nested or None)."""
  return dataclasses.asdict(cfg)


def config_from_dict(d: Dict[str, Any]) -> DecoderConfig:
  """Inverse of `config_to_dict`; unknown fields are an error naming them."""
  known = {f.name for f in dataclasses.fields(DecoderConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown DecoderConfig fields {unknown}; known: {sorted(known)}")
  d = dict(d)
  if d.get("lora") is not None:
    lora = dict(d["lora"])
    lora["adapters"] = tuple(lora.get("adapters", CLARA_ADAPTERS))
    d["lora"] = LoraConfig(**lora)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  return DecoderConfig(**d)
