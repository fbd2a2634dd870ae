#!/usr/bin/env python3
"""Run clara_jax on a Cloud TPU VM slice: create it, copy the code, install, train on
every worker, resume after preemption, launch a sweep, delete it.

    python launch/tpu_pod.py create --name clara --zone us-east5-a --type v5p-256
    python launch/tpu_pod.py setup  --name clara --zone us-east5-a
    python launch/tpu_pod.py train  --name clara --zone us-east5-a \\
        --config configs/stage2.py:model=mistral_7b --workdir gs://bucket/runs/stage2
    python launch/tpu_pod.py sweep  --name clara --zone us-east5-a \\
        --config configs/stage2.py:model=mistral_7b --workdir gs://bucket/sweeps/stage2
    python launch/tpu_pod.py delete --name clara --zone us-east5-a

Every command accepts --dry_run, which prints the exact gcloud commands instead of
running them. `train` is idempotent: after a preemption, run it again (recreating the
slice if it is gone) and the job resumes from the checkpoints in --workdir. Logs: each
worker writes `logs/<run>/host_<worker>.log` on its disk, and `logs` fetches them.
Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "clara_jax"


def _gcloud(args: argparse.Namespace, *rest: str) -> List[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", *rest, args.name, f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  return cmd


def _ssh(args: argparse.Namespace, command: str, worker: str = "all") -> List[str]:
  return _gcloud(args, "ssh") + [f"--worker={worker}", f"--command={command}"]


def create(args) -> List[List[str]]:
  cmd = _gcloud(args, "create") + [f"--accelerator-type={args.type}", f"--version={args.runtime}"]
  if args.spot:
    cmd.append("--spot")
  return [cmd]


def _scp(args: argparse.Namespace, source: str, dest: str) -> List[str]:
  """Copies `source` to `dest` (directories recursively) on every worker; scp takes SRC
  then NAME:DEST, so it does not fit _gcloud's NAME-first shape."""
  scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  scp += [source, dest, "--worker=all", f"--zone={args.zone}"]
  return scp + ([f"--project={args.project}"] if args.project else [])


def setup(args) -> List[List[str]]:
  copy = _scp(args, ROOT, f"{args.name}:~/{REMOTE_DIR}")
  install = _ssh(args, f"cd ~/{REMOTE_DIR} && CLARA_EXTRA=tpu bash launch/install.sh")
  return [copy, install]


def _train_command(config: str, workdir: str, overrides: Dict[str, object], run: str) -> str:
  flags = [f"--config={config}", f"--workdir={workdir}", "--distributed"]
  flags += [f"--config.{k}={v}" for k, v in overrides.items()]
  log = f"logs/{run}/host_$(hostname).log"
  return (
    f"cd ~/{REMOTE_DIR} && mkdir -p logs/{run} && source .venv/bin/activate && "
    f"clara-jax train {' '.join(shlex.quote(f) for f in flags)} > {log} 2>&1"
  )


def train(args) -> List[List[str]]:
  overrides = dict(o.split("=", 1) for o in args.override)
  return [_ssh(args, _train_command(args.config, args.workdir, overrides, args.run))]


def sweep_points(config: str) -> List[Dict[str, object]]:
  """The points of the `sweep(add)` function defined beside a config file."""
  path = os.path.join(ROOT, config.split(":")[0])
  sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise SystemExit(f"{path}: defines no sweep(add)")
  points: List[Dict[str, object]] = []
  module.sweep(lambda **overrides: points.append(overrides))
  return points


def sweep(args) -> List[List[str]]:
  """One job per sweep point, one after another on the slice (each in its own workdir)."""
  commands = []
  for i, point in enumerate(sweep_points(args.config)):
    name = "_".join(f"{k.split('.')[-1]}{v}" for k, v in point.items())
    workdir = f"{args.workdir.rstrip('/')}/{i:02d}_{name}"
    commands.append(_ssh(args, _train_command(args.config, workdir, point, f"{args.run}_{i:02d}")))
  return commands


def logs(args) -> List[List[str]]:
  return [_scp(args, f"{args.name}:~/{REMOTE_DIR}/logs/{args.run}", f"logs_{args.run}")]


def delete(args) -> List[List[str]]:
  return [_gcloud(args, "delete") + ["--quiet"]]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("action", choices=["create", "setup", "train", "sweep", "logs", "delete"])
  parser.add_argument("--name", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None)
  parser.add_argument("--type", default="v5p-256", help="accelerator type (create)")
  parser.add_argument("--runtime", default="v2-alpha-tpuv5", help="TPU VM image (create)")
  parser.add_argument("--spot", action="store_true", help="preemptible capacity (create)")
  parser.add_argument("--config", default="configs/stage2.py:model=mistral_7b")
  parser.add_argument("--workdir", default="gs://YOUR_BUCKET/clara_jax/run")
  parser.add_argument("--run", default="run", help="log folder name")
  parser.add_argument(
    "--override",
    action="append",
    default=[],
    help="FIELD=VALUE config override, e.g. optimizer.lr=1e-4",
  )
  parser.add_argument("--dry_run", action="store_true", help="print, do not run")
  args = parser.parse_args(argv)
  commands = {
    "create": create,
    "setup": setup,
    "train": train,
    "sweep": sweep,
    "logs": logs,
    "delete": delete,
  }[args.action](args)
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      code = subprocess.call(cmd)
      if code:
        return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
