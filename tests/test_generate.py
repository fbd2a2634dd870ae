"""KV-cache generation equals step-by-step recomputation without a cache; sampling is
seeded; one compile per shape bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clara_synth import BOS, EOS, INST, PAD, SEP, mem_ids, model_cfg
from compile_count import backend_compiles

from clara_jax.data import packing
from clara_jax.infer.generate import bucket_length, generate, left_to_right_padding, prefix_cache
from clara_jax.model import clara, lora
from clara_jax.model.decoder import Decoder, init_params

N_MEM, K = 2, 2
MODEL = model_cfg(N_MEM)


@pytest.fixture(scope="module")
def setup():
  p = init_params(MODEL, jax.random.key(0))
  flat = lora.flatten(p)
  keys = iter(jax.random.split(jax.random.key(1), len(flat)))
  for path in flat:
    if "lora_generator/b" in path:
      flat[path] = 0.3 * jax.random.normal(next(keys), flat[path].shape)
  p = lora.unflatten(flat)
  slots = packing.slot_ids(N_MEM, K, mem_ids(N_MEM), SEP)
  prompts = [
    [BOS, INST] + slots + [5, 6, INST],
    [BOS] + slots + [INST],
    [BOS, INST, 9, 9] + slots + [7, 8, 9, INST],
  ]
  arrays, _ = packing.pack_generator(
    prompts,
    [[]] * 3,
    prompt_len=16,
    answer_len=1,
    mem_ids=mem_ids(N_MEM),
    n_slots=K,
    eos_id=EOS,
    pad_id=PAD,
  )
  tokens = arrays["gen_tokens"][:, :16]
  mask = arrays["gen_mask"][:, :16]
  memories = jax.random.normal(jax.random.key(2), (3, K, N_MEM, MODEL.hidden_size))
  return p, tokens, mask, arrays["slot_positions"], memories


def _pack(prompts, length):
  arrays, _ = packing.pack_generator(
    prompts,
    [[]] * len(prompts),
    prompt_len=length,
    answer_len=1,
    mem_ids=mem_ids(N_MEM),
    n_slots=K,
    eos_id=EOS,
    pad_id=PAD,
  )
  return arrays["gen_tokens"][:, :length], arrays["gen_mask"][:, :length], arrays["slot_positions"]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_shared_prefix_built_once_generates_what_whole_prompts_do(scan_layers):
  """Prompts that share their first tokens: greedy tokens from the shared part's KV cache
  (built once, batch 1) plus each row's rest equal those from the whole prompts, with
  sampling too, in both layer layouts; the rows' rests have different lengths."""
  cfg = model_cfg(N_MEM, scan_layers=scan_layers)
  p = init_params(cfg, jax.random.key(3))
  p = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), p)
  shared = [BOS, INST, 9, 9, 5, 11]
  slots = packing.slot_ids(N_MEM, K, mem_ids(N_MEM), SEP)
  rests = [slots + [5, 6, INST], slots + [INST], slots + [7, 8, 9, 10, INST]]
  memories = jax.random.normal(jax.random.key(2), (3, K, N_MEM, cfg.hidden_size))
  whole = _pack([shared + r for r in rests], 24)
  rest = _pack(rests, 16)
  prefix = prefix_cache(p, cfg, jnp.asarray(shared, jnp.int32))
  greedy = None
  for kw in (dict(), dict(temperature=1.3, top_p=0.95, rng=jax.random.key(7))):
    want, want_len = generate(p, cfg, *whole, memories, max_new_tokens=7, eos_id=-1, **kw)
    got, got_len = generate(
      p, cfg, *rest, memories, max_new_tokens=7, eos_id=-1, prefix=prefix, **kw
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(got_len, want_len)
    greedy = want if greedy is None else greedy
  # The prefix is read: without it the same rests generate something else.
  alone, _ = generate(p, cfg, *rest, memories, max_new_tokens=7, eos_id=-1)
  assert not np.array_equal(np.asarray(alone), np.asarray(greedy))


def _greedy_without_cache(p, tokens, mask, slots, memories, steps):
  model = Decoder(MODEL)
  out = []
  for b in range(tokens.shape[0]):
    real = tokens[b][mask[b] == 1].tolist()
    offset = int(np.argmax(mask[b]))
    pos = slots[b] - offset
    seq = []
    for _ in range(steps):
      ids = jnp.asarray([real + seq])
      emb = model.apply({"params": p}, ids, method=Decoder.embed)
      emb = clara.splice(
        emb, jnp.asarray(pos)[None], memories[b].reshape(1, -1, memories.shape[-1])
      )
      h = model.apply({"params": p}, embeddings=emb, adapter="generator").hidden
      logits = model.apply({"params": p}, h[:, -1], method=Decoder.logits)
      seq.append(int(jnp.argmax(logits[0])))
    out.append(seq)
  return np.asarray(out)


def test_cache_generation_equals_recomputation(setup):
  p, tokens, mask, slots, memories = setup
  got, lengths = generate(p, MODEL, tokens, mask, slots, memories, max_new_tokens=6, eos_id=-1)
  want = _greedy_without_cache(p, tokens, mask, slots, memories, 6)
  np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(lengths, [6, 6, 6])


def test_generation_reads_memories_at_the_embedding_scale(setup):
  """memory_scale="embedding" generates what unscaled generation does from memories
  rescaled by hand to the embedding table's RMS (and not what it does from raw ones)."""
  p, tokens, mask, slots, memories = setup
  memories = 30.0 * memories
  target = Decoder(MODEL).apply({"params": p}, method=Decoder.embedding_rms)
  scaled, _ = generate(
    p, MODEL, tokens, mask, slots, memories, max_new_tokens=6, eos_id=-1, memory_scale="embedding"
  )
  by_hand, _ = generate(
    p,
    MODEL,
    tokens,
    mask,
    slots,
    clara.rescale_memories(memories, target),
    max_new_tokens=6,
    eos_id=-1,
  )
  np.testing.assert_array_equal(np.asarray(scaled), np.asarray(by_hand))


def test_eos_stops_and_pads(setup):
  p, tokens, mask, slots, memories = setup
  free, _ = generate(p, MODEL, tokens, mask, slots, memories, max_new_tokens=6, eos_id=-1)
  eos = int(free[0, 2])  # make the third greedy token of row 0 the end of sequence
  got, lengths = generate(p, MODEL, tokens, mask, slots, memories, max_new_tokens=6, eos_id=eos)
  got = np.asarray(got)
  assert int(lengths[0]) <= 3 and np.all(got[0, int(lengths[0]) - 1 :] == eos)


def test_sampling_is_seeded(setup):
  p, tokens, mask, slots, memories = setup
  run = lambda seed, top_p=0.9: np.asarray(
    generate(
      p,
      MODEL,
      tokens,
      mask,
      slots,
      memories,
      max_new_tokens=8,
      eos_id=-1,
      temperature=1.5,
      top_p=top_p,
      rng=jax.random.key(seed),
    )[0]
  )
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0, 1.0), run(1, 1.0))
  # top_p -> 0 keeps only the best token: greedy.
  greedy = np.asarray(
    generate(p, MODEL, tokens, mask, slots, memories, max_new_tokens=8, eos_id=-1)[0]
  )
  np.testing.assert_array_equal(run(3, 1e-6), greedy)


