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
The frozen base is a Hugging Face Mistral checkpoint (see `hf_import`). Files are read
with `torch.load(weights_only=True)`, which never unpickles arbitrary objects; torch is
needed for this import only (`pip install clara_jax[import]`).
"""

from __future__ import annotations

import json
import re
from typing import Dict, Tuple

import jax.numpy as jnp
import numpy as np

from clara_jax import paths
from clara_jax.data.tokenizer import num_special_tokens
from clara_jax.model import lora as lora_lib
from clara_jax.model.config import DecoderConfig, LoraConfig
from clara_jax.weights.export import check_finite
from clara_jax.weights.hf_import import import_hf_checkpoint

ADAPTER_NAMES = {
  "encoder_adapter": "compressor",
  "query_reasoner_adapter": "reasoner",
  "decoder_adapter": "generator",
}
_LORA_KEY = re.compile(
  r"(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.lora_([AB])"
  r"(?:\.[A-Za-z_]\w*)?\.weight$"
)


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


def _np(tensor) -> np.ndarray:
  return tensor.detach().float().cpu().numpy()


def _extra_rows(base_vocab: int, n_mem: int) -> np.ndarray:
  """Reference row of each clara_jax extra token (<ENC>, <SEP>, <AE>, <MEM0>, ...)."""
  ae, enc, sep = base_vocab + n_mem, base_vocab + n_mem + 1, base_vocab + n_mem + 2
  return np.asarray([enc, sep, ae] + [base_vocab + j for j in range(n_mem)])


def _lora_factors(proj: str, part: str, w: np.ndarray, cfg: DecoderConfig) -> np.ndarray:
  """torch LoRA A [r, in] / B [out, r] -> clara_jax a [in..., r] / b [r, out...]."""
  h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if part == "A":
    a = w.T
    return a.reshape(h, hd, -1) if proj == "o" else a
  b = w.T
  out_shape = {"q": (h, hd), "k": (kv, hd), "v": (kv, hd)}.get(proj)
  return b.reshape((b.shape[0],) + out_shape) if out_shape else b


def import_official_clara(
  ckpt_dir: str, base_dir: str, *, dtype: str = "float32", param_dtype: str = "float32"
) -> Tuple[DecoderConfig, Dict, Dict]:
  """Returns (DecoderConfig, params, {"doc_max_length", "compr_rate", "n_mem"}).

  The clara_jax tokenizer for the result has `num_mem_tokens = n_mem`; token ids of the
  added rows follow clara_jax's order (see `_extra_rows`).
  """
  conf_path = paths.join(ckpt_dir, "config.json", absolute=False)
  if not paths.exists(conf_path):
    raise FileNotFoundError(f"{conf_path}: missing; expected the CLaRa config.json")
  try:
    conf = json.loads(paths.read_text(conf_path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{conf_path}: not valid JSON: {e}") from None
  if not isinstance(conf, dict):
    raise ValueError(f"{conf_path}: expected a JSON object, found {type(conf).__name__}")
  for field in ("lora_r", "doc_max_length", "compr_rate"):
    if field not in conf:
      raise ValueError(f"{conf_path}: field '{field}' missing")
    value = conf[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(
        f"{conf_path}: field '{field}': expected a positive integer, found {value!r}"
      )
  r, n_mem = int(conf["lora_r"]), int(conf["doc_max_length"]) // int(conf["compr_rate"])
  lora = LoraConfig(rank=r, alpha=2.0 * r, dropout=0.1)
  cfg, params = import_hf_checkpoint(
    base_dir, num_special_tokens(n_mem), lora=lora, dtype=dtype, param_dtype=param_dtype
  )
  flat = lora_lib.flatten(params)
  v0, rows = cfg.base_vocab_size, _extra_rows(cfg.base_vocab_size, n_mem)

  first_last_path = paths.join(ckpt_dir, "decoder_first_last_layers.pth", absolute=False)
  first_last = _torch_load(first_last_path)
  for suffix, base_key, extra_key, transpose in (
    ("embed_tokens.weight", "embedder/base_embedding", "embedder/extra_embedding", False),
    ("lm_head.weight", "lm_head/base_head", "lm_head/extra_head", True),
  ):
    keys = [k for k in first_last if k.endswith(suffix)]
    if len(keys) != 1:
      raise ValueError(f"{first_last_path}: expected one '*{suffix}', found {keys}")
    w = _np(first_last[keys[0]])
    check_finite([(repr(keys[0]), w)], first_last_path)
    want = (v0 + num_special_tokens(n_mem), cfg.hidden_size)
    if w.shape != want:
      raise ValueError(f"{first_last_path}: '{keys[0]}' has shape {w.shape}, expected {want}")
    base, extra = w[:v0], w[rows]
    flat[base_key] = jnp.asarray(base.T if transpose else base, param_dtype)
    flat[extra_key] = jnp.asarray(extra.T if transpose else extra, param_dtype)

  adapters_path = paths.join(ckpt_dir, "adapters.pth", absolute=False)
  adapters = _torch_load(adapters_path)
  for ref_name, state in adapters.items():
    if ref_name not in ADAPTER_NAMES:
      raise ValueError(
        f"{adapters_path}: unknown adapter {ref_name!r}; expected {sorted(ADAPTER_NAMES)}"
      )
    ours = ADAPTER_NAMES[ref_name]
    seen = set()
    for key, tensor in state.items():
      m = _LORA_KEY.fullmatch(key)
      if m is None:
        raise ValueError(f"{adapters_path}: {ref_name}: unexpected tensor {key!r}")
      layer, block, proj, part = m.groups()
      module = "attn" if block == "self_attn" else "mlp"
      path = f"layers_{layer}/{module}/{proj}_proj/lora_{ours}/{part.lower()}"
      if path not in flat:
        raise ValueError(f"{adapters_path}: {ref_name}: {key!r} has no place in the model")
      array = _np(tensor)
      check_finite([(f"{ref_name}: {key!r}", array)], adapters_path)
      value = _lora_factors(proj, part, array, cfg)
      if value.shape != flat[path].shape:
        raise ValueError(
          f"{adapters_path}: {ref_name}: {key!r} has shape {tuple(tensor.shape)}"
          f" (-> {value.shape}), expected {flat[path].shape}"
        )
      flat[path] = jnp.asarray(value, param_dtype)
      seen.add(path)
    missing = [p for p in flat if f"/lora_{ours}/" in p and p not in seen]
    if missing:
      raise ValueError(
        f"{adapters_path}: {ref_name}: missing {len(missing)} LoRA tensors, e.g. {missing[0]}"
      )
  info = {
    "doc_max_length": int(conf["doc_max_length"]),
    "compr_rate": int(conf["compr_rate"]),
    "n_mem": n_mem,
  }
  return cfg, lora_lib.unflatten(flat), info
