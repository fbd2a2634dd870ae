"""Importing a checkpoint released in the official CLaRa (PyTorch) format.

The official `save_pretrained` writes, next to a CLaRa `config.json` (`lora_r`,
`doc_max_length`, `compr_rate`, ...):
* `adapters.pth`: {adapter name: PEFT LoRA state dict} for `encoder_adapter`
  (compressor), `query_reasoner_adapter` (reasoner) and `decoder_adapter` (generator),
  keys like `model.layers.{i}.self_attn.q_proj.lora_A.weight` ([r, in]) / `lora_B`
  ([out, r]); LoRA alpha is 2 * r;
* `decoder_first_last_layers.pth`: the resized `model.embed_tokens.weight` and
  `lm_head.weight` ([V + n_mem + 3, D]), the added rows in the order <MEM0>..<MEM{n-1}>,
  <AE>, <ENC>, <SEP>.
The frozen base is a Hugging Face Mistral checkpoint (see `hf_import`); the key names and
the row order are `clara_jax.weights.layout`'s. Files are read
with `torch.load(weights_only=True)`, which never unpickles arbitrary objects; torch is
needed for this import only (`pip install clara_jax[import]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Tuple

import jax.numpy as jnp
import numpy as np

from clara_jax import paths
from clara_jax.data.tokenizer import num_special_tokens
from clara_jax.model import lora as lora_lib
from clara_jax.model.config import DecoderConfig, LoraConfig
from clara_jax.weights import layout
from clara_jax.weights.export import check_finite
from clara_jax.weights.hf_import import CONFIG_FILE, import_hf_checkpoint, read_json_object
from clara_jax.weights.layout import ADAPTER_NAMES

if TYPE_CHECKING:
  import torch

ADAPTERS_FILE = "adapters.pth"
FIRST_LAST_FILE = "decoder_first_last_layers.pth"
# The fields of the official config.json this import reads.
_REQUIRED_FIELDS = ("lora_r", "doc_max_length", "compr_rate")

Flat = Dict[str, Any]


def _torch_load(path: str) -> dict:
  if not paths.exists(path):
    raise FileNotFoundError(f"{path}: missing; expected a file of the official CLaRa format")
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      "importing official CLaRa checkpoints needs torch: pip install 'clara_jax[import]'"
    ) from e
  with paths.local_file(path) as local:  # torch reads a local file (or a whole stream)
    try:
      obj = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unsafe-type errors all mean "not our file"
      raise ValueError(
        f"{path}: not a PyTorch weights file of the expected kind "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
      ) from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
  return obj


def _np(tensor: torch.Tensor) -> np.ndarray:
  return tensor.detach().float().cpu().numpy()


def positive_int(values: Dict[str, Any], field: str, where: str, why: str = "") -> int:
  """`values[field]`, which must be a positive integer (ValueError naming `where`)."""
  if field not in values:
    raise ValueError(f"{where}: field '{field}' missing{why}")
  value = values[field]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{where}: field '{field}': expected a positive integer, found {value!r}")
  return value


def _read_config(ckpt_dir: str) -> Dict[str, int]:
  """The official config.json's LoRA rank and lengths."""
  conf_path = paths.join(ckpt_dir, CONFIG_FILE, absolute=False)
  if not paths.exists(conf_path):
    raise FileNotFoundError(f"{conf_path}: missing; expected the CLaRa config.json")
  conf = read_json_object(conf_path)
  return {field: positive_int(conf, field, conf_path) for field in _REQUIRED_FIELDS}


def import_official_clara(
  ckpt_dir: str, base_dir: str, *, dtype: str = "float32", param_dtype: str = "float32"
) -> Tuple[DecoderConfig, Dict, Dict]:
  """Returns (DecoderConfig, params, {"doc_max_length", "compr_rate", "n_mem"}).

  The clara_jax tokenizer for the result has `num_mem_tokens = n_mem`; token ids of the
  added rows follow clara_jax's order (see `layout.official_rows`).
  """
  conf = _read_config(ckpt_dir)
  r, n_mem = conf["lora_r"], conf["doc_max_length"] // conf["compr_rate"]
  lora = LoraConfig(rank=r, alpha=2.0 * r, dropout=0.1)
  cfg, params = import_hf_checkpoint(
    base_dir, num_special_tokens(n_mem), lora=lora, dtype=dtype, param_dtype=param_dtype
  )
  flat = lora_lib.flatten(params)
  first_last_path = paths.join(ckpt_dir, FIRST_LAST_FILE, absolute=False)
  _import_first_last(first_last_path, flat, cfg, n_mem, param_dtype)
  adapters_path = paths.join(ckpt_dir, ADAPTERS_FILE, absolute=False)
  for ref_name, state in _torch_load(adapters_path).items():
    _import_adapter(adapters_path, ref_name, state, flat, cfg, param_dtype)
  info = {"doc_max_length": conf["doc_max_length"], "compr_rate": conf["compr_rate"]}
  return cfg, lora_lib.unflatten(flat), {**info, "n_mem": n_mem}


def _import_first_last(
  path: str, flat: Flat, cfg: DecoderConfig, n_mem: int, param_dtype: str
) -> None:
  """The resized embedding and head: base rows, then the extra rows in clara_jax order."""
  first_last = _torch_load(path)
  v0, rows = cfg.base_vocab_size, layout.official_rows(cfg.base_vocab_size, n_mem)
  for name, base_key, extra_key, transpose in layout.FIRST_LAST:
    suffix = name.removeprefix("model.")
    keys = [k for k in first_last if k.endswith(suffix)]
    if len(keys) != 1:
      raise ValueError(f"{path}: expected one '*{suffix}', found {keys}")
    w = _np(first_last[keys[0]])
    check_finite([(repr(keys[0]), w)], path)
    want = (v0 + num_special_tokens(n_mem), cfg.hidden_size)
    if w.shape != want:
      raise ValueError(f"{path}: '{keys[0]}' has shape {w.shape}, expected {want}")
    base, extra = w[:v0], w[rows]
    flat[base_key] = jnp.asarray(base.T if transpose else base, param_dtype)
    flat[extra_key] = jnp.asarray(extra.T if transpose else extra, param_dtype)


def _import_adapter(
  path: str, ref_name: str, state: Dict, flat: Flat, cfg: DecoderConfig, param_dtype: str
) -> None:
  """One official adapter's LoRA factors into their places in `flat`; all must be there."""
  if ref_name not in ADAPTER_NAMES:
    raise ValueError(f"{path}: unknown adapter {ref_name!r}; expected {sorted(ADAPTER_NAMES)}")
  ours = ADAPTER_NAMES[ref_name]
  seen = set()
  for key, tensor in state.items():
    place = layout.lora_path(key, ours)
    if place is None:
      raise ValueError(f"{path}: {ref_name}: unexpected tensor {key!r}")
    target, proj, part = place
    if target not in flat:
      raise ValueError(f"{path}: {ref_name}: {key!r} has no place in the model")
    array = _np(tensor)
    check_finite([(f"{ref_name}: {key!r}", array)], path)
    value = layout.lora_from_official(proj, part, array, cfg)
    if value.shape != flat[target].shape:
      raise ValueError(
        f"{path}: {ref_name}: {key!r} has shape {tuple(tensor.shape)}"
        f" (-> {value.shape}), expected {flat[target].shape}"
      )
    flat[target] = jnp.asarray(value, param_dtype)
    seen.add(target)
  missing = [p for p in flat if f"/lora_{ours}/" in p and p not in seen]
  if missing:
    raise ValueError(f"{path}: {ref_name}: missing {len(missing)} LoRA tensors, e.g. {missing[0]}")
