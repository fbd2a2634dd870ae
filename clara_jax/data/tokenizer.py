"""Tokenizers with the CLaRa special tokens appended after their vocabulary: SentencePiece
(`Tokenizer`) and Hugging Face `tokenizers` BPE (`BPETokenizer`, from tokenizer.json or a
GGUF file), behind one interface (`ClaraTokenizer`; `load_tokenizer` picks the backend).

Id layout, for a base model of `base_vocab_size` pieces and n memory tokens:

  [0, base_vocab_size)        the base pieces (Mistral: unk=0, bos=1, eos=2)
  base_vocab_size + 0         <ENC>  (marks a document to compress)
  base_vocab_size + 1         <SEP>
  base_vocab_size + 2         <AE>   (auto-encoding / reconstruction instruction)
  base_vocab_size + 3 + i     <MEM{i}>, i in [0, n)

The fixed tokens come first so their ids do not move when the number of memory tokens
changes. None of them is added to the SentencePiece model itself: a stock Mistral
`tokenizer.model` is used unchanged, and the wrapper splits text on the special strings,
encoding only the plain segments with SentencePiece.

Leading-space handling. SentencePiece (with `add_dummy_prefix`, as in Mistral/Llama)
prepends a "▁" to every string it encodes and strips one leading "▁" when decoding. Applied
to every segment between special tokens, that would turn "a <MEM0> b" into
"▁a ▁" <MEM0> "▁▁b" and make the encoding depend on where specials fall. So only a plain
segment at the very start of the text gets the dummy prefix; segments that follow a special
token are encoded by a second processor built from the same model with `add_dummy_prefix`
off (the same policy as Hugging Face's non-legacy Llama tokenizer). Decoding mirrors this:
the run of ordinary ids before the first special token is decoded with prefix stripping,
later runs without. Spaces around special tokens belong to the neighbouring plain text and
are kept verbatim, so `decode(encode(s)) == s` for any text when the model uses byte
fallback, does not normalise text, and keeps extra whitespace (true for Mistral's model and
for models made by `Tokenizer.train`).
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Iterable, Sequence

import sentencepiece as spm
from etils import epath
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2

from clara_jax import paths

ENC_TOKEN = "<ENC>"
SEP_TOKEN = "<SEP>"
AE_TOKEN = "<AE>"
FIXED_SPECIAL_TOKENS: tuple[str, ...] = (ENC_TOKEN, SEP_TOKEN, AE_TOKEN)
NUM_FIXED_SPECIAL = len(FIXED_SPECIAL_TOKENS)


def num_special_tokens(num_mem_tokens: int) -> int:
  """Rows a model adds after the base vocabulary for `num_mem_tokens` memory tokens."""
  return NUM_FIXED_SPECIAL + num_mem_tokens


def mem_id(base_vocab_size: int, i: int) -> int:
  """The id of <MEM{i}> after a base vocabulary of `base_vocab_size` pieces."""
  return base_vocab_size + NUM_FIXED_SPECIAL + i


# Matches every string that could be a special token; those naming a memory token out of
# range (or spelt with leading zeros) are not in the lookup table and stay plain text.
_SPECIAL_CANDIDATE_RE = re.compile(r"<(?:ENC|SEP|AE|MEM\d+)>")

# The file name Hugging Face checkpoints (e.g. mistralai/Mistral-7B-Instruct) use.
_DEFAULT_MODEL_FILENAME = "tokenizer.model"


def mem_token(i: int) -> str:
  """The string of the i-th memory token, e.g. `<MEM3>`."""
  return f"<MEM{i}>"


# Prompt layouts of one user turn: "inst" is Mistral-Instruct's, "chatml" the
# <|im_start|>role ... <|im_end|> turns of SmolLM2, Qwen and others.
CHAT_FORMATS = ("inst", "chatml")


def build_chat_prompt(user: str, system: str | None = None, chat_format: str = "inst") -> str:
  """The prompt text of one user turn, up to where the answer starts, without bos.

  "inst": Mistral-Instruct has no system role, so a system text is merged into the user
  turn as "{system}\n\n{user}" (what its Hugging Face chat template does):
  "[INST] {content} [/INST]". "chatml": "<|im_start|>system\n{system}<|im_end|>\n"
  (when there is a system text), "<|im_start|>user\n{user}<|im_end|>\n", then
  "<|im_start|>assistant\n". An empty system text counts as none.
  """
  if chat_format == "chatml":
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
  if chat_format != "inst":
    raise ValueError(f"unknown chat format {chat_format!r}; known: {CHAT_FORMATS}")
  content = f"{system}\n\n{user}" if system else user
  return f"[INST] {content} [/INST]"


# sentencepiece_model_pb2 is generated protobuf code without stubs: mypy sees no ModelProto.
def _load_model_proto(proto: bytes, source: str) -> sentencepiece_model_pb2.ModelProto:  # type: ignore[name-defined]
  """Parses and sanity-checks a serialized SentencePiece ModelProto.

  SentencePieceProcessor accepts an empty proto without complaint (and then returns 0 for
  everything), so the pieces are checked here before a processor is built.
  """
  model = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # protobuf, no stubs
  try:
    model.ParseFromString(proto)
  except DecodeError as e:
    raise ValueError(f"{source} is not a SentencePiece model: {e}") from e
  if not model.pieces:
    raise ValueError(f"{source} is not a SentencePiece model: it has no pieces")
  return model


class ClaraTokenizer:
  """A base vocabulary plus the CLaRa special tokens after it (see the module docstring):
  what every part of clara_jax uses. Backends: `Tokenizer` (SentencePiece) and
  `BPETokenizer` (Hugging Face `tokenizers`: tokenizer.json or a GGUF's metadata). A
  backend sets `_base`, `_num_mem_tokens` (through `_init_specials`) and the base ids,
  and encodes and decodes plain text (`_encode_plain`, `_decode_plain`)."""

  FILENAME = ""  # what `save` writes inside an export directory

  def _init_specials(self, base: int, num_mem_tokens: int) -> None:
    if (
      isinstance(num_mem_tokens, bool) or not isinstance(num_mem_tokens, int) or num_mem_tokens < 0
    ):
      raise ValueError(f"num_mem_tokens must be a non-negative int, got {num_mem_tokens!r}")
    self._base = base
    self._num_mem_tokens = num_mem_tokens
    self._special_strings: tuple[str, ...] = FIXED_SPECIAL_TOKENS + tuple(
      mem_token(i) for i in range(num_mem_tokens)
    )
    self._special_to_id: dict[str, int] = {
      s: self._base + k for k, s in enumerate(self._special_strings)
    }

  def _encode_plain(self, text: str, at_start: bool) -> list[int]:
    """Base ids of text without CLaRa tokens; `at_start`: nothing precedes it."""
    raise NotImplementedError

  def _decode_plain(self, ids: list[int], at_start: bool) -> str:
    raise NotImplementedError

  def _base_piece(self, token_id: int) -> str:
    raise NotImplementedError

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the backend's model file(s) (`FILENAME`) to path, all or nothing."""
    raise NotImplementedError

  # --- base ids: every backend defines them -------------------------------------------------

  @property
  def unk_id(self) -> int:
    raise NotImplementedError

  @property
  def bos_id(self) -> int:
    raise NotImplementedError

  @property
  def eos_id(self) -> int:
    raise NotImplementedError

  @property
  def pad_id(self) -> int:
    raise NotImplementedError

  # --- vocabulary ---------------------------------------------------------------------------

  @property
  def base_vocab_size(self) -> int:
    """Number of SentencePiece pieces; the first special id."""
    return self._base

  @property
  def num_mem_tokens(self) -> int:
    return self._num_mem_tokens

  @property
  def num_special(self) -> int:
    """Number of CLaRa special tokens: 3 fixed plus the memory tokens."""
    return len(self._special_strings)

  @property
  def vocab_size(self) -> int:
    """Total number of ids: base vocabulary plus special tokens."""
    return self._base + self.num_special

  @property
  def enc_id(self) -> int:
    return self._base

  @property
  def sep_id(self) -> int:
    return self._base + 1

  @property
  def ae_id(self) -> int:
    return self._base + 2

  @property
  def mem_ids(self) -> list[int]:
    """Ids of <MEM0> .. <MEM{n-1}>, in order."""
    first = self._base + len(FIXED_SPECIAL_TOKENS)
    return list(range(first, first + self._num_mem_tokens))

  @property
  def special_ids(self) -> frozenset[int]:
    """Ids of all CLaRa special tokens."""
    return frozenset(range(self._base, self.vocab_size))

  @property
  def special_tokens(self) -> dict[str, int]:
    """Special token string -> id."""
    return dict(self._special_to_id)

  def mem_token(self, i: int) -> str:
    """The string of the i-th memory token, checked against num_mem_tokens."""
    if not 0 <= i < self._num_mem_tokens:
      raise IndexError(f"memory token {i} out of range [0, {self._num_mem_tokens})")
    return mem_token(i)

  def is_special(self, token_id: int) -> bool:
    """Whether token_id is a CLaRa special token (not a SentencePiece control piece)."""
    return self._base <= int(token_id) < self.vocab_size

  def id_to_piece(self, token_id: int) -> str:
    """The piece string of any id: SentencePiece's piece, or the special token's string."""
    token_id = self._check_id(token_id)
    if token_id < self._base:
      return self._base_piece(token_id)
    return self._special_strings[token_id - self._base]

  def _check_id(self, token_id: int) -> int:
    token_id = int(token_id)
    if not 0 <= token_id < self.vocab_size:
      raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")
    return token_id

  # --- encoding / decoding ------------------------------------------------------------------

  def _split_special(self, text: str) -> list[str | int]:
    """Splits text into plain segments (str, non-empty) and special token ids (int)."""
    parts: list[str | int] = []
    plain_start = 0
    for match in _SPECIAL_CANDIDATE_RE.finditer(text):
      token_id = self._special_to_id.get(match.group())
      if token_id is None:
        continue  # e.g. <MEM99> with fewer memory tokens: plain text
      if match.start() > plain_start:
        parts.append(text[plain_start : match.start()])
      parts.append(token_id)
      plain_start = match.end()
    if plain_start < len(text):
      parts.append(text[plain_start:])
    return parts

  def encode(
    self, text: str, add_bos: bool = False, add_eos: bool = False, *, parse_special: bool = True
  ) -> list[int]:
    """Encodes text to ids; special token strings in it become their ids.

    Args:
      text: the text.
      add_bos: prepend the bos id.
      add_eos: append the eos id.
      parse_special: if False, special token strings are encoded as plain text (for
        untrusted text such as retrieved documents that might contain "<SEP>").
    """
    ids: list[int] = [self.bos_id] if add_bos else []
    parts: list[str | int] = self._split_special(text) if parse_special else [text]
    for k, part in enumerate(parts):
      if isinstance(part, int):
        ids.append(part)
      elif part:
        ids.extend(self._encode_plain(part, at_start=k == 0))
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def encode_batch(
    self,
    texts: Sequence[str],
    add_bos: bool = False,
    add_eos: bool = False,
    *,
    parse_special: bool = True,
  ) -> list[list[int]]:
    """`encode` on each text (no padding)."""
    return [self.encode(t, add_bos, add_eos, parse_special=parse_special) for t in texts]

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    """Decodes ids (any iterable of ints, e.g. a 1-D numpy array) to text.

    bos/eos/pad are SentencePiece control pieces and decode to "", except that a model
    without a pad piece (Mistral) pads with unk, which decodes to " ⁇ ": strip padding first.

    Args:
      ids: token ids, each in [0, vocab_size).
      skip_special: drop the CLaRa special tokens instead of writing their strings.

    Raises:
      IndexError: an id is out of range.
    """
    out: list[str] = []
    run: list[int] = []
    seen_special = False

    def flush() -> None:
      if run:
        out.append(self._decode_plain(list(run), at_start=not seen_special))
        run.clear()

    for token_id in ids:
      token_id = self._check_id(token_id)
      if token_id < self._base:
        run.append(token_id)
        continue
      flush()
      seen_special = True
      if not skip_special:
        out.append(self._special_strings[token_id - self._base])
    flush()
    return "".join(out)

  def decode_batch(self, batch: Iterable[Iterable[int]], skip_special: bool = False) -> list[str]:
    """`decode` on each sequence (rows of a 2-D array work too)."""
    return [self.decode(ids, skip_special) for ids in batch]

  @property
  def chat_format(self) -> str:
    """The prompt layout (`CHAT_FORMATS`) of the base model this tokenizer belongs to."""
    return "inst"

  def encode_prompt(self, user: str, system: str | None = None) -> list[int]:
    """The ids of a generator prompt in this tokenizer's chat format, up to where the
    answer starts: bos first for "inst" (ChatML turns open with their own control
    token). Special token strings in the text (<MEM0> slots) become their ids."""
    return self.encode(
      build_chat_prompt(user, system, self.chat_format), add_bos=self.chat_format == "inst"
    )

  def encode_chat(
    self,
    user: str,
    system: str | None = None,
    answer: str | None = None,
  ) -> tuple[list[int], list[int]]:
    """Encodes a chat turn: the prompt (`encode_prompt`), then the answer.

    The answer is encoded on its own (so it starts with SentencePiece's "▁" dummy prefix,
    as in Mistral's reference tokenizer), followed by eos. Special token strings in
    `user`/`system` (e.g. <MEM0> placeholders) become their ids.

    Returns:
      (ids, answer_mask): answer_mask[i] is 1 exactly on the answer tokens and the final
      eos (the supervised positions), 0 elsewhere; all 0 when no answer is given.
    """
    ids = self.encode_prompt(user, system)
    mask = [0] * len(ids)
    if answer is not None:
      answer_ids = self.encode(answer, add_eos=True)
      ids += answer_ids
      mask += [1] * len(answer_ids)
    return ids, mask

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}(base_vocab_size={self._base}, "
      f"num_mem_tokens={self._num_mem_tokens}, "
      f"vocab_size={self.vocab_size})"
    )


