"""Test set-up: 8 simulated CPU devices, float32, and fast (unoptimised) XLA compiles.

The environment must be set before jax is imported anywhere, hence at module top.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Tests compile many small programs once each; optimisation passes cost more than they save.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
  """`demo.run(quick=True)` once per session: (workdir, summary, logged lines). Shared by
  test_demo and test_colab, whose notebook resumes from it instead of training again."""
  from clara_jax import demo
  workdir = str(tmp_path_factory.mktemp("demo"))
  lines = []
  summary = demo.run(workdir, quick=True, log=lines.append)
  return workdir, summary, lines


# Under pytest-xdist (`launch/test.sh` runs two workers with `--dist loadgroup`) each
# module stays on one worker, so its module fixtures compile once; the notebook test joins
# the demo tests, whose session fixture it resumes.
_SHARED_GROUPS = {"test_colab": "test_demo"}


def pytest_collection_modifyitems(config, items):
  for item in items:
    module = item.module.__name__.rsplit(".", 1)[-1]
    item.add_marker(pytest.mark.xdist_group(_SHARED_GROUPS.get(module, module)))
