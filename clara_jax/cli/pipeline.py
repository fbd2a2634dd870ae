"""`clara-jax pipeline`, `demo`, `real-data` and `edit`: a recipe's whole pipeline
judged by its claims (`demo` and `real-data` name the project's recipes), and the causal
edit of a demo run."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _seeds(text: str) -> List[int]:
  try:
    return [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--seeds {text!r} is not a comma-separated list of integers") from None


def _run_recipe(
  command: str,
  recipe: str,
  args: argparse.Namespace,
  data_dir: Optional[str] = None,
  base: Optional[str] = None,
) -> int:
  """Runs the pipeline of `recipe`: 0 when every claim with a target passed, 1 when one
  missed, 128 + the signal when a stage was stopped."""
  from absl import logging

  logging.set_verbosity(logging.WARNING)  # the pipeline prints its own progress
  from clara_jax.pipeline import report, run
  from clara_jax.pipeline.stages import StageStopped
  from clara_jax.train.run_config import ConfigChanged
  from clara_jax.train.workdir_lock import WorkdirLocked

  seeds = _seeds(getattr(args, "seeds", "") or "")
  try:
    if seeds:
      summary = run.run_seeds(recipe, args.workdir, seeds, quick=args.quick)
    else:
      summary = run.run(recipe, args.workdir, args.quick, args.seed, data_dir, base)
  except StageStopped as e:
    print(f"clara-jax {command}: {e}", file=sys.stderr)
    return e.exit_code
  except (WorkdirLocked, ConfigChanged) as e:
    print(f"clara-jax {command}: {e}", file=sys.stderr)
    return 2
  return 0 if report.claims_met(summary) else 1


def _cmd_pipeline(args: argparse.Namespace) -> int:
  return _run_recipe("pipeline", args.recipe, args, args.data_dir, args.base)


def _cmd_demo(args: argparse.Namespace) -> int:
  return _run_recipe("demo", "demo", args)


def _cmd_real_data(args: argparse.Namespace) -> int:
  recipe = "real_tiny" if args.base is None else "real_pretrained"
  return _run_recipe("real-data", recipe, args, args.data_dir, args.base)


def _cmd_edit(args: argparse.Namespace) -> int:
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  from clara_jax import paths
  from clara_jax.eval import edit
  from clara_jax.pipeline import evaluation, recipe, report, world
  from clara_jax.pipeline.stages import DONE_FILE, StageStopped

  if not paths.exists(paths.join(args.workdir, "stage2", DONE_FILE)):
    raise FileNotFoundError(
      f"{args.workdir} has no finished stage2 (run `clara-jax demo --workdir {args.workdir}` first)"
    )
  demo = recipe.load("demo", args.quick)
  try:
    rows = edit.claims(world.run_edit(str(paths.path(args.workdir)), demo, args.seed))
  except StageStopped as e:
    print(f"clara-jax edit: {e}", file=sys.stderr)
    return e.exit_code
  if not demo.judged:
    rows = evaluation.unjudged(rows)
  print(report.format_table(rows))
  return 0 if all(passed is not False for *_, passed in rows) else 1


def _add_run_flags(
  parser: argparse.ArgumentParser, workdir: str, quick_help: str, seed_help: str
) -> None:
  parser.add_argument("--workdir", default=workdir)
  parser.add_argument("--quick", action="store_true", help=quick_help)
  parser.add_argument("--seed", type=int, default=0, help=seed_help)


def _add_seeds(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--seeds",
    default="",
    help="comma-separated seeds: the pipeline at each (WORKDIR/seed<N>), then the claims "
    "over all of them pooled, e.g. the protocol's fresh seeds 100,101,102,103,104 "
    "(the generated world's recipes)",
  )


def _add_data_dir(parser: argparse.ArgumentParser, required: bool) -> None:
  parser.add_argument(
    "--data_dir",
    required=required,
    default=None,
    help="directory holding hotpotqa_dev500.jsonl, nq_open_oracle.jsonl.gz, "
    "clara_pretrain_1k.jsonl (the real-data recipes)",
  )


def _add_base(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--base",
    default=None,
    help="start from a pretrained base: 'smollm2' (SmolLM2-135M-Instruct, fetched once) or "
    "a llama-architecture GGUF file (the recipes with BASE = 'import')",
  )


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
  parser = sub.add_parser(
    "pipeline",
    help="a recipe's whole pipeline: its stages in order (each resumable), its "
    "evaluation and claims table",
  )
  parser.add_argument(
    "--recipe",
    required=True,
    help="a recipe under configs/recipes/ (demo, real_tiny, real_pretrained) or a "
    "directory holding a recipe.py",
  )
  _add_run_flags(
    parser,
    "workdir_pipeline",
    "the recipe's quick variant (a few steps per stage, unjudged)",
    "init, data-order, world and split seed",
  )
  _add_seeds(parser)
  _add_data_dir(parser, required=False)
  _add_base(parser)
  parser.set_defaults(fn=_cmd_pipeline)


def _add_demo(sub: argparse._SubParsersAction) -> None:
  demo = sub.add_parser(
    "demo", help="the whole CLaRa pipeline on the generated world (`pipeline --recipe demo`)"
  )
  _add_run_flags(
    demo, "workdir_demo", "a ~3 minute version for tests", "world, init and data-order seed"
  )
  _add_seeds(demo)
  demo.set_defaults(fn=_cmd_demo)


def _add_edit(sub: argparse._SubParsersAction) -> None:
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


def _add_real_data(sub: argparse._SubParsersAction) -> None:
  real = sub.add_parser(
    "real-data",
    help="the pipeline on the real HotpotQA, NQ and CLaRa-pretraining files (see "
    "DATA_DIR/SOURCES.md): `pipeline --recipe real_tiny`, or real_pretrained with --base",
  )
  _add_data_dir(real, required=True)
  _add_run_flags(
    real,
    "workdir_real_data",
    "a few-minute version for tests",
    "split, shuffle, init and data-order seed",
  )
  _add_base(real)
  real.set_defaults(fn=_cmd_real_data)


# Each subcommand's parser, by name (`clara_jax.cli.COMMANDS` orders them).
PARSERS = {
  "pipeline": _add_pipeline,
  "demo": _add_demo,
  "edit": _add_edit,
  "real-data": _add_real_data,
}
