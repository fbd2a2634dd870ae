"""`clara-jax evaluate`, `lens`, `index` and `answer`: a trained stage's model at work."""

from __future__ import annotations

import argparse
import json

from clara_jax.cli.common import check_out_file, load_model, positive_int
from clara_jax.progress import Progress


def _cmd_evaluate(args: argparse.Namespace) -> int:
  from clara_jax.eval.baselines import gold_counts_of
  from clara_jax.eval.evaluate import evaluate, load_rows

  # Every input is read and checked before the model loads: bad data fails at once.
  check_out_file(args.out)
  rows = load_rows(args.data, limit=args.limit)
  counts = gold_counts_of(load_rows(args.train_data)) if args.train_data else None
  summary = evaluate(
    load_model(args.workdir),
    rows,
    k=args.k,
    max_new_tokens=args.max_new_tokens,
    out_path=args.out,
    gold_counts=counts,
    progress=Progress("evaluate", "question"),
  )
  print(json.dumps(summary))
  return 0


def _cmd_lens(args: argparse.Namespace) -> int:
  from clara_jax.eval.evaluate import load_rows, run_lens

  # Every input is read and checked before the models load: bad data fails at once.
  check_out_file(args.out)
  rows = load_rows(args.data, limit=args.limit)
  clues = None
  if args.manifest:
    from clara_jax.data.synth import clues_for

    clues = clues_for(args.manifest, [r["question"] for r in rows])
  models = {"main": load_model(args.workdir)}
  if args.compare:
    models["compare"] = load_model(args.compare)
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


def _cmd_index(args: argparse.Namespace) -> int:
  from clara_jax import paths
  from clara_jax.data.formats import check_output_dir, read_corpus
  from clara_jax.infer.index import MemoryIndex, build_index

  # The corpus and --out are checked before the model loads: bad input fails at once.
  check_output_dir(args.out)
  docs = read_corpus(args.corpus)
  model = load_model(args.workdir)
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


def _cmd_answer(args: argparse.Namespace) -> int:
  """Answers every question of --questions from the index, --batch at a time, into the
  JSONL file --out (written whole at the end, or not at all)."""
  from clara_jax import paths
  from clara_jax.data.formats import read_questions, write_jsonl_atomic
  from clara_jax.infer.index import MemoryIndex, iter_answers, read_meta

  # Inputs are checked before the model and the index load: bad input fails at once.
  check_out_file(args.out)
  if paths.exists(args.out):
    raise FileExistsError(
      f"{args.out}: exists; answers are never written over (remove it or choose another --out)"
    )
  rows = read_questions(args.questions)
  meta = read_meta(args.index)
  model = load_model(args.workdir)
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


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
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


def _add_lens(sub: argparse._SubParsersAction) -> None:
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


def _add_index(sub: argparse._SubParsersAction) -> None:
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


def _add_answer(sub: argparse._SubParsersAction) -> None:
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


# Each subcommand's parser, by name (`clara_jax.cli.COMMANDS` orders them).
PARSERS = {
  "evaluate": _add_evaluate,
  "lens": _add_lens,
  "index": _add_index,
  "answer": _add_answer,
}
