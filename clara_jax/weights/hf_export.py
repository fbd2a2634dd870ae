"""Exporting one role of a trained run as a plain Hugging Face checkpoint: the base with
that role's LoRA adapter folded into its kernels, and CLaRa's special-token rows appended
to the vocabulary.

    info = export_hf("runs/stage2", "generator", "hf_generator")

writes `config.json` + `model.safetensors` that `transformers.AutoModelForCausalLM`
loads; its logits are clara_jax's with that adapter active. The tensors are the inverse
of the tensor plan of `clara_jax.weights.layout` that `hf_import` reads (the same name
table, read backwards), so `import-hf` of the
result gives back the merged weights. The vocabulary is the run's: base rows, then the
special tokens in clara_jax's id order (<ENC>, <SEP>, <AE>, <MEM0>, ...), which is also
the order of the run's tokenizer.

The run does not record the base checkpoint it started from, so the config is built from
the run's decoder config (Mistral; Llama with Llama-3 RoPE scaling; Qwen2 with
query/key/value biases) unless `base_config` names the base's own config.json, whose
fields (token ids, context length, architecture, ...) are then kept.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from clara_jax import paths
from clara_jax.data.tokenizer import FIXED_SPECIAL_TOKENS, mem_token
from clara_jax.model import lora as lora_lib
from clara_jax.model.config import CLARA_ADAPTERS, DecoderConfig
from clara_jax.weights import hf_import, layout
from clara_jax.weights.clara_export import Run, _check_base_family, check_new_output_dir, load_run
from clara_jax.weights.safetensors_io import SINGLE_FILE, write_safetensors

CONFIG_FILE = "config.json"
OUT_DTYPES = ("float32", "bfloat16", "float16")
ARCHITECTURES = {t: a for a, t in layout.SUPPORTED_ARCHITECTURES.items()}

# DecoderConfig fields an HF config must reproduce for its model to compute the run's:
# its sizes, its heads and its attention, norms and activation.
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_layers")
_HEAD_FIELDS = ("num_heads", "num_kv_heads", "head_dim")
_COMPUTE_FIELDS = ("rope_theta", "rope_scaling", "rms_norm_eps", "sliding_window", "qkv_bias")
_COMPARED_FIELDS = _SIZE_FIELDS + _HEAD_FIELDS + _COMPUTE_FIELDS + ("hidden_act",)
# Fields of decoders this export cannot write (Gemma-2's), with their "off" values.
_UNSUPPORTED_FIELDS = {
  "sliding_layer_pattern": None,
  "attn_logit_softcapping": None,
  "final_logit_softcapping": None,
  "query_pre_attn_scalar": None,
  "post_norms": False,
}


def _family(cfg: DecoderConfig) -> str:
  """The HF model_type written when no base config is given."""
  if cfg.qkv_bias:
    if cfg.sliding_window is not None:
      raise ValueError(
        "the run's model has query/key/value biases (Qwen2) and a sliding "
        "window, which no supported Hugging Face family combines"
      )
    return "qwen2"
  if cfg.sliding_window is None and cfg.rope_scaling is not None:
    return "llama"
  return "mistral"


def _config_from_run(cfg: DecoderConfig, model_type: str) -> Dict[str, Any]:
  conf: Dict[str, Any] = {
    "architectures": [ARCHITECTURES[model_type]],
    "model_type": model_type,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": cfg.rms_norm_eps,
    # The pre-transformers-5 names, which transformers 5 still reads.
    "rope_theta": cfg.rope_theta,
  }
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    conf["rope_scaling"] = {
      "rope_type": "llama3",
      "factor": s.factor,
      "low_freq_factor": s.low_freq_factor,
      "high_freq_factor": s.high_freq_factor,
      "original_max_position_embeddings": s.original_max_position,
    }
  if model_type == "mistral":
    conf["sliding_window"] = cfg.sliding_window
  elif model_type == "qwen2":
    conf.update(use_sliding_window=False, sliding_window=None)
  else:
    conf.update(attention_bias=False, mlp_bias=False)
  return conf


def _read_base_config(base_config: str) -> Dict[str, Any]:
  if paths.isdir(base_config):
    return hf_import.load_hf_config(base_config)
  if not paths.exists(base_config):
    raise FileNotFoundError(
      f"{base_config}: missing; expected the base checkpoint's config.json or its directory"
    )
  return hf_import.read_json_object(base_config)


def _check_matches(conf: Dict[str, Any], cfg: DecoderConfig, vocab: int, where: str) -> None:
  """`conf` must describe the run's model: same shapes, RoPE, norms and attention."""
  try:
    theirs = hf_import.decoder_config_from_hf(conf, 0, lora=None)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  if theirs.base_vocab_size != vocab:
    raise ValueError(
      f"{where}: vocab_size {theirs.base_vocab_size} does not match the run's {vocab}"
    )
  for field in _COMPARED_FIELDS:
    if getattr(theirs, field) != getattr(cfg, field):
      raise ValueError(
        f"{where}: gives {field}={getattr(theirs, field)!r}, but the run's "
        f"model has {getattr(cfg, field)!r}; not the base of this run"
      )


