"""Running Python code in a fresh process, the repository importable: for what one
process cannot show (imports not yet made, the string-hash seed, the working directory)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(*argv: str, cwd=None, timeout: int = 120, **env: str):
  """`python ARGV` (`-c CODE`, `-m MODULE ...`) with the repository on PYTHONPATH and
  `env` set; the completed process, its output captured as text."""
  return subprocess.run(
    [sys.executable, *argv],
    capture_output=True,
    text=True,
    env=dict(os.environ, PYTHONPATH=ROOT, **env),
    cwd=cwd,
    timeout=timeout,
  )
