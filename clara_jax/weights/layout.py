"""The one map between clara_jax's parameter tree and the names of other formats, read by
every importer and exporter (`hf_import`/`hf_export`, `clara_import`/`clara_export`,
`gguf_import`): adding a family or a tensor is one entry here.

Hugging Face names (torch Linear weights are [out, in]; clara_jax kernels are
[in..., out...]):

    model.embed_tokens.weight [V, D]                 embedder/base_embedding [V, D]
    model.layers.{i}.self_attn.q_proj.weight [H*hd, D] layers_{i}/attn/q_proj/kernel [D, H, hd]
    model.layers.{i}.self_attn.k_proj.weight [K*hd, D] layers_{i}/attn/k_proj/kernel [D, K, hd]
    model.layers.{i}.self_attn.v_proj.weight [K*hd, D] layers_{i}/attn/v_proj/kernel [D, K, hd]
    model.layers.{i}.self_attn.o_proj.weight [D, H*hd] layers_{i}/attn/o_proj/kernel [H, hd, D]
    model.layers.{i}.mlp.{gate,up}_proj.weight [F, D]  layers_{i}/mlp/{gate,up}_proj/kernel [D, F]
    model.layers.{i}.mlp.down_proj.weight [D, F]       layers_{i}/mlp/down_proj/kernel [F, D]
    model.layers.{i}.input_layernorm.weight [D]        layers_{i}/attn_norm/scale
    model.layers.{i}.post_attention_layernorm.weight   layers_{i}/mlp_norm/scale
    model.norm.weight [D]                            final_norm/scale
    lm_head.weight [V, D] (or the embedding if tied) lm_head/base_head [D, V]

Qwen2 adds `self_attn.{q,k,v}_proj.bias` [H*hd] / [K*hd] -> `attn/{q,k,v}_proj/bias`
[H, hd] / [K, hd]. Phi-3 fuses the projections that read the hidden state:
`self_attn.qkv_proj.weight` [(H + 2K) hd, D] and `mlp.gate_up_proj.weight` [2F, D], split
row-wise into q, k, v and gate, up.

Gemma-2 norms both the input and the output of attention and of the MLP, and names them
differently (`DecoderConfig.post_norms`):

    model.layers.{i}.input_layernorm.weight [D]             layers_{i}/attn_norm/scale
    model.layers.{i}.post_attention_layernorm.weight [D]    layers_{i}/attn_post_norm/scale
    model.layers.{i}.pre_feedforward_layernorm.weight [D]   layers_{i}/mlp_norm/scale
    model.layers.{i}.post_feedforward_layernorm.weight [D]  layers_{i}/mlp_post_norm/scale

Gemma and Gemma-2 fold values on import: the embedding times sqrt(hidden_size) and every
norm weight plus 1 (their RMSNorm multiplies by 1 + weight).

HF checkpoints already store q/k in the "rotate half" RoPE layout that
`clara_jax.model.layers.apply_rope` uses, so no head-dim permutation is needed.

Official CLaRa LoRA factors (PEFT's target_modules="all-linear"), for the adapter of role
`role`: `model.layers.{i}.{self_attn,mlp}.{proj}_proj.lora_A.weight` [r, in] ->
`layers_{i}/{attn,mlp}/{proj}_proj/lora_{role}/a` [in..., r] and `lora_B.weight`
[out, r] -> `.../b` [r, out...].

GGUF -> HF names (ggml lists shapes innermost first; the arrays read back in torch's
[out, in] order):

    token_embd.weight          model.embed_tokens.weight
    blk.{i}.attn_q.weight      model.layers.{i}.self_attn.q_proj.weight  (rows permuted)
    blk.{i}.attn_k.weight      model.layers.{i}.self_attn.k_proj.weight  (rows permuted)
    blk.{i}.attn_v.weight      model.layers.{i}.self_attn.v_proj.weight
    blk.{i}.attn_output.weight model.layers.{i}.self_attn.o_proj.weight
    blk.{i}.ffn_{gate,up,down}.weight  model.layers.{i}.mlp.{gate,up,down}_proj.weight
    blk.{i}.attn_norm.weight   model.layers.{i}.input_layernorm.weight
    blk.{i}.ffn_norm.weight    model.layers.{i}.post_attention_layernorm.weight
    output_norm.weight         model.norm.weight
    output.weight              lm_head.weight (absent: tied to the embedding)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from clara_jax.model.config import DecoderConfig
from clara_jax.model.layers import lora_prefix

Shape = Tuple[int, ...]
Convert = Callable[[np.ndarray], Any]

# architectures[0] -> model_type, for the checkpoints this decoder reproduces exactly.
SUPPORTED_ARCHITECTURES: Dict[str, str] = {
  "MistralForCausalLM": "mistral",
  "LlamaForCausalLM": "llama",
  "Qwen2ForCausalLM": "qwen2",
  "Phi3ForCausalLM": "phi3",
  "GemmaForCausalLM": "gemma",
  "Gemma2ForCausalLM": "gemma2",
}

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"

# The families whose embedding and norms are folded on import (see the table above).
GEMMA_FAMILIES = ("gemma", "gemma2")
# The family whose hidden-state projections are fused.
FUSED_FAMILY = "phi3"


@dataclasses.dataclass(frozen=True)
class Block:
  """One sub-block of a decoder layer: its clara_jax and HF module names, the projections
  reading the (normed) hidden state, the one writing it back, and Phi-3's fused name for
  the former."""

  module: str
  hf_module: str
  inputs: Tuple[str, ...]
  output: str
  fused: str

  @property
  def projections(self) -> Tuple[str, ...]:
    """Every Linear of the block, in the official state dicts' order."""
    return self.inputs + (self.output,)