def test_padding_shift_and_buckets(setup):
  _, tokens, mask, slots, _ = setup
  shifted, lengths, new_slots = left_to_right_padding(
    jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(slots)
  )
  for b in range(3):
    n = int(lengths[b])
    np.testing.assert_array_equal(shifted[b, :n], tokens[b][mask[b] == 1])
    np.testing.assert_array_equal(shifted[b][np.asarray(new_slots[b])], tokens[b][slots[b]])
  assert bucket_length(10) == 64 and bucket_length(200) == 256 and bucket_length(5000) == 6144
  # One compile per shape: a second batch of the same shape reuses the executable, and a
  # new static setting compiles (which shows the counter sees generate's compiles).
  p, _, _, _, memories = setup
  doubled = memories * 2
  generate(p, MODEL, tokens, mask, slots, memories, max_new_tokens=6, eos_id=-1)
  with backend_compiles() as same_shape:
    generate(p, MODEL, tokens, mask, slots, doubled, max_new_tokens=6, eos_id=-1)
  with backend_compiles() as new_length:
    generate(p, MODEL, tokens, mask, slots, doubled, max_new_tokens=5, eos_id=-1)
  assert "jit(generate)" not in same_shape and "jit(generate)" in new_length, (
    same_shape,
    new_length,
  )
