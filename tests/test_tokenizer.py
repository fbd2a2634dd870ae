"""SentencePiece wrapper: training, loading, CLaRa special tokens, round trips, chat format."""

import random

import numpy as np
import pytest

from clara_jax.data.tokenizer import Tokenizer, build_chat_prompt

VOCAB_SIZE = 512
NUM_MEM = 4

_SUBJECTS = [
  "the cat",
  "a retriever",
  "the model",
  "Paris",
  "our compressor",
  "the river",
  "every document",
  "a small dog",
  "the question",
  "Marie Curie",
]
_VERBS = [
  "reads",
  "compresses",
  "answers",
  "finds",
  "summarises",
  "remembers",
  "encodes",
  "ignores",
  "retrieves",
  "visits",
]
_OBJECTS = [
  "the long passage",
  "three memory tokens",
  "a hard question",
  "the capital of France",
  "42 documents",
  "the evidence",
  "an old book",
  "the final answer",
  "café menus",
  "naïve baselines",
]
_TAILS = [".", "?", "!", " in 1999.", " quickly.", ", then stops.", " twice, maybe."]


def _corpus(seed: int = 0, n: int = 300) -> list[str]:
  rng = random.Random(seed)
  return [
    f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}"
    for _ in range(n)
  ]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  return Tokenizer.train(_corpus(), VOCAB_SIZE, NUM_MEM)


def test_train_is_reproducible(tmp_path):
  a = Tokenizer.train(_corpus(), VOCAB_SIZE, NUM_MEM, seed=0)
  b = Tokenizer.train(iter(_corpus()), VOCAB_SIZE, NUM_MEM, seed=0, out_path=tmp_path / "m.model")
  assert a.serialized_model_proto() == b.serialized_model_proto()
  assert (tmp_path / "m.model").read_bytes() == a.serialized_model_proto()
  # A different corpus gives a different model, so the comparison above is meaningful.
  c = Tokenizer.train(_corpus(seed=1, n=200) + ["zebra xylophone quartz"], VOCAB_SIZE, NUM_MEM)
  assert c.serialized_model_proto() != a.serialized_model_proto()


def test_trained_model_layout(tok):
  assert tok.unk_id == 0 and tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 3
  assert 260 < tok.base_vocab_size <= VOCAB_SIZE
  assert tok.id_to_piece(tok.bos_id) == "<s>" and tok.id_to_piece(tok.eos_id) == "</s>"
  pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
  assert pieces[tok.base_vocab_size :] == [
    "<ENC>",
    "<SEP>",
    "<AE>",
    "<MEM0>",
    "<MEM1>",
    "<MEM2>",
    "<MEM3>",
  ]
  with pytest.raises(IndexError):
    tok.id_to_piece(tok.vocab_size)
  with pytest.raises(IndexError):
    tok.decode([tok.vocab_size])


def test_load_saved_file_round_trip(tok, tmp_path):
  path = tmp_path / "sub" / "tok.model"
  tok.save(path)
  loaded = Tokenizer.load(path, num_mem_tokens=NUM_MEM)
  assert loaded.serialized_model_proto() == tok.serialized_model_proto()
  assert loaded.vocab_size == tok.vocab_size
  text = "the cat <MEM1> reads a hard question<SEP>"
  assert loaded.encode(text, add_bos=True) == tok.encode(text, add_bos=True)
  # A checkpoint directory holding tokenizer.model also works.
  tok.save(tmp_path / "ckpt" / "tokenizer.model")
  assert Tokenizer.load(tmp_path / "ckpt", NUM_MEM).encode(text) == tok.encode(text)


def test_special_ids_do_not_depend_on_num_mem_tokens(tok):
  proto = tok.serialized_model_proto()
  base = tok.base_vocab_size
  for n in (0, 1, NUM_MEM, 32):
    t = Tokenizer(proto, n)
    assert (t.enc_id, t.sep_id, t.ae_id) == (base, base + 1, base + 2)
    assert t.mem_ids == list(range(base + 3, base + 3 + n))
    assert t.num_special == 3 + n and t.vocab_size == base + 3 + n
    assert t.special_ids == set(range(base, base + 3 + n))
    assert t.encode("<ENC><SEP><AE>") == [base, base + 1, base + 2]
    if n:
      assert t.encode(t.mem_token(n - 1)) == [base + 2 + n]
      assert t.is_special(t.mem_ids[-1])
    assert not t.is_special(t.eos_id) and not t.is_special(base + 3 + n)
  with pytest.raises(IndexError):
    tok.mem_token(NUM_MEM)
  with pytest.raises(ValueError):
    Tokenizer(proto, -1)


