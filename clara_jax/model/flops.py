"""FLOPs of what a training step executes, counted from the model's shapes.

A matmul [m, k] x [k, n] is 2mkn FLOPs; elementwise work (norms, softmax, activations)
is not counted. The counts follow the code, not a 6N rule:
* a frozen weight costs its forward matmul plus, where a gradient flows through it, the
  input-gradient matmul (1x); only trained weights add the weight-gradient matmul;
* attention (no weights) costs 2x its forward in the backward pass;
* the last layer of a pass with a read-out runs its queries, attention output and MLP
  only at the read-out positions (`Decoder.__call__(readout=...)`);
* a frozen compressor has its adapter folded into the base kernels (no LoRA matmuls);
* recomputation under remat is not counted (these are model FLOPs, as in MFU).
`tests/test_flops.py` checks each stage against XLA's `cost_analysis()` of the compiled
step.

Shape letters as in `clara_jax.model`.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

from clara_jax.model.config import DecoderConfig

# How far the backward pass of a decoder pass goes.
NO_GRAD = "none"  # forward only (a frozen compressor)
INPUT_GRAD = "inputs"  # gradients flow through it, nothing in it trains
ADAPTER_GRAD = "adapter"  # the active LoRA adapter trains, the base is frozen
ALL_GRAD = "all"  # every weight trains (lm pretraining, train_base)
GRADS = (NO_GRAD, INPUT_GRAD, ADAPTER_GRAD, ALL_GRAD)


@dataclasses.dataclass(frozen=True)
class DecoderPass:
  """One decoder pass over `rows` sequences of `length` tokens."""

  rows: int
  length: int
  readout: Optional[int] = None  # positions the last layer computes (None: all)
  head_tokens: int = 0  # tokens read by the LM head
  adapter: bool = True  # an unfolded LoRA adapter is active
  grad: str = NO_GRAD
  input_grad: bool = False  # the gradient reaches the input embeddings


def _lora_io(cfg: DecoderConfig) -> Dict[str, Tuple[int, int]]:
  """(in, out) of the adapted projections: q, k, v, o, gate, up, down."""
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  qo, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  return {
    "q": (d, qo),
    "k": (d, kv),
    "v": (d, kv),
    "o": (qo, d),
    "gate": (d, f),
    "up": (d, f),
    "down": (f, d),
  }


def linear_params(cfg: DecoderConfig) -> int:
  """Weights of the per-token linear layers in all blocks (no embeddings, no LoRA)."""
  return cfg.num_layers * sum(i * o for i, o in _lora_io(cfg).values())


def forward_flops(
  cfg: DecoderConfig, batch: int, length: int, lora_rank: int = 0, head_tokens: Optional[int] = None
) -> float:
  """Forward FLOPs of `batch` full passes of `length` (all positions, attention over the
  full square as computed); `head_tokens` tokens go through the LM head (default: all)."""
  p = DecoderPass(
    batch,
    length,
    head_tokens=batch * length if head_tokens is None else head_tokens,
    adapter=bool(lora_rank),
  )
  return pass_flops(cfg, p, lora_rank=lora_rank)


def pass_flops(cfg: DecoderConfig, p: DecoderPass, lora_rank: Optional[int] = None) -> float:
  """Forward + backward FLOPs of one decoder pass."""
  if p.grad not in GRADS:
    raise ValueError(f"grad {p.grad!r} not in {GRADS}")
  rank = (cfg.lora.rank if cfg.lora else 0) if lora_rank is None else lora_rank
  rank = rank if p.adapter else 0
  io = _lora_io(cfg)
  kv_names = ("k", "v")
  full, last = p.rows * p.length, p.rows * (p.readout or p.length)
  attn_dim = cfg.num_heads * cfg.head_dim

  def tokens(name: str, layer: int) -> int:
    is_last = layer == cfg.num_layers - 1
    return last if is_last and name not in kv_names else full

  fwd_lin = fwd_lora = 0.0
  skip_dx = 0.0  # first-layer q/k/v input gradients nobody needs
  for layer in range(cfg.num_layers):
    for name, (i, o) in io.items():
      t = tokens(name, layer)
      fwd_lin += 2.0 * i * o * t
      fwd_lora += 2.0 * rank * (i + o) * t
      if layer == 0 and name in ("q", "k", "v") and not p.input_grad:
        skip_dx += 2.0 * i * o * t
  queries_last = last if cfg.num_layers else 0
  fwd_attn = 4.0 * attn_dim * p.length * (full * (cfg.num_layers - 1) + queries_last)
  fwd_head = 2.0 * cfg.hidden_size * cfg.vocab_size * p.head_tokens
  forward = fwd_lin + fwd_lora + fwd_attn + fwd_head
  if p.grad == NO_GRAD:
    return forward
  if p.grad == ALL_GRAD:
    backward = 2.0 * forward - skip_dx
  else:
    lora_back = 2.0 * fwd_lora if p.grad == ADAPTER_GRAD else fwd_lora
    backward = (fwd_lin - skip_dx) + lora_back + 2.0 * fwd_attn + fwd_head
  return forward + backward


@dataclasses.dataclass(frozen=True)
class StepShapes:
  """The lengths of one global batch (tokens per pass, as the input pipeline packs
  them)."""

  batch: int
  doc_tokens: int  # document + special + memory tokens
  n_mem: int
  candidates: int  # stage2 candidates per question
  k: int  # selected (stage2) or given (stage1_2) documents per question
  question_tokens: int
  gen_tokens: int  # prompt + answer
  answer_tokens: int
  lm_tokens: int


def train_step_flops(
  stage: str,
  cfg: DecoderConfig,
  s: StepShapes,
  *,
  cached: bool = False,
  train_base: bool = False,
  train_generator: bool = True,
  train_compressor: bool = False,
  lexical: bool = False,
  mse: bool = True,
) -> float:
  """FLOPs one train step of `stage` executes (see the module docstring)."""
  b = s.batch
  if stage == "lm":
    return pass_flops(
      cfg,
      DecoderPass(b, s.lm_tokens, head_tokens=b * (s.lm_tokens - 1), adapter=False, grad=ALL_GRAD),
    )
  trained = ALL_GRAD if train_base else ADAPTER_GRAD
  generator = DecoderPass(
    b,
    s.gen_tokens,
    readout=s.answer_tokens,
    head_tokens=b * s.answer_tokens,
    input_grad=True,
    grad=trained if train_generator or stage != "stage2" else INPUT_GRAD,
  )
  if stage in ("stage1", "stage1_2"):
    docs = b * (1 if stage == "stage1" else s.k)
    # The alignment MSE reads every final state; without it only the memories are read.
    compressor = DecoderPass(
      docs,
      s.doc_tokens,
      readout=None if mse else s.n_mem,
      grad=trained,
      input_grad=stage == "stage1" or train_base,
    )
    total = pass_flops(cfg, compressor) + pass_flops(cfg, generator)
    if lexical:  # the memories read by the (frozen) LM head, gradient back to them
      total += 2 * 2.0 * cfg.hidden_size * cfg.vocab_size * docs * s.n_mem
    return total
  if stage not in ("stage2", "stage2_retrieval"):
    raise ValueError(f"unknown stage {stage!r}")
  docs = b * s.candidates
  if cached:
    total = 0.0
  elif train_compressor:
    total = pass_flops(cfg, DecoderPass(docs, s.doc_tokens, readout=s.n_mem, grad=ADAPTER_GRAD))
  else:
    total = pass_flops(cfg, DecoderPass(docs, s.doc_tokens, readout=s.n_mem, adapter=False))
  total += pass_flops(cfg, DecoderPass(b, s.question_tokens, readout=s.n_mem, grad=ADAPTER_GRAD))
  memory = s.n_mem * cfg.hidden_size
  total += 3 * 2.0 * docs * memory  # cosine scores, forward + gradient to the query
  if stage == "stage2":
    total += 2 * 2.0 * b * s.k * s.candidates * memory  # selection einsum + its gradient
    total += pass_flops(cfg, generator)
  return total
