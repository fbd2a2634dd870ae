"""The Colab notebook (colab/clara_jax_demo.ipynb) runs top to bottom in a python3 kernel,
so it cannot go stale: its install cell finds clara_jax already installed, its demo cell
resumes the session's quick demo (every stage skipped, evaluated again, artefacts written
anew), and its last cells print the claims table of the summary it wrote and show lens.png
and losses.png as images."""

import base64
import json
import os

import nbformat
from nbclient import NotebookClient

from clara_jax import demo

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "colab", "clara_jax_demo.ipynb")
ARTEFACTS = ("summary.json", "lens.png", "losses.png")


def _stream(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_is_committed_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:40]


def test_notebook_runs_the_quick_demo(quick_demo, monkeypatch, tmp_path):
  workdir, summary, _ = quick_demo
  monkeypatch.setenv("CLARA_DEMO_WORKDIR", workdir)
  monkeypatch.setenv("CLARA_DEMO_QUICK", "1")
  # The kernel inherits this process's environment (CPU, 8 devices); compile as it does too.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  before = {name: os.stat(os.path.join(workdir, name)).st_mtime_ns for name in ARTEFACTS}

  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()

  for name in ARTEFACTS:
    assert os.stat(os.path.join(workdir, name)).st_mtime_ns > before[name], name
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  install, devices, run, table, *figures = code
  assert "clara_jax already installed" in _stream(install)
  assert "cpu" in _stream(devices)
  log = _stream(run)
  assert log.count("finished before: skipped") == len(demo.STAGES + demo.BASELINE_STAGES
                                                     + demo.EDIT_STAGES)
  with open(os.path.join(workdir, "summary.json")) as f:
    written = json.load(f)
  assert written["results"]["stage2"]["questions"] == summary["results"]["stage2"]["questions"]
  assert written["results"]["stage2"]["recall@1"] == summary["results"]["stage2"]["recall@1"]
  rows = [(c["claim"], c["measured"], c["target"], c["passed"]) for c in written["claims"]]
  assert demo.format_table(rows) in log
  assert _stream(table) == demo.format_table(rows) + "\n"
  for cell, name in zip(figures, ("lens.png", "losses.png")):
    images = [o.data["image/png"] for o in cell.outputs
              if o.output_type == "display_data" and "image/png" in o.data]
    with open(os.path.join(workdir, name), "rb") as f:
      assert [base64.b64decode(image) for image in images] == [f.read()], name
