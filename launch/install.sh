#!/usr/bin/env bash
# Installs clara_jax into .venv with the extra named in CLARA_EXTRA (e.g. tpu, test).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
install_clara_jax "${CLARA_EXTRA:-}"
