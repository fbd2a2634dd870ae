"""Progress bars: on a terminal (or CLARA_PROGRESS=1) a bar on stderr; in a pipe, nothing."""

import io

from clara_jax.progress import Progress


def _run(monkeypatch, setting, isatty):
  stderr = io.StringIO()
  stderr.isatty = lambda: isatty
  monkeypatch.setattr("sys.stderr", stderr)
  if setting is None:
    monkeypatch.delenv("CLARA_PROGRESS", raising=False)
  else:
    monkeypatch.setenv("CLARA_PROGRESS", setting)
  bar = Progress("evaluate", "question")
  for done in (3, 6, 10):
    bar(done, 10)
  return stderr.getvalue()


def test_a_bar_on_a_terminal_and_none_in_a_pipe(monkeypatch):
  shown = _run(monkeypatch, None, isatty=True)
  assert "evaluate" in shown and "10/10" in shown and "question" in shown
  assert _run(monkeypatch, None, isatty=False) == ""
  assert "10/10" in _run(monkeypatch, "1", isatty=False)
  assert _run(monkeypatch, "0", isatty=True) == ""
