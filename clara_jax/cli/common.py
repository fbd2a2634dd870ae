"""What the `clara-jax` subcommands share: the argument parser whose usage errors are
one line, count validators, loading a trained stage's model, checks on output paths."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable, NoReturn

if TYPE_CHECKING:
  from clara_jax.infer.api import ClaraModel


class UsageError(Exception):
  """A command-line usage error: reported like bad input, on one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors raise UsageError (one line from `main`, exit 2) instead
  of printing the usage block and exiting; subcommand parsers are of this class too."""

  def error(self, message: str) -> NoReturn:
    raise UsageError(message)


def _int_at_least(minimum: int) -> Callable[[str], int]:
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


def load_model(workdir: str) -> ClaraModel:
  """The ClaraModel of a trained stage's workdir (its export/), with errors that say
  which of the two is missing."""
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


def check_out_file(path: str) -> None:
  """A summary file named by --out: refused now if it is a directory, not after the
  whole run."""
  from clara_jax import paths

  if paths.isdir(path):
    raise IsADirectoryError(f"{path}: is a directory; expected a file to write")


def one_line(error: BaseException) -> str:
  """An exception's message on one line (a KeyError's: the key it missed)."""
  text = str(error).strip() or type(error).__name__
  if isinstance(error, KeyError) and error.args:
    text = f"missing key {error.args[0]!r}"
  return " ".join(text.split())
