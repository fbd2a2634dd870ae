"""Test set-up: 8 simulated CPU devices, float32, and fast (unoptimised) XLA compiles.

The environment must be set before jax is imported anywhere, hence at module top.
"""

import os
import sys
import tempfile

import pytest

# Helper modules in tests/ (report_checks, train_cli, ...) import from subdirectories too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests reach gs:// only through the local GCS emulator (`gcs` below), which epath can use
# through gcsfs but not through TensorFlow's GCS client. epath decides once per process.
os.environ["EPATH_USE_TF"] = "false"

# One XLA compilation cache for the whole run: both xdist workers (they inherit the
# controller's environment), every `clara-jax` subprocess and notebook kernel. Tests build
# the same tiny programs again and again in fresh jitted closures and fresh processes;
# compiling is half of a short subprocess run's time. The cache key covers the program,
# the compile options and the jax/XLA versions, so a reused directory never serves a stale
# executable. (A cache hit still counts as a backend compile in tests/compile_count.py:
# jax reports the lookup under the same event.)
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"clara_jax_tests_xla_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# Tests compile many small programs once each; optimisation passes cost more than they save.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def lm_text_file(tmp_path_factory):
  """The lm stage's training text for tests that run `clara-jax train` (train_cli)."""
  from train_cli import write_text_file

  return write_text_file(tmp_path_factory.mktemp("lm") / "lm.txt")


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
  """The demo recipe's quick pipeline (`clara-jax demo --quick`) once per session (per xdist worker): (workdir, summary, logged
  lines). Shared by the tests of test_demo.py (one file, so one worker under
  `--dist loadfile`), whose notebook test resumes from it instead of training again."""
  from clara_jax.pipeline import run

  workdir = str(tmp_path_factory.mktemp("demo"))
  lines = []
  summary = run.run("demo", workdir, quick=True, log=lines.append)
  return workdir, summary, lines


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS emulator on 127.0.0.1 (tests/gcs_emulator.py), once per session (per xdist
  worker: gcsfs keeps one client per process), with this process's clients pointed at it;
  yields its URL (`client_env(url)` points subprocesses at it)."""
  from gcs_emulator import client_env, emulator

  with emulator(str(tmp_path_factory.mktemp("gcs") / "emulator.log")) as url:
    os.environ.update(client_env(url))
    yield url
