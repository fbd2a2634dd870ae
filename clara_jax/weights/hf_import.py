"""Importing a Hugging Face Mistral/Llama checkpoint (config.json + safetensors), from a
local directory or an object store (`gs://...`).

    cfg, params = import_hf_checkpoint("/ckpts/Mistral-7B-Instruct-v0.2",
                                       num_extra_tokens=tokenizer.num_special,
                                       param_dtype="bfloat16", dtype="bfloat16")

The names and the conversion of every tensor are `clara_jax.weights.layout`'s tensor plan
(its docstring has the table), which `hf_export` reads backwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clara_jax import paths as paths_lib
from clara_jax.model.config import DecoderConfig, LoraConfig, RopeScaling
from clara_jax.model.decoder import abstract_params, init_params
from clara_jax.weights import layout
from clara_jax.weights.export import check_finite
from clara_jax.weights.layout import SUPPORTED_ARCHITECTURES
from clara_jax.weights.safetensors_io import SafetensorsCheckpoint

CONFIG_FILE = "config.json"

DEFAULT_ROPE_THETA = 10000.0

# HF's `resize_token_embeddings(mean_resizing=True)` draws new rows from
# N(mean, 1e-9 * covariance) of the pretrained rows; we use the same scale on the diagonal.
EXTRA_ROW_VARIANCE_SCALE = 1e-9

# Non-persistent buffers that some older exports still contain; recomputed, not imported.
_IGNORED_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")

_FLOAT_CODES = ("F32", "F16", "BF16", "F64")


def load_hf_config(ckpt_dir: str) -> Dict[str, Any]:
  """Reads `ckpt_dir/config.json` (FileNotFoundError naming the path if absent)."""
  path = path_in_directory(ckpt_dir, CONFIG_FILE, "a checkpoint directory")
  if not paths_lib.exists(path):
    raise FileNotFoundError(
      f"{path}: missing; expected the Hugging Face config.json of a Mistral/Llama "
      f"checkpoint (architectures {sorted(SUPPORTED_ARCHITECTURES)})"
    )
  return read_json_object(path)


def path_in_directory(directory: str, name: str, kind: str) -> str:
  """`directory/name`; NotADirectoryError when `directory` is a file (`kind`: what it
  should be)."""
  if paths_lib.isfile(directory):
    raise NotADirectoryError(f"{directory}: is a file; expected {kind}")
  return paths_lib.join(directory, name, absolute=False)


def read_json_object(path: str) -> Dict[str, Any]:
  """A JSON file holding an object (ValueError naming the path otherwise)."""
  try:
    value = json.loads(paths_lib.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
  return value


def _field(hf: Dict[str, Any], name: str, default: Any = None, required: bool = False) -> Any:
  """A config value; JSON null counts as absent (HF writes e.g. `head_dim: null`)."""
  value = hf.get(name)
  if value is None:
    if required:
      raise ValueError(f"HF config: required field {name!r} is missing")
    return default
  return value


def _expect(field: str, expected: Any, found: Any) -> None:
  if found != expected:
    raise ValueError(
      f"HF config field {field!r}: expected {expected!r}, found {found!r} "
      "(not supported by the clara_jax decoder)"
    )


def _check_architecture(hf: Dict[str, Any]) -> str:
  """Returns the model_type after checking it against `architectures`."""
  supported = (
    f"supported: architectures {sorted(SUPPORTED_ARCHITECTURES)} "
    f"(model_type {sorted(set(SUPPORTED_ARCHITECTURES.values()))})"
  )
  archs = _field(hf, "architectures", [])
  model_type = _field(hf, "model_type")
  if archs:
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
      raise ValueError(
        f"unsupported architecture: found architectures {archs!r} "
        f"(model_type {model_type!r}); {supported}"
      )
    expected_type = SUPPORTED_ARCHITECTURES[archs[0]]
    if model_type is not None and model_type != expected_type:
      raise ValueError(
        f"HF config: architectures {archs!r} implies model_type "
        f"{expected_type!r}, found {model_type!r}"
      )
    return expected_type
  if model_type not in SUPPORTED_ARCHITECTURES.values():
    raise ValueError(
      f"unsupported architecture: found model_type {model_type!r} and no architectures; {supported}"
    )
  return model_type


def _rope(hf: Dict[str, Any]) -> Tuple[float, Optional[RopeScaling]]:
  """(the RoPE base, its Llama-3 scaling or None), from transformers-5 `rope_parameters`
  or the older top-level `rope_theta` and `rope_scaling`."""
  params = _field(hf, "rope_parameters")
  if params is not None and not isinstance(params, dict):
    raise ValueError(f"HF config field 'rope_parameters': expected an object, found {params!r}")
  params = params or {}
  # Older configs: rope_theta at the top level and scaling under `rope_scaling`.
  scaling = _field(hf, "rope_scaling") or {}
  if not isinstance(scaling, dict):
    raise ValueError(
      f"HF config field 'rope_scaling': expected an object or null, found {scaling!r}"
    )
  llama3 = None
  for field, source in (("rope_parameters", params), ("rope_scaling", scaling)):
    rope_type = source.get("rope_type", source.get("type", "default"))
    if rope_type == "llama3":
      llama3 = _llama3_scaling(field, source)
    elif rope_type != "default":
      raise ValueError(
        f"HF config field '{field}.rope_type': expected 'default' or "
        f"'llama3', found {rope_type!r} (not reproduced by this decoder)"
      )
  factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if factor is not None:
    _expect("partial_rotary_factor", 1.0, factor)
  theta = params.get("rope_theta", _field(hf, "rope_theta", DEFAULT_ROPE_THETA))
  return float(theta), llama3


def _llama3_scaling(field: str, source: Dict[str, Any]) -> RopeScaling:
  names = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [n for n in names if source.get(n) is None]
  if missing:
    raise ValueError(f"HF config field '{field}': rope_type 'llama3' needs {missing}")
  try:
    return RopeScaling(
      float(source["factor"]),
      float(source["low_freq_factor"]),
      float(source["high_freq_factor"]),
      int(source["original_max_position_embeddings"]),
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f"HF config field '{field}': {e}") from None


# Gemma2Config's defaults (those of the 2B model), for fields a config.json leaves out.
# An explicit null is not a default: it turns a soft cap off.
_GEMMA2_DEFAULTS = {
  "sliding_window": 4096,
  "attn_logit_softcapping": 50.0,
  "final_logit_softcapping": 30.0,
  "query_pre_attn_scalar": 256,
}
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _gemma2_number(hf: Dict[str, Any], name: str, nullable: bool) -> Optional[float]:
  value = hf.get(name, _GEMMA2_DEFAULTS[name])
  if value is None and nullable:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(
      f"HF config field {name!r}: expected a number"
      f"{' or null' if nullable else ''}, found {value!r}"
    )
  return float(value)


def _shortest_cycle(flags: Tuple[bool, ...]) -> Tuple[bool, ...]:
  """The shortest prefix whose repetition is `flags` (`sliding_layer_pattern` cycles)."""
  for n in range(1, len(flags)):
    if all(flags[i] == flags[i % n] for i in range(len(flags))):
      return flags[:n]
  return flags


def _gemma2_fields(hf: Dict[str, Any], num_layers: int) -> Dict[str, Any]:
  """Gemma-2's DecoderConfig fields: local/global layers (`layer_types`, by default local
  first, alternating), soft caps, the query scale and the post-norms."""
  _expect("use_bidirectional_attention", False, _field(hf, "use_bidirectional_attention", False))
  alternating = [_LAYER_TYPES[i % 2] for i in range(num_layers)]
  types = _field(hf, "layer_types", alternating)
  if (
    not isinstance(types, list)
    or len(types) != num_layers
    or any(t not in _LAYER_TYPES for t in types)
  ):
    raise ValueError(
      f"HF config field 'layer_types': expected {num_layers} entries "
      f"(num_hidden_layers), each one of {list(_LAYER_TYPES)}, found {types!r}"
    )
  local = tuple(t == "sliding_attention" for t in types)
  window = _gemma2_number(hf, "sliding_window", nullable=not any(local))
  return dict(
    # HF masks keys at or before q - sliding_window, as `DecoderConfig.sliding_window`.
    # (`window` is None only when nullable, i.e. with no sliding layer.)
    sliding_window=int(window) if any(local) and window is not None else None,
    sliding_layer_pattern=_shortest_cycle(local) if 0 < sum(local) < num_layers else None,
    attn_logit_softcapping=_gemma2_number(hf, "attn_logit_softcapping", nullable=True),
    final_logit_softcapping=_gemma2_number(hf, "final_logit_softcapping", nullable=True),
    query_pre_attn_scalar=_gemma2_number(hf, "query_pre_attn_scalar", nullable=False),
    post_norms=True,
  )


def _hidden_act(hf: Dict[str, Any], model_type: str) -> str:
  """The MLP's activation, checked against the one each family's config names."""
  if model_type == "gemma":  # GeGLU with the tanh-approximated GELU
    act = _field(hf, "hidden_activation") or _field(hf, "hidden_act", "gelu_pytorch_tanh")
    _expect("hidden_act", "gelu_pytorch_tanh", act)
    return "gelu_tanh"
  if model_type == "gemma2":  # its MLP reads `hidden_activation` only
    _expect(
      "hidden_activation", "gelu_pytorch_tanh", _field(hf, "hidden_activation", "gelu_pytorch_tanh")
    )
    return "gelu_tanh"
  _expect("hidden_act", "silu", _field(hf, "hidden_act", "silu"))
  return "silu"


def _qkv_bias(hf: Dict[str, Any], model_type: str) -> bool:
  """Whether the family has query/key/value biases; refuses biases this decoder lacks and
  quantized weights."""
  # Qwen2 always has query/key/value biases (its config has no field for them); Llama's
  # `attention_bias` would also put one on the output projection, which this decoder lacks.
  qkv_bias = model_type == "qwen2"
  if qkv_bias:
    _expect("use_sliding_window", False, _field(hf, "use_sliding_window", False))
  else:
    _expect("attention_bias", False, _field(hf, "attention_bias", False))
  _expect("mlp_bias", False, _field(hf, "mlp_bias", False))
  _expect("quantization_config", None, hf.get("quantization_config"))
  return qkv_bias


def _hidden_and_heads(hf: Dict[str, Any]) -> Tuple[int, int]:
  """(hidden_size, num_attention_heads); without a head_dim, the first divides by the
  second."""
  hidden = int(_field(hf, "hidden_size", required=True))
  heads = int(_field(hf, "num_attention_heads", required=True))
  if hidden % heads and _field(hf, "head_dim") is None:
    raise ValueError(
      f"HF config: hidden_size {hidden} is not a multiple of "
      f"num_attention_heads {heads} and no head_dim is given"
    )
  return hidden, heads


def _attention_fields(hf: Dict[str, Any], model_type: str, num_layers: int) -> Dict[str, Any]:
  """The sliding window, and Gemma-2's local/global layers, soft caps and post norms."""
  sliding_window = _field(hf, "sliding_window") if model_type in ("mistral", "phi3") else None
  gemma2 = _gemma2_fields(hf, num_layers) if model_type == "gemma2" else {}
  if gemma2:
    sliding_window = gemma2.pop("sliding_window")
  return dict(sliding_window=None if sliding_window is None else int(sliding_window), **gemma2)


