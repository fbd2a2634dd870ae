# Sourced by the launch scripts: creates (once) and activates the project's virtualenv,
# then installs clara_jax with the requested extras under the pinned constraints.
# Usage: source launch/env.sh; install_clara_jax [extra]
set -euo pipefail
CLARA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLARA_VENV="${CLARA_VENV:-$CLARA_ROOT/.venv}"

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
    python -m pip install --quiet --disable-pip-version-check \
      -c "$CLARA_ROOT/requirements/constraints.txt" -e "$target"
    echo "$want" > "$stamp"
  fi
}
