"""`clara-jax demo`, `edit` and `real-data`: the whole pipeline, its causal edit, and the
pipeline on real data, each judged by its claims."""

from __future__ import annotations

import sys


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


def _add_demo(sub) -> None:
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


def _add_edit(sub) -> None:
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


def _add_real_data(sub) -> None:
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


# Each subcommand's parser, by name (`clara_jax.cli.COMMANDS` orders them).
PARSERS = {"demo": _add_demo, "edit": _add_edit, "real-data": _add_real_data}
