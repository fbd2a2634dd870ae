"""Exporting a trained run in the official CLaRa (PyTorch) format: the inverse of
`clara_import`.

    info = export_official_clara("runs/stage2", "clara_official")

writes, as the official `CLaRa.save_pretrained` does for a LoRA model:
* `adapters.pth`: {official adapter name: PEFT LoRA state dict}, the names
  `encoder_adapter` (compressor), `query_reasoner_adapter` (reasoner) and
  `decoder_adapter` (generator), keys as transformers' `get_adapter_state_dict` names them
  on a plain `AutoModelForCausalLM` (no PEFT wrapper, hence no `base_model.model.`
  prefix): `model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight` and
  `model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight`, A [r, in], B [out, r];
* `decoder_first_last_layers.pth`: `model.embed_tokens.weight` and `lm_head.weight`
  [V + n_mem + 3, D], the added rows in the order <MEM0>..<MEM{n-1}>, <AE>, <ENC>, <SEP>;
* `config.json`: every field of the official `CLaRaConfig`.
The key names, shapes and row order are those of `clara_jax.weights.layout`, which the
import reads too.

The frozen base is not written (the official model loads it from `decoder_model_name`),
so the run's base must be that checkpoint unchanged. Tensors keep the run's parameter
dtype and are plain dicts of tensors, readable with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import io
from typing import TYPE_CHECKING, Any, Dict, Tuple

import jax
import numpy as np

from clara_jax import paths
from clara_jax.data.tokenizer import num_special_tokens
from clara_jax.model import layout as param_layout
from clara_jax.model import lora as lora_lib
from clara_jax.model.config import DecoderConfig
from clara_jax.weights import layout
from clara_jax.weights.clara_import import ADAPTERS_FILE, FIRST_LAST_FILE, positive_int
from clara_jax.weights.export import load_params
from clara_jax.weights.hf_import import CONFIG_FILE, path_in_directory, read_json_object
from clara_jax.weights.layout import OFFICIAL_ADAPTER_NAMES, official_lora_keys

if TYPE_CHECKING:
  import torch

EXPORT_DIR = "export"  # where training writes a run's final model
CLARA_FILE = "clara.json"  # the CLaRa lengths a run was trained with
# The official LoraConfig: r = lora_r, lora_alpha = 2 * r, so every adapter adds 2 * A B.
OFFICIAL_LORA_SCALE = 2.0
# The base the released CLaRa models were trained on (CLaRaConfig.compr_base_model_name).
DEFAULT_BASE_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"


@dataclasses.dataclass
class Run:
  """A finished training run's model: its export directory, config, unrolled params
  (numpy, the stored dtype) and its recorded CLaRa settings (clara.json, or {})."""

  export_dir: str
  cfg: DecoderConfig
  params: Dict[str, np.ndarray]  # flat, '/'-joined paths
  recorded: Dict[str, Any]


def check_new_output_dir(out: str) -> None:
  """`out` must be absent or an empty directory: an export never overwrites anything."""
  if paths.isfile(out):
    raise NotADirectoryError(f"{out}: is a file; expected a new or empty directory")
  if paths.isdir(out):
    entries = paths.listdir(out)
    if entries:
      raise FileExistsError(
        f"{out}: not empty ({len(entries)} entries, e.g. "
        f"{entries[0]!r}); give a new or empty directory (nothing in it "
        "is overwritten)"
      )


def load_run(workdir: str) -> Run:
  """Reads `workdir/export` (what training writes at its last step)."""
  export_dir = path_in_directory(workdir, EXPORT_DIR, "a training workdir")
  if not paths.isdir(export_dir):
    raise FileNotFoundError(
      f"{export_dir}: missing; expected the export/ directory a "
      "training run writes at its last step (config.json, params/)"
    )
  cfg, params = load_params(export_dir)
  # The files name one tensor per block; a scanned run's stacked leaves are split here.
  params = param_layout.to_unrolled(jax.device_get(params))
  flat = {k: np.asarray(v) for k, v in lora_lib.flatten(params).items()}
  recorded: Dict[str, Any] = {}
  clara_path = paths.join(export_dir, CLARA_FILE, absolute=False)
  if paths.exists(clara_path):
    recorded = read_json_object(clara_path)
  return Run(export_dir, cfg.replace(scan_layers=False), flat, recorded)


def _check_base_family(cfg: DecoderConfig, what: str) -> None:
  """Gemma-family bases have their sqrt(hidden) input scale and (1 + w) norms folded into
  the imported weights; float32 cannot undo that exactly, so such runs are refused."""
  post_norms = getattr(cfg, "post_norms", False)
  if cfg.hidden_act == "gelu_tanh" or post_norms:
    family = "Gemma-2" if post_norms else "Gemma"
    raise ValueError(
      f"{what}: the run's base is a {family} model (hidden_act "
      f"{cfg.hidden_act!r}{', post_norms' if post_norms else ''}), whose "
      "sqrt(hidden) embedding scale and (1 + w) norms are folded into its "
      f"weights and cannot be unfolded exactly; {family} runs are not exported"
    )


def _to_torch(array: np.ndarray) -> torch.Tensor:
  import torch

  array = np.ascontiguousarray(array)
  if array.dtype.name == "bfloat16":  # numpy has no bfloat16: move the bits through int16
    return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(array.copy())


def _torch_save(path: str, obj: Dict) -> None:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      "writing official CLaRa checkpoints needs torch: pip install 'clara_jax[import]'"
    ) from e
  buffer = io.BytesIO()
  torch.save(obj, buffer)
  paths.write_atomic(path, [buffer.getvalue()])


def _adapter_state(run: Run, role: str, b_factor: float) -> Dict[str, Any]:
  """The official state dict of one adapter: clara_jax a [in..., r] / b [r, out...] ->
  torch A [r, in] / B [out, r], B times `b_factor` (the alpha correction)."""
  assert run.cfg.lora is not None  # as in `official_lora_keys`
  r = run.cfg.lora.rank
  state = {}
  for key, path, shape in official_lora_keys(run.cfg, role):
    value = layout.lora_to_official(path, run.params[path], r)
    if tuple(value.shape) != shape:
      raise RuntimeError(
        f"{path}: {value.shape} does not give the official {key} {shape}; "
        "the mapping is out of date with the Decoder"
      )
    if path.endswith("/b") and b_factor != 1.0:
      value = (value.astype(np.float32) * np.float32(b_factor)).astype(value.dtype)
    state[key] = _to_torch(value)
  return state


def _untrained(run: Run, role: str) -> bool:
  """Every B factor exactly zero: the adapter computes the base model (as initialised)."""
  return all(
    not np.any(run.params[path])
    for _, path, _ in official_lora_keys(run.cfg, role)
    if path.endswith("/b")
  )


def _first_last(run: Run, n_mem: int) -> Dict[str, Any]:
  cfg, p = run.cfg, run.params
  v0 = cfg.base_vocab_size
  # The importer reads clara_jax extra row i from official row rows[i]; writing row k from
  # the extra row whose rows[i] is v0 + k is exactly its inverse.
  order = np.argsort(layout.official_rows(v0, n_mem) - v0)
  embed = np.concatenate([p["embedder/base_embedding"], p["embedder/extra_embedding"][order]], 0)
  if cfg.tie_embeddings:
    head = embed
  else:
    head = np.concatenate([p["lm_head/base_head"].T, p["lm_head/extra_head"].T[order]], 0)
  return {layout.EMBEDDING: _to_torch(embed), layout.LM_HEAD: _to_torch(head)}


def official_config(
  *,
  base_model: str,
  doc_max_length: int,
  compr_rate: int,
  lora_r: int,
  training_stage: str,
  generation_top_k: int,
) -> Dict[str, Any]:
  """The official CLaRaConfig's fields, as its training script sets them (LoRA adapters on
  the decoder itself, one distinct <MEM{i}> token per memory slot, no BERT compressor)."""
  return {
    "model_type": "CLaRa",
    "architectures": ["CLaRa"],
    "auto_map": {"AutoConfig": "modeling_clara.CLaRaConfig", "AutoModel": "modeling_clara.CLaRa"},
    "decoder_model_name": base_model,
    "compr_base_model_name": base_model,
    "doc_max_length": doc_max_length,
    "compr_rate": compr_rate,
    "quantization": "no",
    "sep": True,
    "compr_model_name": None,
    "compr_n_layers": 5,
    "compr_every_n_layer": None,
    "compr_rms_norm": False,
    "compr_mlp_hidden_dim": 8096,
    "compr_use_mlp": False,
    "compr_linear_type": "concat",
    "lora": True,
    "lora_compressor": False,
    "lora_r": lora_r,
    "lora_r_compressor": lora_r,
    "training_form": "both_separately",
    "training_stage": training_stage,
    "generation_top_k": generation_top_k,
    "load_adapters": True,
    "kbtc_training": False,
    "optimize_mem_tokens": True,
    "different_mem_tokens": True,
    # None: transformers' default attention; the training script's flash_attention_2
    # would need a GPU build just to load the checkpoint.
    "attn_implementation": None,
    "_attn_implementation_autoset": True,
    "ae_mode": "token",
    "max_new_tokens": 128,
    "stage2_retrieval_top_n": 1,
    "load_pretrained_checkpoint": False,
    "device_map": None,
    "pure_inference": False,
  }


def export_official_clara(
  workdir: str, out: str, *, base_model: str = DEFAULT_BASE_MODEL
) -> Dict[str, Any]:
  """Writes `workdir`'s exported model to `out` in the official CLaRa format.

  Args:
    workdir: a training run's workdir (its `export/` and `export/clara.json` are read).
    out: a new or empty directory.
    base_model: the HF name or path of the frozen base, written as the config's
      `decoder_model_name` (the official model loads its base from there).

  Returns:
    A summary: the adapters written, those left out and why, `training_stage`, `n_mem`,
    the memory-token rows dropped and the factor B was rescaled by (1.0: none).

  The compressor and generator are written whenever the run has them. The reasoner is
  left out while untrained (every B zero), as in the official checkpoints before stage2:
  the official loader then starts it from the compressor at stage2. `training_stage` is "stage2" when the reasoner is written, else
  "stage1": with either, the official `from_pretrained` loads every adapter in the file.

  Raises:
    FileNotFoundError: no `workdir/export` (naming it).
    FileExistsError / NotADirectoryError: `out` is not a new or empty directory.
    ValueError: no clara.json lengths, a run without adapters, a from-scratch or Gemma
      base, or fewer special-token rows than the lengths need.
  """
  check_new_output_dir(out)
  run = load_run(workdir)
  cfg = run.cfg
  doc_max_length, compr_rate, n_mem = _clara_lengths(run)
  assert cfg.lora is not None  # checked by `_clara_lengths`
  b_factor = cfg.lora.scale / OFFICIAL_LORA_SCALE
  adapters, left_out = _official_adapters(run, b_factor)
  stage = "stage2" if "query_reasoner_adapter" in adapters else "stage1"
  top_k = run.recorded.get("k", 1)
  config = official_config(
    base_model=base_model,
    doc_max_length=doc_max_length,
    compr_rate=compr_rate,
    lora_r=cfg.lora.rank,
    training_stage=stage,
    generation_top_k=top_k if isinstance(top_k, int) and top_k >= 1 else 1,
  )
  _write_official(out, adapters, _first_last(run, n_mem), config)
  return {
    "out": out,
    "adapters": list(adapters),
    "left_out": left_out,
    "training_stage": stage,
    "n_mem": n_mem,
    "dropped_mem_rows": cfg.num_extra_tokens - 3 - n_mem,
    "lora_b_rescaled_by": b_factor,
  }


def _clara_lengths(run: Run) -> Tuple[int, int, int]:
  """(doc_max_length, compr_rate, n_mem) of a run the official format can hold: adapters
  over a published, non-Gemma base, with rows for every memory token."""
  cfg = run.cfg
  clara_path = paths.join(run.export_dir, CLARA_FILE, absolute=False)
  if not paths.exists(clara_path):
    raise FileNotFoundError(
      f"{clara_path}: missing; the official config.json needs the "
      "run's doc_max_length and compr_rate"
    )
  needed = "; the official config.json needs it"
  doc_max_length = positive_int(run.recorded, "doc_max_length", clara_path, needed)
  compr_rate = positive_int(run.recorded, "compr_rate", clara_path, needed)
  if run.recorded.get("stage") == "lm":
    raise ValueError(
      f"{clara_path}: stage 'lm' trained the base from scratch; the official "
      "format holds adapters and embeddings over a published base only"
    )
  if cfg.lora is None:
    raise ValueError(
      f"{run.export_dir}: the model has no LoRA adapters (lora: null); the "
      "official format is adapters over a frozen base"
    )
  _check_base_family(cfg, run.export_dir)
  n_mem = doc_max_length // compr_rate
  if n_mem < 1:
    raise ValueError(
      f"{clara_path}: doc_max_length {doc_max_length} // compr_rate {compr_rate} is 0 memory tokens"
    )
  if cfg.num_extra_tokens < num_special_tokens(n_mem):
    raise ValueError(
      f"{run.export_dir}: the model has {cfg.num_extra_tokens} special-token "
      f"rows, but <ENC>, <SEP>, <AE> and {n_mem} memory tokens (doc_max_length"
      f" {doc_max_length} // compr_rate {compr_rate}) need {num_special_tokens(n_mem)}"
    )
  return doc_max_length, compr_rate, n_mem


def _official_adapters(run: Run, b_factor: float) -> Tuple[Dict[str, Any], Dict[str, str]]:
  """({official name: state dict} of the adapters written, {role: why} of those not)."""
  adapters, left_out = {}, {}
  for role in run.cfg.adapters:
    if role not in OFFICIAL_ADAPTER_NAMES:
      left_out[role] = "no official counterpart"
    elif role == "reasoner" and _untrained(run, role):
      left_out[role] = "untrained (every B is zero)"
    else:
      adapters[OFFICIAL_ADAPTER_NAMES[role]] = _adapter_state(run, role, b_factor)
  if not adapters:
    raise ValueError(
      f"{run.export_dir}: none of the adapters {list(run.cfg.adapters)} has an "
      f"official counterpart ({sorted(OFFICIAL_ADAPTER_NAMES)})"
    )
  return adapters, left_out


def _write_official(out: str, adapters: Dict, first_last: Dict, config: Dict[str, Any]) -> None:
  paths.makedirs(out)
  _torch_save(paths.join(out, ADAPTERS_FILE, absolute=False), adapters)
  _torch_save(paths.join(out, FIRST_LAST_FILE, absolute=False), first_last)
  # Last: a directory without its config is visibly incomplete.
  paths.write_json(paths.join(out, CONFIG_FILE, absolute=False), config, indent=2)
