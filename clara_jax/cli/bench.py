"""`clara-jax bench`: step time, throughput and latency; the comparison with the PyTorch
reference; the document-memory index."""

from __future__ import annotations

import argparse
import json
import sys

from clara_jax.cli.common import positive_int


def _bench_shapes(args: argparse.Namespace) -> dict:
  return {
    "batch": args.batch or 4,
    "candidates": args.candidates,
    "doc_len": args.doc_len,
    "compr_rate": args.compr_rate,
    "k": args.k,
    "iters": args.iters,
  }


def _step_options(args: argparse.Namespace) -> dict:
  return {"dtype": args.dtype, "attention_layout": args.attention}


def _cmd_bench(args: argparse.Namespace) -> int:
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


def _bench_reference(args: argparse.Namespace) -> int:
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


def _bench_index(args: argparse.Namespace) -> int:
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


def _add_bench(sub: argparse._SubParsersAction) -> None:
  bench = sub.add_parser(
    "bench",
    help="step time, tokens/s, MFU and generation latency (JSON lines; `suite` runs them all)",
  )
  bench.add_argument(
    "what", choices=["forward", "step", "stage2", "generate", "suite", "reference", "index"]
  )
  _add_step_flags(bench)
  _add_reference_flags(bench)
  bench.add_argument("--out", default=None, help="reference, index: write the result JSON here")
  _add_index_flags(bench)
  bench.set_defaults(fn=_cmd_bench)


def _add_step_flags(bench: argparse.ArgumentParser) -> None:
  """The model and shapes of forward, step, stage2, generate and suite."""
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


def _add_reference_flags(bench: argparse.ArgumentParser) -> None:
  """`bench reference`: the PyTorch harness and how long it runs."""
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


def _add_index_flags(bench: argparse.ArgumentParser) -> None:
  """`bench index`: the synthetic corpus, its storage dtypes and devices."""
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


# Each subcommand's parser, by name (`clara_jax.cli.COMMANDS` orders them).
PARSERS = {"bench": _add_bench}
