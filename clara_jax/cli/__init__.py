"""`clara-jax` command line: thin wrappers from flags to library calls.

One module per group of subcommands, each with its commands and their parsers (`PARSERS`):
`train` (train, plan), `pipeline` (pipeline, demo, real-data, edit), `data` (synth, convert), `bench`,
`infer` (evaluate, lens, index, answer) and `weights` (info, imports and exports);
`common` holds what they share.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from clara_jax.cli import bench, data, infer, pipeline, train, weights
from clara_jax.cli.common import (
  ArgumentParser,
  UsageError,
  non_negative_int,
  one_line,
  positive_int,
)
from clara_jax.cli.train import plan_main, train_main

__all__ = [
  "COMMANDS",
  "USAGE_ERRORS",
  "UsageError",
  "build_parser",
  "main",
  "non_negative_int",
  "plan_main",
  "positive_int",
  "train_main",
]

# The parser's description: the first line of this docstring.
DESCRIPTION = "`clara-jax` command line: thin wrappers from flags to library calls."

# The subcommands in the order `clara-jax --help` and an unknown command's error list them.
COMMANDS = (
  "train",
  "plan",
  "pipeline",
  "demo",
  "edit",
  "real-data",
  "synth",
  "info",
  "bench",
  "evaluate",
  "lens",
  "index",
  "answer",
  "import-clara",
  "export-clara",
  "export-hf",
  "convert",
  "import-hf",
  "import-gguf",
  "fetch-base",
)
_GROUPS = (train, pipeline, data, bench, infer, weights)


def build_parser() -> argparse.ArgumentParser:
  parser = ArgumentParser(prog="clara-jax", description=DESCRIPTION)
  sub = parser.add_subparsers(dest="command", required=True)
  adders = {name: add for group in _GROUPS for name, add in group.PARSERS.items()}
  if set(adders) != set(COMMANDS):  # a command added to a group but not to COMMANDS
    raise AssertionError(f"subcommands not in COMMANDS: {sorted(set(adders) ^ set(COMMANDS))}")
  for name in COMMANDS:
    adders[name](sub)
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
    return _report(e, command)


def _report(error: Exception, command: str) -> int:
  """Prints the one line of the error contract for `error`; its exit code."""
  from absl import flags

  prefix = f"clara-jax {command}" if command else "clara-jax"
  if isinstance(error, USAGE_ERRORS + (flags.Error,)):
    print(f"{prefix}: {one_line(error)}", file=sys.stderr)
    return 2
  print(
    f"{prefix}: failed: {type(error).__name__}: {one_line(error)} (run again "
    f"with --debug for the traceback)",
    file=sys.stderr,
  )
  return 1
