#!/usr/bin/env bash
# Re-pins requirements/constraints.txt from a fresh venv resolved from setup.py alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet -e "$root[test]"
{
  echo "# Every package the runtime + [test] install resolves to, pinned so a fresh machine"
  echo "# gets exactly what CI tested. Regenerate with launch/freeze.sh after changing setup.py."
  "$tmp/venv/bin/pip" freeze --exclude-editable | sed 's/+cpu$//'
} > "$root/requirements/constraints.txt"
rm -rf "$tmp"