def decoder_config_from_hf(
  hf_config: Dict[str, Any],
  num_extra_tokens: int,
  lora: Optional[LoraConfig] = LoraConfig(),
  dtype: str = "float32",
  param_dtype: str = "float32",
) -> DecoderConfig:
  """The DecoderConfig equivalent to a HF Mistral, Llama, Qwen2, Phi-3, Gemma or Gemma-2
  config.json dict.

  Raises:
    ValueError naming the field, the expected and the found value, for anything this
    decoder would not reproduce exactly (RoPE scaling other than Llama-3's, biases,
    another activation,
    quantized weights), or naming the architecture found and those supported.
  """
  hf = hf_config
  model_type = _check_architecture(hf)
  hidden_act = _hidden_act(hf, model_type)
  qkv_bias = _qkv_bias(hf, model_type)
  hidden, heads = _hidden_and_heads(hf)
  num_layers = int(_field(hf, "num_hidden_layers", required=True))
  attention = _attention_fields(hf, model_type, num_layers)
  rope_theta, rope_scaling = _rope(hf)
  return DecoderConfig(
    base_vocab_size=int(_field(hf, "vocab_size", required=True)),
    num_extra_tokens=int(num_extra_tokens),
    hidden_size=hidden,
    intermediate_size=int(_field(hf, "intermediate_size", required=True)),
    num_layers=num_layers,
    num_heads=heads,
    num_kv_heads=int(_field(hf, "num_key_value_heads", heads)),
    head_dim=int(_field(hf, "head_dim", hidden // heads)),
    rope_theta=rope_theta,
    rope_scaling=rope_scaling,
    qkv_bias=qkv_bias,
    hidden_act=hidden_act,
    rms_norm_eps=float(_field(hf, "rms_norm_eps", 1e-6)),
    dtype=dtype,
    param_dtype=param_dtype,
    lora=lora,
    **attention,
  )


def _config_summary(cfg: DecoderConfig) -> str:
  return (
    f"vocab_size={cfg.base_vocab_size}, hidden_size={cfg.hidden_size}, "
    f"intermediate_size={cfg.intermediate_size}, num_hidden_layers={cfg.num_layers}, "
    f"num_attention_heads={cfg.num_heads}, num_key_value_heads={cfg.num_kv_heads}, "
    f"head_dim={cfg.head_dim}"
  )


def _validate(
  ckpt: SafetensorsCheckpoint, plan: List[layout.Entry], cfg: DecoderConfig, tied: bool
) -> None:
  """Checks names, shapes and dtypes from the headers alone, before any data is read."""
  for entry in plan:
    if entry.hf_name not in ckpt:
      raise ValueError(
        f"{ckpt.ckpt_dir}: missing tensor {entry.hf_name!r} (expected shape "
        f"{entry.hf_shape}) in {[paths_lib.path(p).name for p in ckpt.files]}"
      )
    info = ckpt.info(entry.hf_name)
    if info.shape != entry.hf_shape:
      raise ValueError(
        f"{ckpt.file_of(entry.hf_name)}: tensor {entry.hf_name!r} has shape "
        f"{info.shape}, expected {entry.hf_shape} from config.json ({_config_summary(cfg)})"
      )
    if info.dtype not in _FLOAT_CODES:
      raise ValueError(
        f"{ckpt.file_of(entry.hf_name)}: tensor {entry.hf_name!r} has dtype "
        f"{info.dtype}, expected one of {_FLOAT_CODES}"
      )
  used = {entry.hf_name for entry in plan}
  if tied:
    # Some tied checkpoints also store the (identical) head; HF ties it to the embedding.
    used.add("lm_head.weight")
  unused = sorted(n for n in ckpt.keys() if n not in used and not _IGNORED_TENSORS.match(n))
  if unused:
    shown = unused[:20] + ([f"... ({len(unused) - 20} more)"] if len(unused) > 20 else [])
    raise ValueError(
      f"{ckpt.ckpt_dir}: {len(unused)} checkpoint tensor(s) not used by a "
      f"{'tied' if tied else 'untied'} decoder of this architecture: {shown}"
    )


def _row_moments(rows_vd: np.ndarray, chunk: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
  """Per-column mean and variance of a [rows, width] matrix, in float64, chunk by chunk
  (a 32k x 4k memmap is never materialised in a wider dtype)."""
  n, width = rows_vd.shape
  total, total_sq = np.zeros(width), np.zeros(width)
  for start in range(0, n, chunk):
    block = np.asarray(rows_vd[start : start + chunk], dtype=np.float64)
    total += block.sum(0)
    total_sq += np.square(block).sum(0)
  mean = total / n
  return mean, np.maximum(total_sq / n - np.square(mean), 0.0)


def _extra_rows(rows_vd: np.ndarray, num: int, key: jax.Array) -> np.ndarray:
  """`num` new rows [num, width] from the pretrained rows' statistics, float32.

  Why the mean (as HF `resize_token_embeddings` does, after Hewitt 2021, "Initializing
  new word embeddings for pretrained language models"): a row at the mean keeps the new
  tokens' logits at the average of the existing ones, so before any training the special
  tokens neither dominate the output distribution nor look like outliers to attention,
  unlike rows drawn at the initializer scale. The tiny seeded noise (HF's
  N(mean, 1e-9 * covariance), here with the diagonal of the covariance, which avoids a
  width x width matrix) keeps the rows distinct.
  """
  mean, var = _row_moments(rows_vd)
  noise = np.asarray(jax.random.normal(key, (num, rows_vd.shape[1]), jnp.float32))
  return (mean + np.sqrt(EXTRA_ROW_VARIANCE_SCALE * var) * noise).astype(np.float32)


def _lora_leaves(
  cfg: DecoderConfig, rng: jax.Array, shardings: Dict[str, Any]
) -> Dict[str, jax.Array]:
  """The LoRA leaves of `init_params(cfg, rng)`, flat, without materialising the base.

  Under jit, the base kernels' initialisers feed no output, so XLA drops them: a 7B
  import does not allocate a random 7B model just to read off its adapters.
  """
  paths = [
    p
    for p in traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)), sep="/")
    if "/lora_" in f"/{p}"
  ]
  if not paths:
    return {}

  def init_lora(key: jax.Array) -> Dict[str, jax.Array]:
    flat = traverse_util.flatten_dict(init_params(cfg, key), sep="/")
    return {p: flat[p] for p in paths}

  out_shardings = None
  if shardings:
    out_shardings = {p: shardings[p] for p in paths}
  return jax.jit(init_lora, out_shardings=out_shardings)(rng)


