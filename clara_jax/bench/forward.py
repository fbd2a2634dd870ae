"""Forward-pass throughput of a named decoder size: tokens/s and MFU."""

from __future__ import annotations

from typing import Any, cast

import jax

from clara_jax.model.config import model_config
from clara_jax.model.decoder import Decoder, DecoderOutput, init_params
from clara_jax.model.flops import forward_flops
from clara_jax.train.peak import matmul_peak_flops, time_fn


def forward_throughput(
  model: str = "small",
  batch: int = 8,
  length: int = 256,
  adapter: str | None = "generator",
  iters: int = 5,
) -> dict:
  """Times the jitted decoder forward (hidden states + logits at every position)."""
  cfg = model_config(model)
  params = init_params(cfg, jax.random.key(0))
  decoder = Decoder(cfg)
  tokens = jax.random.randint(jax.random.key(1), (batch, length), 0, cfg.vocab_size)

  @jax.jit
  def forward(p: Any, t: jax.Array) -> jax.Array:
    hidden = cast(DecoderOutput, decoder.apply({"params": p}, t, adapter=adapter)).hidden
    return cast(jax.Array, decoder.apply({"params": p}, hidden, method=Decoder.logits))

  seconds = time_fn(forward, params, tokens, iters=iters)
  peak = matmul_peak_flops()
  rank = cfg.lora.rank if (adapter and cfg.lora) else 0
  flops = forward_flops(cfg, batch, length, lora_rank=rank)
  return {
    "benchmark": "forward",
    "model": model,
    "batch": batch,
    "length": length,
    "adapter": adapter,
    "device": jax.devices()[0].device_kind,
    "step_s": round(seconds, 5),
    "tokens_per_s": round(batch * length / seconds, 1),
    "model_gflops_per_s": round(flops / seconds / 1e9, 2),
    "peak_gflops_per_s": round(peak / 1e9, 2),
    "mfu": round(flops / seconds / peak, 4),
  }
