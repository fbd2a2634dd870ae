"""The ClaraModel API on an exported (untrained) tiny checkpoint: every entry point runs,
retrieval follows the reasoner's scores, and repeated calls reuse compiled programs."""

import jax
import numpy as np
import pytest
from compile_count import backend_compiles

from clara_jax.data.tokenizer import Tokenizer
from clara_jax.infer import api
from clara_jax.infer.api import ClaraModel
from clara_jax.infer.generate import prefix_cache
from clara_jax.model import clara
from clara_jax.model.config import model_config
from clara_jax.model.decoder import init_params
from clara_jax.weights.export import save_params

WORDS = "red blue green river stone city team coach mayor north south".split()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(WORDS, 10)) for _ in range(200)]
  tok = Tokenizer.train(corpus, vocab_size=300, num_mem_tokens=4)
  cfg = model_config("tiny", base_vocab_size=tok.base_vocab_size, num_extra_tokens=tok.num_special)
  out = str(tmp_path_factory.mktemp("export"))
  save_params(out, cfg, init_params(cfg, jax.random.key(0)))
  tok.save(out + "/tokenizer.model")
  return ClaraModel.load(out, doc_max_length=16, compr_rate=4, question_max_length=8, doc_batch=8)


def test_entry_points(model):
  docs = ["red river city", "blue stone team", "green north coach"]
  mem = model.compress_documents(docs)
  assert mem.shape == (3, 4, model.cfg.hidden_size)
  np.testing.assert_allclose(model.compress_documents(docs[:1]), mem[:1], atol=1e-5)
  para = model.generate_from_paraphrase(docs[:2], max_new_tokens=4)
  assert len(para) == 2 and all(isinstance(p, str) for p in para)
  answers = model.generate_from_documents(
    ["which?", "what?"], [docs[:2], docs[1:]], max_new_tokens=4
  )
  assert len(answers) == 2
  cands = [docs + ["south mayor"], ["south mayor"] + docs]
  answers, chosen = model.generate_from_questions(
    ["red city?", "coach?"], cands, k=2, max_new_tokens=4
  )
  assert chosen.shape == (2, 2) and len(answers) == 2
  doc_mem = model.compress_documents([d for c in cands for d in c]).reshape(2, 4, 4, -1)
  q_mem = model.reason(["red city?", "coach?"])
  scores = np.asarray(clara.score(q_mem, doc_mem))
  np.testing.assert_array_equal(chosen, np.argsort(-scores, -1, kind="stable")[:, :2])
  assert model.timings.compress_ms > 0 and model.timings.decode_ms > 0
  with pytest.raises(ValueError, match="same number of candidates"):
    model.generate_from_questions(["q"], [docs, docs[:2]])


def test_repeated_calls_do_not_recompile(model):
  model.generate_from_documents(["a?"], [["red", "blue"]], max_new_tokens=4)
  with backend_compiles() as compiled:
    model.generate_from_documents(["another question?"], [["green", "stone"]], max_new_tokens=4)
  assert compiled == [], compiled


def test_prompt_heads_are_built_once_and_answer_as_whole_prompts(model, monkeypatch):
  """Answers decoded from the cached prompt head plus each prompt's rest equal those of
  whole prompts (stage1 and stage2 prompts, two batches); each head is built once."""
  docs = ["red river city", "blue stone team", "green north coach", "south mayor"]
  questions = [["red city?", "coach?"], ["which team is blue?", "north?"]]

  def answers():
    out = [model.generate_from_paraphrase(docs[:3], max_new_tokens=6)]
    for qs in questions:
      out.append(model.generate_from_questions(qs, [docs, docs[::-1]], k=2, max_new_tokens=6)[0])
    return out

  built = []

  def counting(params, cfg, head):
    built.append(tuple(np.asarray(head).tolist()))
    return prefix_cache(params, cfg, head)

  monkeypatch.setattr(api, "prefix_cache", counting)
  model.reuse_prefix, model._prefixes = False, {}
  whole = answers()
  assert built == []
  model.reuse_prefix = True
  assert answers() == whole
  assert len(built) == 2 and len(set(built)) == 2  # the paraphrase and the answer head
  assert answers() == whole
  assert len(built) == 2


def test_cut_texts_are_counted_and_logged(model, caplog):
  before = (model.truncations.documents, model.truncations.questions)
  long_doc = " ".join(["red river city"] * 20)  # far past doc_max_length=16 tokens
  with caplog.at_level("WARNING"):
    model.compress_documents(["blue stone", long_doc, long_doc])
    model.reason(["red city?", " ".join(["coach"] * 30) + "?"])
  assert model.truncations.documents == before[0] + 2
  assert model.truncations.questions == before[1] + 1
  text = caplog.text
  assert "2 of 3 documents are longer than 16 tokens" in text
  assert "1 of 2 questions are longer than 8 tokens" in text


def test_lengths_needing_more_memory_tokens_name_the_cause(model, tmp_path):
  out = str(tmp_path / "export")
  save_params(out, model.cfg, model.params)
  model.tok.save(out + "/tokenizer.model")
  # 4 memory tokens in the tokenizer; 64 / 4 needs 16.
  with pytest.raises(
    ValueError,
    match="doc_max_length 64 / compr_rate 4 need 16 memory "
    "tokens, but the export's tokenizer has 4",
  ):
    ClaraModel.load(out, doc_max_length=64, compr_rate=4)


def test_documents_compress_through_the_folded_compressor(tmp_path):
  """Answering and indexing fold the frozen compressor into the base (the stage2 step's
  path): the memories equal the adapter run unfolded, for a non-zero adapter, and a
  bfloat16 load computes the same memories to bf16 precision."""
  from clara_jax.model import lora
  from clara_jax.model.decoder import Decoder

  rng = np.random.default_rng(1)
  tok = Tokenizer.train(
    [" ".join(rng.choice(WORDS, 10)) for _ in range(200)], vocab_size=300, num_mem_tokens=4
  )
  cfg = model_config("tiny", base_vocab_size=tok.base_vocab_size, num_extra_tokens=tok.num_special)
  flat = lora.flatten(init_params(cfg, jax.random.key(0)))
  prefix = lora.lora_prefix(clara.COMPRESSOR)
  for path in [p for p in flat if p.endswith(f"/{prefix}/b")]:
    flat[path] = 0.05 * rng.standard_normal(flat[path].shape).astype(np.float32)
  params = lora.unflatten(flat)
  save_params(str(tmp_path), cfg, params)
  tok.save(str(tmp_path / "tokenizer.model"))
  model = ClaraModel.load(str(tmp_path), doc_max_length=16, compr_rate=4, doc_batch=4)
  docs = ["red river city", "blue stone team", "green north coach", "south mayor", "red"]
  got = model.compress_documents(docs)
  tokens, mask = model._encode_texts(docs, 16, "documents")
  want = clara.memories(Decoder(cfg), params, tokens, mask, 4, clara.COMPRESSOR)
  unadapted = clara.memories(Decoder(cfg), params, tokens, mask, 4, None)
  assert np.abs(np.asarray(want) - np.asarray(unadapted)).max() > 1e-2  # the adapter acts
  np.testing.assert_allclose(got, np.asarray(want), atol=2e-5, rtol=1e-4)
  bf16 = ClaraModel.load(
    str(tmp_path), doc_max_length=16, compr_rate=4, doc_batch=4, dtype="bfloat16"
  )
  assert bf16.cfg.dtype == "bfloat16"
  rel = np.linalg.norm(bf16.compress_documents(docs) - got) / np.linalg.norm(got)
  assert rel < 0.05, rel