BLOCKS = (
  Block("attn", "self_attn", ("q", "k", "v"), "o", "qkv_proj"),
  Block("mlp", "mlp", ("gate", "up"), "down", "gate_up_proj"),
)
# Projections with a bias in the families that have one (Qwen2).
BIASED = ("q", "k", "v")

# (HF norm name, clara_jax norm) of a layer, without and with Gemma-2's post norms
# ("post attention" is then the attention output's norm).
NORMS = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"))
POST_NORMS = (
  ("input_layernorm", "attn_norm"),
  ("post_attention_layernorm", "attn_post_norm"),
  ("pre_feedforward_layernorm", "mlp_norm"),
  ("post_feedforward_layernorm", "mlp_post_norm"),
)


def block_of(module: str) -> Block:
  return next(b for b in BLOCKS if module in (b.module, b.hf_module))


def projection_axes(cfg: DecoderConfig) -> Dict[str, Tuple[Shape, Shape]]:
  """(input axes, output axes) of each projection's clara_jax kernel [in..., out...]."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  heads, kv_heads = (cfg.num_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)
  return {
    "q": ((d,), heads),
    "k": ((d,), kv_heads),
    "v": ((d,), kv_heads),
    "o": (heads, (d,)),
    "gate": ((d,), (f,)),
    "up": ((d,), (f,)),
    "down": ((f,), (d,)),
  }


def linear_shapes(cfg: DecoderConfig) -> Dict[str, Tuple[int, int]]:
  """(in_features, out_features) of each projection's torch Linear."""
  return {
    proj: (int(np.prod(ins)), int(np.prod(outs)))
    for proj, (ins, outs) in projection_axes(cfg).items()
  }


# ------------------------------------------------------------------ the HF tensor plan


@dataclasses.dataclass(frozen=True)
class Entry:
  """One checkpoint tensor: its HF name and shape, and where/how it lands in clara_jax."""

  hf_name: str
  hf_shape: Shape
  # '/'-joined clara_jax parameter path; a tuple of them for a fused tensor (Phi-3's
  # qkv_proj, gate_up_proj), whose `convert` then returns one array per path.
  path: Union[str, Tuple[str, ...]]
  convert: Convert

  @property
  def parts(self) -> Tuple[str, ...]:
    return self.path if isinstance(self.path, tuple) else (self.path,)

  def arrays(self, tensor: np.ndarray) -> Tuple[np.ndarray, ...]:
    out = self.convert(tensor)
    return tuple(out) if isinstance(self.path, tuple) else (out,)


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _transpose(w: np.ndarray) -> np.ndarray:
  return w.T


def _reshape(shape: Shape) -> Convert:
  return lambda w: w.reshape(shape)


def _kernel(cfg: DecoderConfig, proj: str) -> Convert:
  """torch [out, in] -> clara_jax [in..., out...]: a transpose, then the head axes."""
  ins, outs = projection_axes(cfg)[proj]
  if len(ins) + len(outs) == 2:
    return _transpose
  return lambda w: w.T.reshape(ins + outs)


def _split_rows(converts: List[Convert], rows: List[int]) -> Convert:
  """A fused tensor's row blocks, each through its own conversion."""
  bounds = np.cumsum([0] + rows).tolist()
  return lambda w: tuple(c(w[a:b]) for c, a, b in zip(converts, bounds[:-1], bounds[1:]))


def _fold_scale(scale: float) -> Convert:
  return lambda w: w.astype(np.float32) * np.float32(scale)


