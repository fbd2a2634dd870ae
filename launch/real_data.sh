#!/usr/bin/env bash
# Installs clara_jax into .venv and runs the demo's pipeline on the real QA files
# (HotpotQA, NQ, CLaRa pretraining sample; CLARA_DATA: the directory holding them).
# Extra arguments go to `clara-jax real-data` (e.g. --quick, --workdir DIR, --base smollm2
# to start from the pretrained SmolLM2-135M-Instruct instead of a from-scratch model).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
install_clara_jax
cd "$CLARA_ROOT"
clara-jax real-data --data_dir "${CLARA_DATA:?set CLARA_DATA to the directory of the real QA files}" "$@"