def hf_config(
  cfg: DecoderConfig,
  *,
  base_config: Optional[str] = None,
  token_ids: Optional[Dict[str, int]] = None,
  dtype: str = "float32",
) -> Tuple[Dict[str, Any], str]:
  """(config.json dict, model_type) of the merged model: `base_config`'s fields when
  given (checked against the run), else ones built from `cfg`; `vocab_size` counts the
  special-token rows."""
  vocab = cfg.base_vocab_size + cfg.num_extra_tokens
  if base_config is not None:
    conf = dict(_read_base_config(base_config))
    try:
      model_type = hf_import._check_architecture(conf)
    except ValueError as e:
      raise ValueError(f"{base_config}: {e}") from None
    if model_type in layout.GEMMA_FAMILIES:
      raise ValueError(
        f"{base_config}: the {model_type!r} family is not exported: its "
        "sqrt(hidden) embedding scale and (1 + w) norms are folded into the "
        "run's weights and cannot be unfolded exactly"
      )
    if conf.get("vocab_size") != cfg.base_vocab_size:
      raise ValueError(
        f"{base_config}: vocab_size {conf.get('vocab_size')!r}, but the run's "
        f"base vocabulary has {cfg.base_vocab_size} rows; not the base of "
        "this run"
      )
    conf["architectures"] = [ARCHITECTURES[model_type]]
    conf["model_type"] = model_type
  else:
    model_type = _family(cfg)
    conf = _config_from_run(cfg, model_type)
    conf.update(token_ids or {})
  conf["vocab_size"] = vocab
  # Even from a tied base, clara_jax keeps its own output head (the special-token rows
  # of the embedding train without it), so the export is untied unless the run is.
  conf["tie_word_embeddings"] = bool(cfg.tie_embeddings)
  conf["torch_dtype"] = conf["dtype"] = dtype  # the transformers 4 and 5 names
  _check_matches(conf, cfg, vocab, base_config or "the written config")
  return conf, model_type


def _inverse(entry: layout.Entry, flat: Dict[str, np.ndarray], model_type: str) -> np.ndarray:
  """The HF tensor of one plan entry, from the clara_jax arrays it was converted into.

  The import's conversions move elements around (transposes, head reshapes, the split of
  fused projections); running one on the element indices of the HF tensor shows where
  each element went, so putting them back needs no second name table. A conversion that
  changes values (Gemma's folded scales) is refused.
  """
  size = int(np.prod(entry.hf_shape))
  index = np.arange(size, dtype=np.int64).reshape(entry.hf_shape)
  placed = entry.arrays(index)
  out, seen = None, np.zeros(size, bool)
  for part, where in zip(entry.parts, placed):
    where = np.asarray(where)
    if where.dtype != np.int64:
      raise ValueError(
        f"{entry.hf_name}: the {model_type!r} import changes this tensor's "
        "values (a folded scale), which cannot be undone exactly"
      )
    value = flat[part]
    if where.shape != value.shape:
      raise RuntimeError(
        f"{part}: shape {value.shape}, but the import of {entry.hf_name} "
        f"gives {where.shape}; the mapping is out of date"
      )
    if out is None:
      out = np.empty(size, value.dtype)
    out[where.ravel()] = value.ravel()
    seen[where.ravel()] = True
  if not seen.all():
    raise RuntimeError(
      f"{entry.hf_name}: {int((~seen).sum())} elements are not produced by "
      "the import's conversion; it cannot be inverted"
    )
  assert out is not None  # every element was seen, so some part was placed
  return out.reshape(entry.hf_shape)


def merged_tensors(
  run: Run, role: str, model_type: str, dtype: str = "float32"
) -> Dict[str, np.ndarray]:
  """{HF name: array} of the base with `role`'s adapter folded in, in `dtype`."""
  cfg = run.cfg
  params = {k: v.astype(np.float32) for k, v in run.params.items()}
  # fold_adapter adds scale * A @ B into each kernel: running the result without an
  # adapter is running the run's model with this one.
  assert cfg.lora is not None  # `role` is one of cfg.adapters (checked by the caller)
  folded = lora_lib.fold_adapter(lora_lib.unflatten(params), role, cfg.lora)
  base, _ = lora_lib.split_adapters(folded)
  flat = {k: np.asarray(v, np.float32) for k, v in lora_lib.flatten(base).items()}
  extra = cfg.num_extra_tokens
  if extra:
    flat["embedder/base_embedding"] = np.concatenate(
      [flat["embedder/base_embedding"], flat.pop("embedder/extra_embedding")], 0
    )
    if not cfg.tie_embeddings:
      flat["lm_head/base_head"] = np.concatenate(
        [flat["lm_head/base_head"], flat.pop("lm_head/extra_head")], 1
      )
  plan_cfg = cfg.replace(base_vocab_size=cfg.base_vocab_size + extra, num_extra_tokens=0, lora=None)
  plan = layout.tensor_plan(plan_cfg, bool(cfg.tie_embeddings), model_type)
  used = {p for entry in plan for p in entry.parts}
  if used != set(flat):
    raise RuntimeError(
      f"the {model_type!r} tensor plan covers {sorted(used - set(flat))} "
      f"beyond the run's parameters and leaves out "
      f"{sorted(set(flat) - used)}"
    )
  out_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  return {entry.hf_name: _inverse(entry, flat, model_type).astype(out_dtype) for entry in plan}