ROUND_TRIP_TEXTS = [
  "",
  "the cat reads the long passage.",
  " leading space",
  "trailing space ",
  "  two  spaces   three   ",
  "line one\nline two\n\n\ttabbed",
  "digits 1234567890 and 3.14",
  "Ünïcödé: Größe, 東京, Ελληνικά, עברית",
  "emoji 🙂🚀 and 👩‍👩‍👧 family",
  "<not special> <MEM> <mem0> <MEM01>",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_plain(tok, text):
  ids = tok.encode(text)
  assert not any(tok.is_special(i) for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_unseen_characters_use_byte_fallback(tok):
  ids = tok.encode("🚀")
  assert tok.unk_id not in ids
  assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)


SPECIAL_TEXTS = [
  "the cat <MEM0> reads",
  "<ENC>every document compresses the evidence<SEP> what?",
  "a<MEM1><MEM2>b",
  "  <AE>  ",
  "<MEM3>",
  "question: 東京 🙂 <SEP>\n<MEM0><MEM1><MEM2><MEM3> answer:",
  "<MEM99> is out of range, <MEM2> is not",
]


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_round_trip_with_specials(tok, text):
  ids = tok.encode(text)
  assert any(tok.is_special(i) for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_special_tokens_add_no_spurious_space_pieces(tok):
  m0 = tok.mem_ids[0]
  ids = tok.encode("the cat <MEM0> reads")
  after = ids[ids.index(m0) + 1 :]
  # " reads" after a special must tokenize like "reads" at text start (one "▁", not two).
  assert after == tok.encode("reads")
  ids = tok.encode("<ENC>reads")
  assert ids[0] == tok.enc_id
  assert not tok.id_to_piece(ids[1]).startswith("▁")
  assert tok.decode(ids[1:]) == "reads"


def test_out_of_range_mem_and_parse_special_off(tok):
  ids = tok.encode("x <MEM99> y")
  assert not any(tok.is_special(i) for i in ids)
  ids = tok.encode("x <MEM0> <SEP>", parse_special=False)
  assert not any(tok.is_special(i) for i in ids)
  assert tok.decode(ids) == "x <MEM0> <SEP>"


def test_decode_skip_special(tok):
  ids = tok.encode("the cat <MEM0> reads<SEP>", add_bos=True, add_eos=True)
  assert tok.decode(ids, skip_special=True) == "the cat  reads"
  assert tok.decode(np.asarray(ids)) == "the cat <MEM0> reads<SEP>"


def test_batch_encode_decode(tok):
  texts = ["the cat reads.", "<ENC>a small dog<MEM0><MEM1>", "", "東京 🙂"]
  batch = tok.encode_batch(texts, add_bos=True)
  assert batch == [tok.encode(t, add_bos=True) for t in texts]
  assert all(ids[0] == tok.bos_id for ids in batch)
  assert tok.decode_batch(batch) == texts
  assert tok.decode_batch(batch, skip_special=True)[1] == "a small dog"


def test_build_chat_prompt():
  assert build_chat_prompt("What is 2+2?") == "[INST] What is 2+2? [/INST]"
  assert build_chat_prompt("Q?", system="Be brief.") == "[INST] Be brief.\n\nQ? [/INST]"
  assert build_chat_prompt("Q?", system="") == "[INST] Q? [/INST]"
  assert build_chat_prompt("Q?", "Be brief.", "chatml") == (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
    "<|im_start|>assistant\n"
  )
  assert build_chat_prompt("Q?", "", "chatml") == (
    "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
  )
  with pytest.raises(ValueError, match="unknown chat format 'llama3'"):
    build_chat_prompt("Q?", None, "llama3")


def test_encode_chat_answer_mask(tok):
  user = "Background: <MEM0><MEM1><MEM2><MEM3>\nQuestion: what is the capital of France?"
  answer = "Paris, 東京 🙂"
  ids, mask = tok.encode_chat(user, system="Answer briefly.", answer=answer)
  prompt_ids = tok.encode(build_chat_prompt(user, "Answer briefly."), add_bos=True)
  answer_ids = tok.encode(answer)

  assert len(ids) == len(mask)
  assert ids == prompt_ids + answer_ids + [tok.eos_id]
  assert ids[0] == tok.bos_id
  assert sum(mask) == len(answer_ids) + 1
  assert mask == [0] * len(prompt_ids) + [1] * (len(answer_ids) + 1)
  supervised = [i for i, m in zip(ids, mask) if m]
  assert supervised[-1] == tok.eos_id
  assert tok.decode(supervised) == answer
  assert all(not m for i, m in zip(ids, mask) if tok.is_special(i))
  assert tok.decode(ids) == f"[INST] Answer briefly.\n\n{user} [/INST] {answer}"

  ids, mask = tok.encode_chat(user)
  assert ids == tok.encode(f"[INST] {user} [/INST]", add_bos=True)
  assert mask == [0] * len(ids) and tok.eos_id not in ids


def test_missing_file_error_names_path(tmp_path):
  path = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model") as e:
    Tokenizer.load(path, NUM_MEM)
  assert str(path) in str(e.value)


@pytest.mark.parametrize(
  "content", [b"this is not a sentencepiece model\n", b"", bytes(range(256)) * 4]
)
def test_not_a_model_error_names_path(tmp_path, content):
  path = tmp_path / "bad.model"
  path.write_bytes(content)
  with pytest.raises(ValueError) as e:
    Tokenizer.load(path, NUM_MEM)
  assert str(path) in str(e.value)


def test_training_errors_are_value_errors():
  with pytest.raises(ValueError, match="training failed"):
    Tokenizer.train([], VOCAB_SIZE, NUM_MEM)
  with pytest.raises(ValueError, match="training failed"):
    Tokenizer.train(_corpus(), 100, NUM_MEM)  # smaller than the 256 byte pieces