# SentencePiece trainer settings of `Tokenizer.train`: Mistral's choices (byte fallback,
# identity normalisation, whitespace kept, digits split), ids unk=0 bos=1 eos=2 pad=3,
# and a deterministic run (one thread, every sentence in order).
_TRAINER_SETTINGS: dict[str, Any] = dict(
  hard_vocab_limit=False,
  character_coverage=1.0,
  byte_fallback=True,
  unk_id=0,
  bos_id=1,
  eos_id=2,
  pad_id=3,
  normalization_rule_name="identity",
  remove_extra_whitespaces=False,
  split_digits=True,
  allow_whitespace_only_pieces=True,
  num_threads=1,
  input_sentence_size=0,
  shuffle_input_sentence=False,
  minloglevel=2,  # the trainer otherwise logs every step to stderr
)


class Tokenizer(ClaraTokenizer):
  """SentencePiece tokenizer plus the CLaRa special tokens (see the module docstring).

  Build one with `Tokenizer.load` (an existing `.model` file), `Tokenizer.train` (a small
  model trained from text, for tests and toy runs) or the constructor (serialized proto).

  "Special" below always means the CLaRa tokens appended after the SentencePiece
  vocabulary (<ENC>, <SEP>, <AE>, <MEM*>); SentencePiece's own control pieces (bos, eos,
  pad) are ordinary base ids, which SentencePiece decodes to the empty string.
  """

  FILENAME = _DEFAULT_MODEL_FILENAME

  def __init__(self, model_proto: bytes, num_mem_tokens: int, *, source: str = "model proto"):
    """Wraps a serialized SentencePiece model.

    Args:
      model_proto: the bytes of a `.model` file.
      num_mem_tokens: how many <MEM{i}> tokens to append after <ENC>, <SEP>, <AE>.
      source: how to name the model in error messages (e.g. its file path).

    Raises:
      ValueError: num_mem_tokens is negative or model_proto is not a SentencePiece model.
    """
    model = _load_model_proto(model_proto, source)
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
      # Encodes/decodes text that follows a special token: no "▁" dummy prefix.
      model.normalizer_spec.add_dummy_prefix = False
      self._sp_inner = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    except RuntimeError as e:
      raise ValueError(f"{source} is not a usable SentencePiece model: {e}") from e
    self._proto = bytes(model_proto)
    self._init_specials(self._sp.get_piece_size(), num_mem_tokens)

  # --- construction -----------------------------------------------------------------------

  @classmethod
  def load(cls, path: str | os.PathLike[str], num_mem_tokens: int) -> Tokenizer:
    """Loads a SentencePiece `.model` file (e.g. Mistral's `tokenizer.model`).

    A directory is accepted when it holds a `tokenizer.model` (a Hugging Face checkpoint).

    Raises:
      FileNotFoundError: the file (or the directory's tokenizer.model) does not exist.
      ValueError: the file is not a SentencePiece model.
    """
    path = os.fspath(path)
    if paths.isdir(path):
      path = paths.join(path, _DEFAULT_MODEL_FILENAME, absolute=False)
    if not paths.isfile(path):
      raise FileNotFoundError(f"SentencePiece model file not found: {path}")
    return cls(paths.read_bytes(path), num_mem_tokens, source=path)

  @classmethod
  def train(
    cls,
    texts: Iterable[str],
    vocab_size: int,
    num_mem_tokens: int,
    *,
    model_type: str = "bpe",
    seed: int = 0,
    out_path: str | os.PathLike[str] | None = None,
    user_symbols: Sequence[str] = (),
  ) -> Tokenizer:
    """Trains a SentencePiece model in memory, reproducibly.

    The settings mirror Mistral's tokenizer (byte fallback, identity normalisation, extra
    whitespace kept, digits split) so that every text round-trips, with unk=0, bos=1, eos=2
    and, unlike Mistral, pad=3. Training is deterministic: one thread, every sentence used
    in order (no sampling or shuffling), and SentencePiece's global random seed set to
    `seed` (SentencePiece 0.2.3 has no per-trainer seed option). Training the same texts
    with the same arguments gives a byte-identical model proto.

    Args:
      texts: training sentences; each is one SentencePiece "sentence" (texts longer than
        SentencePiece's max_sentence_length, 4192 bytes, are skipped by the trainer).
      vocab_size: the SentencePiece vocabulary size, an upper bound
        (hard_vocab_limit=False, so a tiny corpus gives a smaller vocabulary). It must
        cover the 256 byte pieces, the 4 control pieces and every distinct character.
        The special tokens come on top of it.
      num_mem_tokens: number of memory tokens, as in the constructor.
      model_type: "bpe", "unigram", "char" or "word".
      seed: SentencePiece's random seed. Note that it is process-global.
      out_path: if given, the `.model` file is also written there.
      user_symbols: pieces kept whole wherever they occur (SentencePiece
        user_defined_symbols; "\u2581" stands for a preceding space).

    Raises:
      ValueError: SentencePiece refused the input or settings (no text, vocabulary too
        small, unknown model type).
    """
    model_writer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
      spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model_writer,
        vocab_size=vocab_size,
        model_type=model_type,
        user_defined_symbols=list(user_symbols),
        **_TRAINER_SETTINGS,
      )
    except RuntimeError as e:
      raise ValueError(f"SentencePiece training failed: {e}") from e
    tokenizer = cls(model_writer.getvalue(), num_mem_tokens, source="trained model")
    if out_path is not None:
      tokenizer.save(out_path)
    return tokenizer

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the SentencePiece `.model` file (the special tokens are not part of it), all
    or nothing."""
    paths.write_atomic(path, [self._proto])

  def serialized_model_proto(self) -> bytes:
    """The SentencePiece model as the bytes of a `.model` file."""
    return self._proto

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    """SentencePiece's pad id if the model defines one, else the unk id (Mistral has none)."""
    pad = self._sp.pad_id()
    return pad if pad >= 0 else self._sp.unk_id()

  def _encode_plain(self, text: str, at_start: bool) -> list[int]:
    # Only text at the very start gets SentencePiece's dummy "▁" prefix.
    return (self._sp if at_start else self._sp_inner).encode(text)

  def _decode_plain(self, ids: list[int], at_start: bool) -> str:
    # Mirrors `encode`: only the run before any special token had the dummy prefix.
    return (self._sp if at_start else self._sp_inner).decode(ids)

  def _base_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(token_id)