@dataclasses.dataclass(frozen=True)
class ImportOptions:
  """How an import builds the model (the keyword arguments of `import_hf_checkpoint`)."""

  lora: Optional[LoraConfig] = LoraConfig()
  dtype: str = "float32"
  param_dtype: str = "float32"
  rng: Optional[jax.Array] = None
  shardings: Any = None


def import_hf_checkpoint(
  ckpt_dir: str,
  num_extra_tokens: int,
  *,
  lora: Optional[LoraConfig] = LoraConfig(),
  dtype: str = "float32",
  param_dtype: str = "float32",
  rng: Optional[jax.Array] = None,
  shardings: Any = None,
) -> Tuple[DecoderConfig, Dict]:
  """Converts a local HF Mistral/Llama checkpoint into a clara_jax config and params.

  Args:
    ckpt_dir: directory with config.json and model.safetensors (or a sharded
      model.safetensors.index.json and its shards).
    num_extra_tokens: vocabulary rows to add for CLaRa's special tokens; they are
      initialised at the mean of the pretrained rows plus tiny seeded noise (see
      `_extra_rows`), and with tied embeddings the new head rows equal the new
      embedding rows.
    lora: the adapters (None: none). Their params are those of `init_params(cfg, rng)`;
      B = 0 there, so every adapter of the imported model computes the base model.
    dtype: compute dtype of the returned config.
    param_dtype: dtype every parameter is cast to.
    rng: seeds the adapters (`rng` itself, as `init_params`) and the extra rows
      (`fold_in(rng, 1)`); default `jax.random.key(0)`.
    shardings: optional tree of `jax.sharding.Sharding` matching the params (e.g.
      `partitioning.logical_shardings(abstract_params(cfg), mesh)`); each tensor is
      placed with it as soon as it is converted, so no device holds the whole model.

  Returns:
    (DecoderConfig, params): params is the nested dict `init_params` would return.

  Raises:
    FileNotFoundError: config.json or the safetensors file(s) missing (naming the path).
    ValueError: an unsupported config (naming the field), or a checkpoint tensor missing,
      of the wrong shape (naming tensor, expected and found shape) or left unused.
  """
  ckpt_dir = os.fspath(ckpt_dir)
  hf = load_hf_config(ckpt_dir)
  options = ImportOptions(lora, dtype, param_dtype, rng, shardings)
  with SafetensorsCheckpoint(ckpt_dir) as ckpt:
    config_source = paths_lib.join(ckpt_dir, CONFIG_FILE, absolute=False)
    return import_tensors(ckpt, hf, config_source, num_extra_tokens, options)