def _fold_norm(w: np.ndarray) -> np.ndarray:
  return w.astype(np.float32) + 1.0


def embedding_scale(model_type: str, cfg: DecoderConfig) -> float:
  """Gemma and Gemma-2 multiply their input embeddings by sqrt(hidden_size) (not their tied
  output head); the import folds that into the embedding table."""
  return float(np.float32(cfg.hidden_size**0.5)) if model_type in GEMMA_FAMILIES else 1.0


def _embedding_entry(cfg: DecoderConfig, model_type: str) -> Entry:
  scale = embedding_scale(model_type, cfg)
  convert = _same if scale == 1.0 else _fold_scale(scale)
  return Entry(
    EMBEDDING, (cfg.base_vocab_size, cfg.hidden_size), "embedder/base_embedding", convert
  )


def _bias_entries(cfg: DecoderConfig, src: str, dst: str) -> List[Entry]:
  axes = projection_axes(cfg)
  return [
    Entry(
      f"{src}self_attn.{proj}_proj.bias",
      (int(np.prod(axes[proj][1])),),
      f"{dst}attn/{proj}_proj/bias",
      _reshape(axes[proj][1]),
    )
    for proj in BIASED
  ]


def _projection_entry(cfg: DecoderConfig, block: Block, proj: str, src: str, dst: str) -> Entry:
  n_in, n_out = linear_shapes(cfg)[proj]
  return Entry(
    f"{src}{block.hf_module}.{proj}_proj.weight",
    (n_out, n_in),
    f"{dst}{block.module}/{proj}_proj/kernel",
    _kernel(cfg, proj),
  )


def _fused_entry(cfg: DecoderConfig, block: Block, src: str, dst: str) -> Entry:
  """Phi-3's one tensor for a block's input projections, their rows stacked."""
  shapes = linear_shapes(cfg)
  rows = [shapes[proj][1] for proj in block.inputs]
  return Entry(
    f"{src}{block.hf_module}.{block.fused}.weight",
    (sum(rows), shapes[block.inputs[0]][0]),
    tuple(f"{dst}{block.module}/{proj}_proj/kernel" for proj in block.inputs),
    _split_rows([_kernel(cfg, proj) for proj in block.inputs], rows),
  )


def _input_entries(cfg: DecoderConfig, fused: bool, src: str, dst: str) -> List[Entry]:
  if fused:
    return [_fused_entry(cfg, block, src, dst) for block in BLOCKS]
  return [
    _projection_entry(cfg, block, proj, src, dst) for block in BLOCKS for proj in block.inputs
  ]


def _norm_entries(cfg: DecoderConfig, norm: Convert, src: str, dst: str) -> List[Entry]:
  return [
    Entry(f"{src}{hf}.weight", (cfg.hidden_size,), f"{dst}{ours}/scale", norm)
    for hf, ours in (POST_NORMS if cfg.post_norms else NORMS)
  ]


def _layer_entries(cfg: DecoderConfig, i: int, model_type: str, norm: Convert) -> List[Entry]:
  src, dst = f"model.layers.{i}.", f"layers_{i}/"
  entries = _bias_entries(cfg, src, dst) if cfg.qkv_bias else []
  entries += _input_entries(cfg, model_type == FUSED_FAMILY, src, dst)
  entries += [_projection_entry(cfg, block, block.output, src, dst) for block in BLOCKS]
  return entries + _norm_entries(cfg, norm, src, dst)


def tensor_plan(cfg: DecoderConfig, tied: bool, model_type: str = "mistral") -> List[Entry]:
  """Every tensor of a `model_type` checkpoint of `cfg`'s shapes, in checkpoint order."""
  norm = _fold_norm if model_type in GEMMA_FAMILIES else _same
  plan = [_embedding_entry(cfg, model_type)]
  for i in range(cfg.num_layers):
    plan += _layer_entries(cfg, i, model_type, norm)
  plan.append(Entry(FINAL_NORM, (cfg.hidden_size,), "final_norm/scale", norm))
  if not tied:
    shape = (cfg.base_vocab_size, cfg.hidden_size)
    plan.append(Entry(LM_HEAD, shape, "lm_head/base_head", _transpose))
  return plan


# ------------------------------------------------------------- official CLaRa adapters

# Official adapter name -> clara_jax role.
ADAPTER_NAMES = {
  "encoder_adapter": "compressor",
  "query_reasoner_adapter": "reasoner",
  "decoder_adapter": "generator",
}
OFFICIAL_ADAPTER_NAMES: Dict[str, str] = {ours: ref for ref, ours in ADAPTER_NAMES.items()}