class BPETokenizer(ClaraTokenizer):
  """A Hugging Face `tokenizers` model (the byte-level BPE of GPT-2, SmolLM2, Llama 3,
  Qwen...) plus the CLaRa tokens after its vocabulary.

  Made from a `tokenizer.json` (`load`; bos/eos/unk/pad from the `tokenizer_config.json`
  beside it, as Hugging Face checkpoints keep them) or from a GGUF file's metadata
  (`from_gguf`). `save` writes both files. Byte-level BPE needs no dummy-prefix handling:
  text between CLaRa tokens encodes the same wherever it falls. The model's own control
  tokens (e.g. `<|im_start|>`) are base ids, matched in text as Hugging Face matches them.
  """

  FILENAME = "tokenizer.json"
  CONFIG_FILENAME = "tokenizer_config.json"
  _ROLES = ("bos", "eos", "unk", "pad")

  def __init__(
    self,
    backend: Any,
    num_mem_tokens: int,
    *,
    bos_id: int,
    eos_id: int,
    unk_id: int | None = None,
    pad_id: int | None = None,
    source: str = "tokenizers model",
  ) -> None:
    self._tk = backend
    base = backend.get_vocab_size(with_added_tokens=True)
    for role, value in (("bos", bos_id), ("eos", eos_id), ("unk", unk_id), ("pad", pad_id)):
      if value is not None and not 0 <= value < base:
        raise ValueError(f"{source}: {role} id {value} is outside the vocabulary of {base}")
    self._ids: dict[str, int | None] = {"bos": bos_id, "eos": eos_id, "unk": unk_id, "pad": pad_id}
    self._bos_id = bos_id
    self._eos_id = eos_id
    self._source = source
    self._init_specials(base, num_mem_tokens)

  @classmethod
  def load(cls, path: str | os.PathLike[str], num_mem_tokens: int) -> BPETokenizer:
    """A `tokenizer.json` file, or a directory holding one (and its tokenizer_config.json,
    whose bos/eos/unk/pad token strings give the ids)."""
    import json

    import tokenizers

    path = os.fspath(path)
    if paths.isdir(path):
      path = paths.join(path, cls.FILENAME, absolute=False)
    if not paths.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
      with paths.local_file(path) as local:
        backend = tokenizers.Tokenizer.from_file(local)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
      raise ValueError(f"{path} is not a tokenizers model: {e}") from None
    config_path = paths.join(epath.Path(path).parent, cls.CONFIG_FILENAME, absolute=False)
    roles = {}
    if paths.exists(config_path):
      try:
        config = json.loads(paths.read_text(config_path))
      except ValueError as e:  # UnicodeDecodeError included
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
      for role in cls._ROLES:
        token = config.get(f"{role}_token")
        if isinstance(token, dict):  # {"content": "<s>", ...} in newer checkpoints
          token = token.get("content")
        if token is not None:
          token_id = backend.token_to_id(token)
          if token_id is None:
            raise ValueError(f"{config_path}: {role}_token {token!r} is not in {path}")
          roles[f"{role}_id"] = token_id
    if "bos_id" not in roles or "eos_id" not in roles:
      raise ValueError(
        f"{config_path}: needs bos_token and eos_token (the ids every prompt and answer use)"
      )
    return cls(backend, num_mem_tokens, source=path, **roles)

  @classmethod
  def from_gguf(cls, path: str, num_mem_tokens: int) -> BPETokenizer:
    """The tokenizer in a GGUF file's metadata (`tokenizer.ggml.model` "gpt2": tokens,
    merges, token types, special ids), built as byte-level BPE; control tokens (type 3)
    are matched whole in text."""
    import gguf
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    with paths.local_file(path) as local:  # the reader maps a local file
      reader = gguf.GGUFReader(local)

    def field(name: str, required: bool = True) -> Any:
      if name not in reader.fields:
        if required:
          raise ValueError(f"{path}: metadata {name} is missing")
        return None
      return reader.fields[name].contents()

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(
        f"{path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) is supported"
      )
    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    types = field("tokenizer.ggml.token_type", required=False) or [1] * len(tokens)
    backend = tokenizers.Tokenizer(
      models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    control = [token for token, kind in zip(tokens, types) if kind == 3]
    backend.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in control]
    )
    ids = {
      f"{role}_id": field(f"tokenizer.ggml.{name}_token_id", required=role in ("bos", "eos"))
      for role, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
    }
    return cls(backend, num_mem_tokens, source=path, **ids)

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes `path` (tokenizer.json) and the tokenizer_config.json beside it, each all or
    nothing."""
    import json

    path = os.fspath(path)
    paths.write_atomic(path, [self._tk.to_str(pretty=True)])
    config = {
      f"{role}_token": self._tk.id_to_token(token_id)
      for role, token_id in self._ids.items()
      if token_id is not None
    }
    paths.write_atomic(
      paths.join(epath.Path(path).parent, self.CONFIG_FILENAME, absolute=False),
      [json.dumps(config, indent=2)],
    )

  @property
  def unk_id(self) -> int:
    unk = self._ids["unk"]
    return unk if unk is not None else self._eos_id

  @property
  def bos_id(self) -> int:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def pad_id(self) -> int:
    """The model's pad id, else eos (many BPE models pad with it)."""
    pad = self._ids["pad"]
    return pad if pad is not None else self._eos_id

  @property
  def chat_format(self) -> str:
    """ "chatml" when the vocabulary has ChatML's turn tokens, else "inst"."""
    turns = ("<|im_start|>", "<|im_end|>")
    return "chatml" if all(self._tk.token_to_id(t) is not None for t in turns) else "inst"

  def _encode_plain(self, text: str, at_start: bool) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def _decode_plain(self, ids: list[int], at_start: bool) -> str:
    return self._tk.decode(ids, skip_special_tokens=False)

  def _base_piece(self, token_id: int) -> str:
    return self._tk.id_to_token(token_id)


def load_tokenizer(path: str | os.PathLike[str], num_mem_tokens: int) -> ClaraTokenizer:
  """The tokenizer at `path`: a SentencePiece `.model` file, a `tokenizer.json`, or a
  directory (an export or a Hugging Face checkpoint) holding one of them
  (`tokenizer.model` first)."""
  path = os.fspath(path)
  if paths.isdir(path):
    for backend in (Tokenizer, BPETokenizer):
      if paths.exists(paths.join(path, backend.FILENAME, absolute=False)):
        return backend.load(path, num_mem_tokens)
    raise FileNotFoundError(
      f"{path}: holds neither {Tokenizer.FILENAME} nor {BPETokenizer.FILENAME}"
    )
  if path.endswith(".json"):
    return BPETokenizer.load(path, num_mem_tokens)
  return Tokenizer.load(path, num_mem_tokens)
