"""The Hugging Face `tokenizers` backend behind the same interface as SentencePiece: a
byte-level BPE from tokenizer.json (+ tokenizer_config.json) or from a GGUF's metadata,
with CLaRa's tokens after its vocabulary; round trips, special tokens, save and load."""

import json
import os

import numpy as np
import pytest

from clara_jax.data.tokenizer import BPETokenizer, Tokenizer, load_tokenizer, mem_token

tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")

CORPUS = [
  "the river stone city",
  "Ivory Lee Brown played for the Marsh Hawks in 1998.",
  "Who coached the team? The mayor did.",
  "naïve café, 北京 and emoji 🙂",
] * 20


def _backend():
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<|endoftext|>", "<|im_start|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tk.train_from_iterator(CORPUS, trainer)
  return tk


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A Hugging Face style directory: tokenizer.json + tokenizer_config.json."""
  directory = tmp_path_factory.mktemp("bpe")
  _backend().save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(
    json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"}})
  )
  return str(directory)


def test_ids_after_the_base_vocabulary_and_round_trips(hf_dir):
  tok = load_tokenizer(hf_dir, num_mem_tokens=4)
  assert isinstance(tok, BPETokenizer)
  base = tok.base_vocab_size
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 0, 0)
  assert tok.enc_id == base and tok.mem_ids == [base + 3 + i for i in range(4)]
  assert tok.vocab_size == base + 7
  for text in CORPUS[:4] + ["  two  spaces\n\nand a tab\t.", ""]:
    assert tok.decode(tok.encode(text)) == text
  # CLaRa tokens become their ids wherever they fall, and the text around them encodes
  # as it does alone (byte-level BPE has no dummy prefix).
  text = f"<ENC> river{mem_token(0)}{mem_token(3)} stone <SEP>"
  ids = tok.encode(text)
  assert ids[0] == tok.enc_id and ids[-1] == tok.sep_id
  assert tok.encode(" river") == ids[1 : 1 + len(tok.encode(" river"))]
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special=True) == " river stone "
  assert tok.encode("<MEM9>") == tok.encode("<MEM9>", parse_special=False)  # out of range
  assert tok.mem_ids[0] not in tok.encode(mem_token(0), parse_special=False)
  ids, mask = tok.encode_chat("Who?", answer="The mayor.")
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and sum(mask) > 1
  assert tok.id_to_piece(tok.mem_ids[1]) == "<MEM1>"
  with pytest.raises(IndexError):
    tok.decode([tok.vocab_size])


def test_save_and_load_give_the_same_tokenizer(hf_dir, tmp_path):
  tok = load_tokenizer(hf_dir, 2)
  tok.save(str(tmp_path / "export" / BPETokenizer.FILENAME))
  again = load_tokenizer(str(tmp_path / "export"), 2)
  assert (again.bos_id, again.eos_id, again.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)
  for text in CORPUS[:4]:
    assert again.encode(text, add_bos=True) == tok.encode(text, add_bos=True)


def test_a_gguf_tokenizer_equals_the_tokenizer_it_came_from(hf_dir, tmp_path):
  tok = load_tokenizer(hf_dir, 2)
  backend = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
  model = json.loads(backend.to_str())["model"]
  tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  path = str(tmp_path / "tok.gguf")
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_merges(merges)
  writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(0)
  writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  from_gguf = BPETokenizer.from_gguf(path, 2)
  assert from_gguf.vocab_size == tok.vocab_size and from_gguf.bos_id == 1
  for text in CORPUS[:4] + ["<|im_start|>user\nWho?<|endoftext|>"]:
    assert from_gguf.encode(text) == tok.encode(text), text


def test_the_loader_picks_the_backend_and_names_what_is_missing(hf_dir, tmp_path):
  sp = Tokenizer.train(CORPUS, vocab_size=300, num_mem_tokens=1)
  sp.save(str(tmp_path / "sp" / "tokenizer.model"))
  assert isinstance(load_tokenizer(str(tmp_path / "sp"), 1), Tokenizer)
  assert isinstance(load_tokenizer(os.path.join(hf_dir, "tokenizer.json"), 1), BPETokenizer)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="holds neither tokenizer.model nor tokenizer.json"):
    load_tokenizer(str(tmp_path / "empty"), 1)
  (tmp_path / "nobos").mkdir()
  _backend().save(str(tmp_path / "nobos" / "tokenizer.json"))
  with pytest.raises(ValueError, match="needs bos_token and eos_token"):
    load_tokenizer(str(tmp_path / "nobos"), 1)


def test_an_export_with_a_bpe_tokenizer_serves_the_inference_api(hf_dir, tmp_path):
  import jax

  from clara_jax.infer.api import ClaraModel
  from clara_jax.model.config import model_config
  from clara_jax.model.decoder import init_params
  from clara_jax.weights.export import save_params

  tok = load_tokenizer(hf_dir, num_mem_tokens=4)
  cfg = model_config("tiny", base_vocab_size=tok.base_vocab_size, num_extra_tokens=tok.num_special)
  out = str(tmp_path / "export")
  save_params(out, cfg, init_params(cfg, jax.random.key(0)))
  tok.save(os.path.join(out, tok.FILENAME))
  model = ClaraModel.load(out, doc_max_length=16, compr_rate=4, question_max_length=8, doc_batch=2)
  assert isinstance(model.tok, BPETokenizer)
  assert model.compress_documents(["the river stone", "the mayor"]).shape == (2, 4, 64)
  answers = model.generate_from_documents(["Who?"], [["the river stone"]], max_new_tokens=3)
  assert len(answers) == 1 and isinstance(answers[0], str)


def test_import_hf_writes_the_checkpoints_tokenizer(hf_dir, tmp_path, capsys):
  """A Hugging Face checkpoint with tokenizer.json: `import-hf` writes it into the export,
  where `load_tokenizer` finds it; with fewer than 3 extra tokens it writes none."""
  import shutil

  transformers = pytest.importorskip("transformers")
  from hf_fixtures import tiny_sizes

  base = load_tokenizer(hf_dir, 0).base_vocab_size
  ckpt = tmp_path / "hf"
  sizes = tiny_sizes(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=base, **sizes))
  model.save_pretrained(ckpt)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(hf_dir, name), ckpt / name)
  out = str(tmp_path / "export")
  assert _import_hf(ckpt, out, 5, "--param_dtype", "float32") == 0
  assert "BPETokenizer" in capsys.readouterr().out
  tok = load_tokenizer(out, 2)
  assert tok.vocab_size == base + 5 and tok.encode(CORPUS[1]) == load_tokenizer(hf_dir, 2).encode(
    CORPUS[1]
  )
  assert _import_hf(ckpt, str(tmp_path / "bare"), 0) == 0
  assert not os.path.exists(tmp_path / "bare" / "tokenizer.json")


def _import_hf(ckpt, out: str, num_extra_tokens: int, *flags: str) -> int:
  """`clara-jax import-hf` of `ckpt` into `out`."""
  from clara_jax import cli

  args = ["import-hf", "--hf_dir", str(ckpt), "--out", out]
  return cli.main(args + ["--num_extra_tokens", str(num_extra_tokens), *flags])


def test_chatml_models_get_chatml_prompts_without_an_extra_bos(tmp_path):
  """A vocabulary with ChatML's turn tokens (SmolLM2, Qwen) prompts in ChatML; its turns
  open with <|im_start|>, so no bos goes before them. Others keep the Mistral layout."""
  from gguf_fixtures import write_tiny_gguf

  chatml = BPETokenizer.from_gguf(write_tiny_gguf(str(tmp_path / "t.gguf")), 2)
  assert chatml.chat_format == "chatml"
  ids = chatml.encode_prompt(f"Q? {mem_token(0)}{mem_token(1)}", "Be brief.")
  assert chatml.decode(ids) == (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    "Q? <MEM0><MEM1><|im_end|>\n<|im_start|>assistant\n"
  )
  assert ids.count(chatml.bos_id) == 3 and ids[0] == chatml.bos_id  # one per turn
  assert chatml.mem_ids[0] in ids and chatml.mem_ids[1] in ids
  ids, mask = chatml.encode_chat("Q?", answer="A.")
  assert ids[-1] == chatml.eos_id and sum(mask) == len(chatml.encode("A.")) + 1
  plain = BPETokenizer(_backend(), 2, bos_id=0, eos_id=0)  # no <|im_end|>
  assert plain.chat_format == "inst"
  assert plain.decode(plain.encode_prompt("Q?")) == "<|endoftext|>[INST] Q? [/INST]"


def test_the_lens_reads_byte_level_pieces(tmp_path):
  """Byte-level BPE marks a leading space with "Ġ": the lens's word of " river" is
  "river", as SentencePiece's "▁river" is."""
  from clara_jax.eval import lens

  tok = BPETokenizer(_backend(), 2, bos_id=0, eos_id=0)
  river = tok.encode(" river", parse_special=False)
  assert len(river) == 1 and tok.id_to_piece(river[0]) == "\u0120river"
  assert lens.token_word(tok, river[0]) == "river"
  assert lens.words("the river stone") == {"river", "stone"}
  assert {
    lens.token_word(tok, i)
    for i in lens.content_pieces(tok, tok.encode("the river stone city", parse_special=False))
  } == {"river", "stone", "city"}