def import_tensors(
  ckpt: Any,
  hf: Dict[str, Any],
  config_source: str,
  num_extra_tokens: int,
  options: ImportOptions = ImportOptions(),
) -> Tuple[DecoderConfig, Dict]:
  """The conversion behind `import_hf_checkpoint`, from any checkpoint of HF-named
  tensors: `ckpt` has `keys()`, `in`, `info(name)` (.shape, .dtype), `get(name)` (numpy),
  `file_of(name)`, and `ckpt_dir` and `files` (named in errors); `hf` is its config.json
  dict, read from `config_source` (named in errors). The GGUF importer feeds it
  dequantized tensors."""
  rng = jax.random.key(0) if options.rng is None else options.rng
  cfg = _config_of(hf, config_source, num_extra_tokens, options)
  tied = bool(_field(hf, "tie_word_embeddings", False))
  flat_shardings = (
    traverse_util.flatten_dict(options.shardings, sep="/") if options.shardings is not None else {}
  )
  place = _placer(options.param_dtype, flat_shardings)
  model_type = _check_architecture(hf)
  plan = layout.tensor_plan(cfg, tied, model_type)
  _validate(ckpt, plan, cfg, tied)
  flat = _convert_plan(ckpt, plan, place)
  flat.update(_vocabulary_rows(ckpt, cfg, tied, model_type, rng, place))
  flat.update(_lora_leaves(cfg, rng, flat_shardings))
  _check_tree(cfg, flat)
  return cfg, traverse_util.unflatten_dict(flat, sep="/")


