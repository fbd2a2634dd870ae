"""The frozen compressor's memory cache (`clara_jax.train.memory_cache`): what it stores
is what the compressor computes, it is refused for another compressor, and a stage2 loss
over cached memories equals the loss over the candidates' tokens."""

import jax
import numpy as np
import pytest
from gguf_fixtures import write_tiny_gguf

from clara_jax.data.features import FeatureConfig, Featurizer
from clara_jax.data.tokenizer import BPETokenizer
from clara_jax.infer.api import ClaraModel
from clara_jax.model import clara, lora, stages
from clara_jax.train import memory_cache
from clara_jax.weights.gguf_import import import_gguf

DOCS = [
  f"The {a} of lake {i} eats {b} at dawn."
  for i, (a, b) in enumerate(
    zip(
      ["otter", "heron", "lynx", "badger", "marten", "ibis", "vole"],
      ["fish", "frogs", "hares", "roots", "eggs", "worms", "seeds"],
    )
  )
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  path = write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))
  tok = BPETokenizer.from_gguf(path, 8)
  cfg, params = import_gguf(path, tok.num_special, rng=jax.random.key(1))
  # Random adapters (import leaves B at zero): each role then computes something else.
  base, adapters = lora.split_adapters(params)
  adapters = jax.tree.map(
    lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters
  )
  params = lora.merge_adapters(base, adapters)
  return ClaraModel(cfg, params, tok, doc_max_length=24, compr_rate=4, question_max_length=16)


def _with_adapter_changed(model, name):
  flat = lora.flatten(model.params)
  key = next(p for p in flat if f"/lora_{name}/" in p)
  flat[key] = flat[key] + 1.0
  return ClaraModel(
    model.cfg,
    lora.unflatten(flat),
    model.tok,
    model.doc_max_length,
    model.doc_max_length // model.n_mem,
    model.question_max_length,
  )


def test_the_cache_holds_the_compressors_memories(model, tmp_path):
  record = memory_cache.build_cache(model, DOCS + DOCS[:3], str(tmp_path / "c"))
  assert record["num_docs"] == len(DOCS)
  cache = memory_cache.MemoryCache(str(tmp_path / "c"))
  np.testing.assert_allclose(cache.lookup(DOCS[::-1]), model._compress_texts(DOCS[::-1]), atol=1e-6)
  with pytest.raises(KeyError, match="no memory for the document 'An unseen"):
    cache.lookup(["An unseen document."])
  # Built again for the same inputs: kept.
  assert memory_cache.build_cache(model, DOCS, str(tmp_path / "c")) == record


def test_a_model_reads_cached_memories_and_compresses_the_rest(model, tmp_path):
  memory_cache.build_cache(model, DOCS[:4], str(tmp_path / "c"))
  cached = ClaraModel(
    model.cfg,
    model.params,
    model.tok,
    model.doc_max_length,
    model.doc_max_length // model.n_mem,
    model.question_max_length,
  )
  cached.use_memory_cache(memory_cache.MemoryCache(str(tmp_path / "c")))
  before = cached.timings.compress_ms
  np.testing.assert_allclose(
    cached.compress_documents(DOCS[:4]), model._compress_texts(DOCS[:4]), atol=1e-6
  )
  assert cached.timings.compress_ms == before  # every one from the cache
  np.testing.assert_allclose(
    cached.compress_documents(DOCS[2:]), model._compress_texts(DOCS[2:]), atol=1e-6
  )


def test_another_compressor_is_refused_another_reasoner_is_not(model, tmp_path):
  memory_cache.build_cache(model, DOCS, str(tmp_path / "c"))
  cache = memory_cache.MemoryCache(str(tmp_path / "c"))
  _with_adapter_changed(model, "reasoner").use_memory_cache(cache)
  _with_adapter_changed(model, "generator").use_memory_cache(cache)
  with pytest.raises(memory_cache.StaleMemoryCache, match="another compressor"):
    _with_adapter_changed(model, "compressor").use_memory_cache(cache)
  with pytest.raises(memory_cache.StaleMemoryCache, match="memories of 6 tokens"):
    cache.check(model.params, 3, 24, "a model")
  with pytest.raises(memory_cache.StaleMemoryCache, match="another compressor"):
    memory_cache.build_cache(_with_adapter_changed(model, "compressor"), DOCS, str(tmp_path / "c"))


def test_an_unfinished_cache_is_not_read(model, tmp_path):
  with pytest.raises(FileNotFoundError, match="was not built"):
    memory_cache.MemoryCache(str(tmp_path))


def test_stage2_loss_over_cached_memories_equals_the_loss_over_tokens(model, tmp_path):
  memory_cache.build_cache(model, DOCS, str(tmp_path / "c"))
  cache = memory_cache.MemoryCache(str(tmp_path / "c"))
  feat_cfg = FeatureConfig(
    "stage2",
    n_mem=model.n_mem,
    doc_max_length=24,
    question_max_length=16,
    k=2,
    num_docs=len(DOCS),
    prompt_length=96,
    answer_length=8,
  )
  featurize = Featurizer(model.tok, feat_cfg)
  cached = Featurizer(model.tok, feat_cfg, doc_memories=cache.lookup)
  rows = [
    {
      "question": f"What does the animal {i} eat?",
      "answer": "fish",
      "docs": DOCS[i:] + DOCS[:i],
      "pos_index": [0],
    }
    for i in range(2)
  ]
  stack = lambda f: {k: np.stack([f(r, i)[k] for i, r in enumerate(rows)]) for k in f(rows[0], 0)}
  with_tokens, with_memories = stack(featurize), stack(cached)
  assert "doc_tokens" not in with_memories
  assert with_memories["doc_mem"].shape == (2, len(DOCS), model.n_mem, model.cfg.hidden_size)
  cclara = clara.ClaraConfig(doc_max_length=24, compr_rate=4, k=2)
  loss_fn = stages.stage_loss("stage2", model.cfg, cclara)
  loss_tokens, m_tokens = loss_fn(model.params, with_tokens, None)
  loss_cached, m_cached = loss_fn(model.params, with_memories, None)
  np.testing.assert_allclose(float(loss_cached), float(loss_tokens), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(m_cached["recall@1"]), np.asarray(m_tokens["recall@1"]))


def test_the_cache_serves_stage2_only(model, tmp_path):
  from configs import stage1_2, stage2
  from configs.base import validate

  config = stage2.get_config("model=tiny")
  config.data.memory_cache = str(tmp_path)
  validate(config)
  config.clara.train_compressor = True
  with pytest.raises(ValueError, match="data.memory_cache holds a frozen compressor"):
    validate(config)
  config = stage1_2.get_config("model=tiny")
  config.data.memory_cache = str(tmp_path)
  with pytest.raises(ValueError, match="only stage2 and stage2_retrieval"):
    validate(config)
  with pytest.raises(ValueError, match="not 'stage1'"):
    Featurizer(model.tok, FeatureConfig("stage1"), doc_memories=lambda texts: None)
