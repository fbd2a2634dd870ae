#!/usr/bin/env bash
# Installs clara_jax with its test extras into .venv, lints and checks the formatting
# (ruff.toml), type-checks the package (mypy.ini), and runs the whole test suite on the
# CPU (8 simulated devices), in CLARA_TEST_WORKERS (default 2) pytest-xdist workers. Extra
# arguments go to pytest, e.g. `-m slow` for benchmarks, `-n 0` for one process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
install_clara_jax test
cd "$CLARA_ROOT"
python -m ruff check .
python -m ruff format --check .
python -m mypy
python -m pytest -n "${CLARA_TEST_WORKERS:-2}" "$@"
