#!/usr/bin/env bash
# Installs clara_jax into .venv and runs the main job on the embedded default data.
# Extra arguments go to `clara-jax demo` (e.g. --quick, --workdir DIR).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
install_clara_jax
cd "$CLARA_ROOT"
clara-jax demo "$@"
