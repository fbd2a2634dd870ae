"""`clara-jax train` and `plan`: a stage config file (`--config=FILE[:variant]` with
`--config.FIELD=VALUE` overrides, absl flags and ml_collections) trained, or planned
ahead of time for a TPU slice."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from clara_jax.cli.common import ArgumentParser, UsageError, positive_int

if TYPE_CHECKING:
  import ml_collections


def train_main(argv: Sequence[str]) -> int:
  """`clara-jax train --config=configs/stage2.py:model=tiny --workdir=DIR
  [--config.optimizer.lr=1e-4 ...] [--coordinator_address=host:port --num_processes=N
  --process_id=I | --distributed]` (absl flags, ml_collections config files)."""
  from absl import flags, logging

  def define(fv: Any) -> None:
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


def _config_flags(argv: Sequence[str], extra_defs: Optional[Callable[[Any], None]] = None) -> Any:
  """Parses `--config=FILE[:variant]` (+ `--config.*` overrides) with absl flags."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  # Left unlocked: an override of a field the file does not define is an error all the
  # same, since ml_collections makes the override flags from the loaded config's fields.
  config_flags.DEFINE_config_file(
    "config", None, "stage config file[:variant]", flag_values=fv, lock_config=False
  )
  if extra_defs:
    extra_defs(fv)
  # ml_collections executes the file by its path; the `configs.base` it imports is the
  # `configs` package installed beside clara_jax, so a config file may live anywhere.
  _check_config_files(argv)
  # config_flags reads the config path from sys.argv to register --config.* overrides.
  saved_argv, sys.argv = sys.argv, ["clara-jax"] + list(argv)
  try:
    fv(sys.argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override's unknown field
    raise _unknown_field(e, argv) from None
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


def _check_config_files(argv: Sequence[str]) -> None:
  """Each `--config=FILE[:variant]` names a file; ml_collections would report a missing
  one as an OSError about "an earlier failure to load"."""
  import os

  for arg in argv:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":")[0]
      if os.path.isdir(path):
        raise IsADirectoryError(f"--config={path}: is a directory; expected a config file")
      if not os.path.exists(path):
        raise FileNotFoundError(f"--config={path}: no such config file")


def _unknown_field(error: Exception, argv: Sequence[str]) -> ValueError:
  """The error of a `--config.*` override naming a field the config does not have: the
  override, and the field ml_collections suggests instead when it has one."""
  # ml_collections raises a KeyError (or an AttributeError holding one) whose text is
  # the unknown name in quotes, then maybe a line `Did you mean "lr" instead of "lrr"?`.
  key = error.args[0] if isinstance(error, AttributeError) and error.args else error
  text = str(key.args[0]) if isinstance(key, KeyError) and key.args else str(key)
  lines = text.splitlines() or [text]
  name = lines[0].strip("'\"")
  overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
  bad = [o for o in overrides if name in o[len("--config.") :].split(".")]
  message = f"{bad[0] if bad else name}: no such config field"
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  if suggestion:
    message += f' (did you mean "{suggestion.group(1)}"?)'
  return ValueError(message)


def plan_main(argv: Sequence[str]) -> int:
  """`clara-jax plan --config=configs/stage2.py:model=mistral_7b --topology=v5e-256
  [--mesh=1,32,8 | --search]`: compile the train step ahead of time with the TPU compiler
  for that slice and print per-device memory, the compiler's cost analysis and a roofline
  estimate. Without --topology: the same on simulated CPU devices (--mesh required).
  `--index_docs=N`: the per-chip memory of an N-document index instead (`_plan_index`)."""
  from absl import flags

  if any(a.split("=", 1)[0] == "--index_docs" for a in argv):
    return _plan_index(argv)
  value = lambda name: next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)
  mesh_arg, topology = value("mesh"), value("topology")
  search = "--search" in argv
  shape = _plan_mesh_shape(mesh_arg, topology, search)
  if shape is None:
    return 2
  if topology is None:
    relaunched = _relaunch_on_cpu_devices(argv, shape)
    if relaunched is not None:
      return relaunched

  def define(fv: Any) -> None:
    flags.DEFINE_string("mesh", None, "d,f,t", flag_values=fv)
    flags.DEFINE_string("topology", None, "a TPU slice, e.g. v5e-256", flag_values=fv)
    flags.DEFINE_bool(
      "search", False, "try meshes, remat policies and micro-batches", flag_values=fv
    )

  fv = _config_flags(argv, define)
  config = fv.config
  config.mesh.shape = shape
  return _run_plan(config, topology, search)


def _plan_mesh_shape(
  mesh_arg: Optional[str], topology: Optional[str], search: bool
) -> Optional[tuple]:
  """The (data, fsdp, tensor) shape of --mesh (default 1,-1,1); None, with the reason
  printed, when it is missing or malformed."""
  if topology is None and (mesh_arg is None or search):
    print(
      "clara-jax plan: --mesh=DATA,FSDP,TENSOR is required without --topology "
      "(--search needs --topology)",
      file=sys.stderr,
    )
    return None
  try:
    shape = tuple(int(x) for x in (mesh_arg or "1,-1,1").split(","))
    if len(shape) != 3:
      raise ValueError
  except ValueError:
    print(
      f"clara-jax plan: --mesh={mesh_arg}: expected three integers DATA,FSDP,TENSOR",
      file=sys.stderr,
    )
    return None
  return shape


def _relaunch_on_cpu_devices(argv: Sequence[str], shape: tuple) -> Optional[int]:
  """Without a TPU slice the plan compiles for `prod(shape)` simulated CPU devices. Their
  count is fixed when jax starts, so unless this process was started with them, the plan
  runs again in a new one that is: its exit code, or None when this process has them."""
  import math
  import os

  flag = f"--xla_force_host_platform_device_count={math.prod(shape)}"
  if flag in os.environ.get("XLA_FLAGS", ""):
    return None
  env = dict(
    os.environ,
    XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(),
    JAX_PLATFORMS="cpu",
  )
  import subprocess

  return subprocess.call([sys.executable, "-m", "clara_jax.cli", "plan", *argv], env=env)


def _run_plan(config: ml_collections.ConfigDict, topology: Optional[str], search: bool) -> int:
  """The memory plan (or with `search`, every configuration that fits) as JSON."""
  from clara_jax.bench import plan

  try:
    if search:
      assert topology is not None  # _plan_mesh_shape refuses --search without --topology
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

  parser = ArgumentParser(prog="clara-jax plan")
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


def _add_train(sub: argparse._SubParsersAction) -> None:
  # Listed for the help only: `main` hands `train` to train_main before argparse runs.
  sub.add_parser(
    "train",
    help="train a stage: --config=configs/STAGE.py[:variant] "
    "--workdir=DIR [--config.FIELD=VALUE ...]",
  )


def _add_plan(sub: argparse._SubParsersAction) -> None:
  # Listed for the help only: `main` hands `plan` to plan_main before argparse runs.
  sub.add_parser(
    "plan",
    help="AOT memory and roofline plan: --config=... "
    "(--topology=v5e-256 [--mesh=D,F,T | --search] | --mesh=D,F,T)",
  )


# Each subcommand's parser, by name (`clara_jax.cli.COMMANDS` orders them).
PARSERS = {"train": _add_train, "plan": _add_plan}