_ALL_PROJECTIONS = "|".join(p for b in BLOCKS for p in b.projections)
_HF_MODULES = "|".join(b.hf_module for b in BLOCKS)
# Any prefix (PEFT's `base_model.model.`) and an optional adapter name before `.weight`.
LORA_KEY = re.compile(
  rf"(?:.*\.)?layers\.(\d+)\.({_HF_MODULES})\.({_ALL_PROJECTIONS})_proj\.lora_([AB])"
  r"(?:\.[A-Za-z_]\w*)?\.weight$"
)


def official_lora_keys(cfg: DecoderConfig, role: str) -> List[Tuple[str, str, Shape]]:
  """(official key, clara_jax path, torch shape) of every LoRA factor of `role`, in the
  official state dict's order (layer, then q, k, v, o, gate, up, down, then A, B)."""
  assert cfg.lora is not None  # callers have checked that the model has adapters
  r, shapes, prefix = cfg.lora.rank, linear_shapes(cfg), lora_prefix(role)
  out: List[Tuple[str, str, Shape]] = []
  for i in range(cfg.num_layers):
    for block in BLOCKS:
      for proj in block.projections:
        n_in, n_out = shapes[proj]
        src = f"layers_{i}/{block.module}/{proj}_proj/{prefix}"
        key = f"model.layers.{i}.{block.hf_module}.{proj}_proj"
        out.append((f"{key}.lora_A.weight", f"{src}/a", (r, n_in)))
        out.append((f"{key}.lora_B.weight", f"{src}/b", (n_out, r)))
  return out


def lora_path(key: str, role: str) -> Optional[Tuple[str, str, str]]:
  """(clara_jax path, projection, "A" or "B") of an official LoRA key (None: not one)."""
  match = LORA_KEY.fullmatch(key)
  if match is None:
    return None
  layer, hf_module, proj, part = match.groups()
  module = block_of(hf_module).module
  return f"layers_{layer}/{module}/{proj}_proj/{lora_prefix(role)}/{part.lower()}", proj, part


def lora_from_official(proj: str, part: str, w: np.ndarray, cfg: DecoderConfig) -> np.ndarray:
  """torch LoRA A [r, in] / B [out, r] -> clara_jax a [in..., r] / b [r, out...]."""
  ins, outs = projection_axes(cfg)[proj]
  factor = w.T
  if part == "A":
    return factor.reshape(ins + (-1,)) if len(ins) > 1 else factor
  return factor.reshape((factor.shape[0],) + outs) if len(outs) > 1 else factor


def lora_to_official(path: str, value: np.ndarray, rank: int) -> np.ndarray:
  """clara_jax a [in..., r] / b [r, out...] -> torch A [r, in] / B [out, r]."""
  return value.reshape(-1, rank).T if path.endswith("/a") else value.reshape(rank, -1).T


def official_rows(base_vocab: int, n_mem: int) -> np.ndarray:
  """The official row of each clara_jax extra token (<ENC>, <SEP>, <AE>, <MEM0>, ...): the
  official vocabulary appends <MEM0>..<MEM{n-1}>, <AE>, <ENC>, <SEP>."""
  ae, enc, sep = base_vocab + n_mem, base_vocab + n_mem + 1, base_vocab + n_mem + 2
  return np.asarray([enc, sep, ae] + [base_vocab + j for j in range(n_mem)])


# (official tensor name, clara_jax base path, clara_jax extra path, stored transposed) of
# the resized vocabulary tensors (`decoder_first_last_layers.pth`).
FIRST_LAST = (
  (EMBEDDING, "embedder/base_embedding", "embedder/extra_embedding", False),
  (LM_HEAD, "lm_head/base_head", "lm_head/extra_head", True),
)


# ------------------------------------------------------------------------ GGUF names

GGUF_LAYER_NAMES = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}
GGUF_GLOBAL_NAMES = {
  "token_embd.weight": EMBEDDING,
  "output_norm.weight": FINAL_NORM,
  "output.weight": LM_HEAD,
}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_name_of_gguf(gguf_name: str) -> Optional[str]:
  """The HF tensor name of a GGUF one (None: not a llama tensor)."""
  if gguf_name in GGUF_GLOBAL_NAMES:
    return GGUF_GLOBAL_NAMES[gguf_name]
  match = _GGUF_LAYER.fullmatch(gguf_name)
  if match and match.group(2) in GGUF_LAYER_NAMES:
    return f"model.layers.{match.group(1)}.{GGUF_LAYER_NAMES[match.group(2)]}.weight"
  return None