Place = Callable[[str, np.ndarray], jax.Array]


def _config_of(
  hf: Dict[str, Any], config_source: str, num_extra_tokens: int, options: ImportOptions
) -> DecoderConfig:
  try:
    return decoder_config_from_hf(
      hf,
      num_extra_tokens,
      lora=options.lora,
      dtype=options.dtype,
      param_dtype=options.param_dtype,
    )
  except ValueError as e:
    raise ValueError(f"{config_source}: {e}") from None


def _placer(param_dtype: str, flat_shardings: Dict[str, Any]) -> Place:
  """Casts a converted tensor to the parameter dtype and puts it on its devices."""
  pdt = np.dtype(jnp.dtype(param_dtype))

  def place(path: str, value: np.ndarray) -> jax.Array:
    # A forced copy: device_put may alias host memory on CPU, and params must not stay
    # backed by the checkpoint's memory map.
    host = np.array(value, dtype=pdt, order="C", copy=True)
    return jax.device_put(host, flat_shardings.get(path))

  return place


def _convert_plan(ckpt: Any, plan: List[layout.Entry], place: Place) -> Dict[str, jax.Array]:
  """One tensor at a time: read (memmap), check, rearrange, cast, place."""
  flat: Dict[str, jax.Array] = {}
  for entry in plan:
    tensor = ckpt.get(entry.hf_name)
    check_finite([(repr(entry.hf_name), tensor)], ckpt.file_of(entry.hf_name))
    for path, value in zip(entry.parts, entry.arrays(tensor)):
      flat[path] = place(path, value)
  return flat


