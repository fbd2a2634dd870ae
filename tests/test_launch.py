"""TPU pod launcher: --dry_run prints the exact gcloud commands."""

import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_pod.py")
BASE = ["--name", "clara", "--zone", "us-east5-a", "--dry_run"]


def _run(*args):
  out = subprocess.run(
    [sys.executable, SCRIPT, *args, *BASE], capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.strip().splitlines()]


def test_create_setup_delete():
  (create,) = _run("create", "--type", "v5p-256", "--spot")
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert "--accelerator-type=v5p-256" in create and "--spot" in create
  copy, install = _run("setup")
  assert copy[4] == "scp" and copy[6] == ROOT and copy[7] == "clara:~/clara_jax"
  assert "--worker=all" in copy and "--worker=all" in install
  assert "CLARA_EXTRA=tpu bash launch/install.sh" in install[-1]
  (delete,) = _run("delete")
  assert delete[4] == "delete" and "--quiet" in delete


def test_train_runs_on_all_workers_with_per_host_logs():
  (ssh,) = _run(
    "train",
    "--config",
    "configs/stage2.py:model=mistral_7b",
    "--workdir",
    "gs://b/run",
    "--run",
    "s2",
    "--override",
    "optimizer.lr=1e-4",
  )
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  command = ssh[-1]
  assert command.startswith("--command=cd ~/clara_jax")
  assert "clara-jax train --config=configs/stage2.py:model=mistral_7b" in command
  assert "--workdir=gs://b/run --distributed --config.optimizer.lr=1e-4" in command
  assert "> logs/s2/host_$(hostname).log 2>&1" in command


def test_sweep_launches_one_job_per_point():
  jobs = _run(
    "sweep", "--config", "configs/stage2.py:model=mistral_7b", "--workdir", "gs://b/sweep"
  )
  assert len(jobs) == 4  # configs/stage2.py: 2 learning rates x 2 temperatures
  commands = [job[-1] for job in jobs]
  assert all("--config.optimizer.lr=" in c and "--config.clara.temperature=" in c for c in commands)
  assert len({c.split("--workdir=")[1].split()[0] for c in commands}) == 4


def test_every_gcloud_command_names_the_project():
  """--project reaches each command, the copies (setup, logs) as well as the ssh ones."""
  project = ["--project", "p1"]
  commands = _run("setup", *project) + _run("logs", "--run", "s2", *project)
  assert commands and all("--project=p1" in command for command in commands)
  (logs,) = _run("logs", "--run", "s2")
  assert (
    logs[4] == "scp"
    and logs[6] == "clara:~/clara_jax/logs/s2"
    and not any(a.startswith("--project") for a in logs)
  )
