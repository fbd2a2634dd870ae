"""Importing a llama-architecture GGUF file (the format of llama.cpp and Ollama).

    cfg, params = import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf",
                              num_extra_tokens=tokenizer.num_special)

A GGUF file holds the model's hyper-parameters as metadata and its tensors, each in its
own quantization (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, the K-quants, ...). Every tensor
is dequantized to float32 by the `gguf` package, renamed to its Hugging Face name and
handed to the same conversion as a safetensors checkpoint (`hf_import`), so shapes,
tied embeddings, CLaRa's extra rows and the adapters are handled in one place.

The GGUF -> HF name map is `clara_jax.weights.layout`'s (its docstring has the table).

llama.cpp's converter reorders the rows of q and k within each head, from the "rotate
half" RoPE layout of HF checkpoints (and of `clara_jax.model.layers.apply_rope`) to the
interleaved pairs its kernels rotate; `_unpermute` restores the HF order.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Dict, List, Tuple

import numpy as np

from clara_jax import paths
from clara_jax.model.config import DecoderConfig
from clara_jax.weights import layout

SUPPORTED_ARCHITECTURES = ("llama",)  # llama.cpp also files Mistral models under "llama"

# Precomputed RoPE frequencies some converters add; recomputed from the metadata instead.
_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd)$")


def _unpermute(rows_w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation: within each head, row 2j + p of the
  interleaved layout goes back to row p * hd/2 + j of the rotate-half one."""
  head_dim = rows_w.shape[0] // num_heads
  return (
    rows_w.reshape(num_heads, head_dim // 2, 2, *rows_w.shape[1:])
    .swapaxes(1, 2)
    .reshape(rows_w.shape)
  )


@dataclasses.dataclass(frozen=True)
class _Info:
  shape: Tuple[int, ...]
  dtype: str  # after dequantization
  quantization: str


class GGUFCheckpoint:
  """A GGUF file seen as a checkpoint of HF-named float32 tensors (the interface
  `hf_import` reads: `keys`, `in`, `info`, `get`, `file_of`), dequantized on `get`."""

  def __init__(self, path: str) -> None:
    import gguf

    self.path = os.fspath(path)
    if not paths.exists(self.path):
      raise FileNotFoundError(f"{self.path}: no such GGUF file")
    if paths.isdir(self.path):
      raise IsADirectoryError(f"{self.path}: is a directory; expected a .gguf file")
    # The reader maps a local file: an object-store one (`gs://...`) is copied to a
    # temporary file, removed on exit; the map stays valid after removal (POSIX).
    with paths.local_file(self.path) as local:
      try:
        self.reader = gguf.GGUFReader(local)
      except (ValueError, OSError, KeyError, IndexError) as e:
        raise ValueError(
          f"{self.path}: not a readable GGUF file ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    self.ckpt_dir, self.files = self.path, [self.path]
    self.metadata = {
      name: _field_value(field)
      for name, field in self.reader.fields.items()
      if not name.startswith("tokenizer.ggml.")
    }
    self._tensors = {}
    unknown = []
    for tensor in self.reader.tensors:
      name = layout.hf_name_of_gguf(tensor.name)
      if name is not None:
        self._tensors[name] = tensor
      elif not _IGNORED.match(tensor.name):
        unknown.append(tensor.name)
    if unknown:
      raise ValueError(
        f"{self.path}: {len(unknown)} tensor(s) that a llama decoder does not have: {unknown[:10]}"
      )
    self.config = hf_config_from_gguf(
      self.metadata, self.path, tied=layout.LM_HEAD not in self._tensors
    )
    if self.config["vocab_size"] is None and layout.EMBEDDING in self._tensors:
      self.config["vocab_size"] = self.info(layout.EMBEDDING).shape[0]

  def __enter__(self) -> GGUFCheckpoint:
    return self

  def __exit__(self, *exc: Any) -> None:
    # Released on exit; callers (cli/weights.py) read `reader` only while it is open.
    self.reader = None  # type: ignore[assignment]

  def keys(self) -> List[str]:
    return list(self._tensors)

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def file_of(self, name: str) -> str:
    return self.path

  def info(self, name: str) -> _Info:
    tensor = self._tensors[name]
    # ggml orders dimensions innermost first: reversed, they are the array's.
    return _Info(tuple(int(n) for n in reversed(tensor.shape)), "F32", tensor.tensor_type.name)

  def get(self, name: str) -> np.ndarray:
    import gguf

    tensor = self._tensors[name]
    try:
      value = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
      raise ValueError(
        f"{self.path}: tensor {tensor.name} is {tensor.tensor_type.name}, "
        f"which the gguf package cannot dequantize"
      ) from None
    value = np.asarray(value, np.float32).reshape(self.info(name).shape)
    if name.endswith("q_proj.weight"):
      value = _unpermute(value, self.config["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
      value = _unpermute(value, self.config["num_key_value_heads"])
    return value


def _field_value(field: Any) -> Any:
  try:
    return field.contents()
  except (ValueError, IndexError, TypeError):  # an array of arrays: not needed here
    return None


def hf_config_from_gguf(meta: Dict[str, Any], where: str, tied: bool) -> Dict[str, Any]:
  """The HF config.json dict of a llama-architecture GGUF's metadata; anything the
  decoder would not reproduce exactly (another architecture, RoPE scaling, partial
  rotary) is refused naming the key."""
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
      f"{where}: general.architecture is {arch!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
    )

  def get(key: str, default: Any = None, required: bool = False) -> Any:
    value = meta.get(f"{arch}.{key}", default)
    if value is None and required:
      raise ValueError(f"{where}: metadata {arch}.{key} is missing")
    return value

  hidden = int(get("embedding_length", required=True))
  heads = int(get("attention.head_count", required=True))
  head_dim = int(get("attention.key_length", hidden // heads))
  rotary = get("rope.dimension_count", head_dim)
  if int(rotary) != head_dim:
    raise ValueError(
      f"{where}: {arch}.rope.dimension_count is {rotary}, but the head "
      f"dimension is {head_dim}; partial rotary embeddings are not supported"
    )
  scaling = get("rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise ValueError(
      f"{where}: {arch}.rope.scaling.type is {scaling!r}; RoPE scaling is not supported"
    )
  vocab = get("vocab_size")  # None: the embedding's rows (GGUFCheckpoint)
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": int(vocab) if vocab is not None else None,
    "hidden_size": hidden,
    "intermediate_size": int(get("feed_forward_length", required=True)),
    "num_hidden_layers": int(get("block_count", required=True)),
    "num_attention_heads": heads,
    "num_key_value_heads": int(get("attention.head_count_kv", heads)),
    "head_dim": head_dim,
    "rope_theta": _float32_value(get("rope.freq_base", 10000.0)),
    "rms_norm_eps": _float32_value(get("attention.layer_norm_rms_epsilon", 1e-5)),
    "tie_word_embeddings": tied,
  }


def _float32_value(value: Any) -> float:
  """The shortest decimal of a float32 metadata value (GGUF stores 1e-5 as
  9.99999974e-06): the same float32 in computation, the intended number in the config."""
  return float(str(np.float32(value)))


def import_gguf(path: str, num_extra_tokens: int, **options: Any) -> Tuple[DecoderConfig, Dict]:
  """A GGUF file -> (DecoderConfig, params), as `hf_import.import_hf_checkpoint` does for
  a safetensors checkpoint (same keyword arguments, the fields of
  `hf_import.ImportOptions`; same extra rows and adapters)."""
  from clara_jax.weights import hf_import

  with GGUFCheckpoint(path) as ckpt:
    return hf_import.import_tensors(
      ckpt, ckpt.config, path, num_extra_tokens, hf_import.ImportOptions(**options)
    )