def _vocabulary_rows(
  ckpt: Any, cfg: DecoderConfig, tied: bool, model_type: str, rng: jax.Array, place: Place
) -> Dict[str, jax.Array]:
  """The tied output head, and the special tokens' embedding and head rows."""
  flat: Dict[str, jax.Array] = {}
  embed_vd = ckpt.get(layout.EMBEDDING)
  if tied:
    flat["lm_head/base_head"] = place("lm_head/base_head", embed_vd.T)
  if cfg.num_extra_tokens:
    embed_key, head_key = jax.random.split(jax.random.fold_in(rng, 1))
    extra_embedding = _extra_rows(embed_vd, cfg.num_extra_tokens, embed_key)
    extra_head = (
      extra_embedding
      if tied
      else _extra_rows(ckpt.get(layout.LM_HEAD), cfg.num_extra_tokens, head_key)
    )
    scale = np.float32(layout.embedding_scale(model_type, cfg))
    flat["embedder/extra_embedding"] = place("embedder/extra_embedding", extra_embedding * scale)
    flat["lm_head/extra_head"] = place("lm_head/extra_head", extra_head.T)
  return flat


def _check_tree(cfg: DecoderConfig, flat: Dict[str, jax.Array]) -> None:
  """The assembled tree must be exactly the decoder's (guards the name table above)."""
  expected = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)), sep="/")
  if set(expected) != set(flat):
    raise RuntimeError(
      f"HF import produced parameters {sorted(set(flat) - set(expected))} and lacks "
      f"{sorted(set(expected) - set(flat))}; the mapping is out of date with the Decoder"
    )
  for path, spec in expected.items():
    if tuple(flat[path].shape) != tuple(spec.shape) or flat[path].dtype != spec.dtype:
      raise RuntimeError(
        f"HF import: {path} is {flat[path].dtype}{list(flat[path].shape)}, "
        f"the Decoder expects {spec.dtype}{list(spec.shape)}"
      )