def _token_ids(export_dir: str, cfg: DecoderConfig) -> Dict[str, int]:
  """bos/eos ids of the run's tokenizer, when the export has one."""
  from clara_jax.data.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

  if cfg.num_extra_tokens < 3 or not any(
    paths.exists(paths.join(export_dir, b.FILENAME)) for b in (Tokenizer, BPETokenizer)
  ):
    return {}
  tok = load_tokenizer(export_dir, cfg.num_extra_tokens - 3)
  return {"bos_token_id": int(tok.bos_id), "eos_token_id": int(tok.eos_id)}


def export_hf(
  workdir: str, role: str, out: str, *, base_config: Optional[str] = None, dtype: str = "float32"
) -> Dict[str, Any]:
  """Writes `role`'s merged model of `workdir`'s export to `out` (config.json +
  model.safetensors).

  Args:
    workdir: a training run's workdir (its `export/` is read).
    role: "compressor", "reasoner" or "generator".
    out: a new or empty directory.
    base_config: the base checkpoint's config.json (or its directory); its fields are
      kept, after checking that they describe the run's model.
    dtype: of the written tensors; the adapter is folded in float32 either way.

  Raises:
    FileNotFoundError: no `workdir/export` (naming it).
    FileExistsError / NotADirectoryError: `out` is not a new or empty directory.
    ValueError: an unknown role or one the run lacks, a Gemma-family run or base config,
      a base config that does not describe the run's model.
  """
  _check_arguments(role, dtype)
  check_new_output_dir(out)
  run = load_run(workdir)
  cfg = run.cfg
  _check_exportable(run, role)
  conf, model_type = hf_config(
    cfg, base_config=base_config, token_ids=_token_ids(run.export_dir, cfg), dtype=dtype
  )
  conf["clara_jax"] = _clara_fields(cfg, role)
  tensors = merged_tensors(run, role, model_type, dtype)
  _write_checkpoint(out, tensors, conf)
  return {
    "out": out,
    "role": role,
    "model_type": model_type,
    "vocab_size": conf["vocab_size"],
    "tensors": len(tensors),
  }


def _check_arguments(role: str, dtype: str) -> None:
  if role not in CLARA_ADAPTERS:
    raise ValueError(f"role {role!r}: expected one of {list(CLARA_ADAPTERS)}")
  if dtype not in OUT_DTYPES:
    raise ValueError(f"dtype {dtype!r}: expected one of {list(OUT_DTYPES)}")


def _check_exportable(run: Run, role: str) -> None:
  """The run has `role`'s adapter and a decoder a Hugging Face family computes."""
  cfg = run.cfg
  if role not in cfg.adapters:
    raise ValueError(
      f"{run.export_dir}: the model has no {role!r} adapter (role); it has {list(cfg.adapters)}"
    )
  _check_base_family(cfg, run.export_dir)
  for field, off in _UNSUPPORTED_FIELDS.items():
    if getattr(cfg, field, off) != off:
      raise ValueError(
        f"{run.export_dir}: DecoderConfig.{field}={getattr(cfg, field)!r} is "
        "not written by this export"
      )


def _clara_fields(cfg: DecoderConfig, role: str) -> Dict[str, Any]:
  """The config's `clara_jax` record: the role and where the special tokens' rows are."""
  return {
    "role": role,
    # Row base_vocab_size + i of the vocabulary is special token i.
    "base_vocab_size": cfg.base_vocab_size,
    "special_tokens": (
      list(FIXED_SPECIAL_TOKENS) + [mem_token(i) for i in range(cfg.num_extra_tokens - 3)]
    )[: cfg.num_extra_tokens],
  }


def _write_checkpoint(out: str, tensors: Dict[str, np.ndarray], conf: Dict[str, Any]) -> None:
  paths.makedirs(out)
  write_safetensors(
    paths.join(out, SINGLE_FILE, absolute=False), tensors, metadata={"format": "pt"}
  )
  # Last: a directory without its config is visibly incomplete.
  paths.write_json(paths.join(out, CONFIG_FILE, absolute=False), conf, indent=2)
