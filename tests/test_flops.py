"""The step FLOPs MFU divides by are the FLOPs the compiled step executes: the analytic
count of `clara_jax.model.flops` against XLA's cost analysis of each stage's step."""

import flax.linen as nn
import jax
import pytest

from clara_jax.model.config import config_from_dict
from clara_jax.model.decoder import abstract_params
from clara_jax.train.setup import abstract_batch, setup_train_step, step_flops


def _config(stage, **overrides):
  import importlib

  c = importlib.import_module(f"configs.{stage}").get_config("model=tiny")
  # Matmuls dominate at these widths, as in real models (elementwise work is not counted).
  c.model.update(
    hidden_size=256,
    intermediate_size=768,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    base_vocab_size=1024,
  )
  c.train.global_batch = 2
  c.mesh.shape = (1, 1, 1)
  c.clara.doc_max_length = 48
  c.data.update(
    question_max_length=16,
    prompt_length=48,
    answer_length=12,
    lm_length=64,
    # XLA's cost analysis counts a loop body once: one chunk of compression.
    candidates=10,
  )
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


CASES = [
  ("lm", {}),
  ("stage1", {}),
  ("stage1", {"clara.lexical_weight": 1.0, "clara.mse_weight": 0.0}),
  ("stage1_2", {}),
  ("stage2", {}),
  ("stage2", {"clara.train_compressor": True}),
  ("stage2_retrieval", {}),
]


@pytest.mark.parametrize(
  "stage,overrides", CASES, ids=[f"{s}-{'-'.join(o) or 'default'}" for s, o in CASES]
)
def test_step_flops_match_the_compiled_step(stage, overrides):
  c = _config(stage, **overrides)
  fields = c.model.to_dict()
  fields["num_extra_tokens"] = 3 + c.tokenizer.num_mem_tokens
  cfg = config_from_dict(fields)
  abstract = nn.meta.unbox(abstract_params(cfg))
  setup = setup_train_step(c, cfg, abstract, devices=jax.devices()[:1])
  state = setup.abstract_state(abstract)
  compiled = setup.lower(
    state, setup.state_shardings(state), abstract_batch(c, setup.cclara.n_mem)
  ).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  ours = step_flops(c, cfg, setup.cclara)
  assert abs(ours / xla - 1) < 0.10, (ours, xla)


def test_answering_flops_match_the_compiled_phases():
  """`bench generate`'s FLOP count of compress + reason + prefill (one new token: no
  decode step) against XLA's cost analysis of each phase compiled alone."""
  import jax.numpy as jnp

  from clara_jax.bench.generation import answer_flops
  from clara_jax.model import clara, stages
  from clara_jax.model.config import model_config
  from clara_jax.model.decoder import Decoder

  n_mem, b, n, doc, query, prompt = 4, 2, 10, 52, 20, 40
  cfg = model_config(
    "tiny",
    hidden_size=256,
    intermediate_size=768,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    base_vocab_size=1024,
    num_extra_tokens=3 + n_mem,
  )
  model = Decoder(cfg)
  params = nn.meta.unbox(abstract_params(cfg))
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)

  def flops(fn, *args):
    cost = jax.jit(fn).lower(params, *args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  compress = flops(
    lambda p, t, m: stages.frozen_memories(model, p, t, m, n_mem),
    ints(b * n, doc),
    ints(b * n, doc),
  )
  reason = flops(
    lambda p, t, m: clara.reason(model, p, t, m, n_mem), ints(b, query), ints(b, query)
  )

  def prefill(p, tokens):
    hidden = model.apply({"params": p}, tokens, adapter=clara.GENERATOR).hidden
    return model.apply({"params": p}, hidden[:, -1], method=Decoder.logits)

  xla = compress + reason + flops(prefill, ints(b, prompt))
  ours = answer_flops(cfg, b, n, doc, query, prompt, 1, n_mem)
  assert abs(ours / xla - 1) < 0.10, (ours, xla)
