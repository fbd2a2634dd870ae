# Sourced by the launch scripts: creates (once) and activates the project's virtualenv,
# then installs clara_jax with the requested extras under the pinned constraints.
# Usage: source launch/env.sh; install_clara_jax [extra]
set -euo pipefail
CLARA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLARA_VENV="${CLARA_VENV:-$CLARA_ROOT/.venv}"

# The test extras need about 4 GiB in the virtualenv plus pip's unpacking space; a full
# disk otherwise surfaces only as pip's "[Errno 28] No space left on device".
warn_if_disk_short() {
  local dir="$1" need_kib=$((5 * 1024 * 1024)) free_kib
  free_kib="$(df -Pk "$(dirname "$dir")" | awk 'NR==2 {print $4}')"
  if [[ -n "$free_kib" && "$free_kib" -lt "$need_kib" ]]; then
    echo "clara_jax install: only $((free_kib / 1024)) MiB free under $(dirname "$dir")" \
      "(about 5 GiB needed for the venv and pip's temporary files)" >&2
  fi
}

install_clara_jax() {
  local extra="${1:-}"
  if [[ ! -x "$CLARA_VENV/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$CLARA_VENV"
  fi
  # shellcheck disable=SC1091
  source "$CLARA_VENV/bin/activate"
  local target="$CLARA_ROOT"
  [[ -n "$extra" ]] && target="$CLARA_ROOT[$extra]"
  # Reinstall only when the requirements changed since the last install.
  local stamp="$CLARA_VENV/.clara_install_${extra:-base}"
  local want
  want="$(cat "$CLARA_ROOT/setup.py" "$CLARA_ROOT/requirements/constraints.txt" | sha256sum | cut -c1-16)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    warn_if_disk_short "$CLARA_VENV"
    # No wheel cache: on a fresh machine it is never reused, and it would double the
    # ~4 GiB the test extras take (tensorflow-cpu, torch, jaxlib) on a shared disk.
    python -m pip install --quiet --disable-pip-version-check --no-cache-dir \
      -c "$CLARA_ROOT/requirements/constraints.txt" -e "$target"
    echo "$want" > "$stamp"
  fi
}
