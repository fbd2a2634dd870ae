"""`clara-jax synth` and `convert`: training data, generated or converted from QA sets."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict

from clara_jax.cli.common import UsageError, non_negative_int, one_line, positive_int
from clara_jax.progress import Progress


def _cmd_synth(args: argparse.Namespace) -> int:
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
  kinds: Dict[str, int] = {}
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


def _cmd_convert(args: argparse.Namespace) -> int:
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
    print(f"clara-jax convert: {one_line(e)}", file=sys.stderr)
    return 2
  for reason in report.reasons:
    print(f"skipped: {reason}", file=sys.stderr)
  print(report.summary())
  print(json.dumps(report.to_dict()))
  return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
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


def _add_convert(sub: argparse._SubParsersAction) -> None:
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


# Each subcommand's parser, by name (`clara_jax.cli.COMMANDS` orders them).
PARSERS = {"synth": _add_synth, "convert": _add_convert}
