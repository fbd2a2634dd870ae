"""`clara-jax demo --quick`: every stage runs from the previous one on the generated
world, the evaluation and lens produce the claims table and the artefacts, and running
it again resumes (finished stages are skipped) instead of starting over. The run itself is
the session fixture `quick_demo` (tests/conftest.py)."""

import os

import pytest

from clara_jax import demo
from report_checks import check_report


def test_quick_demo_writes_the_table_and_artefacts(quick_demo):
  workdir, summary, lines = quick_demo
  for stage in demo.STAGES:
    assert os.listdir(os.path.join(workdir, stage, "tensorboard"))
    assert os.path.exists(os.path.join(workdir, stage, demo.DONE_FILE))
  written = check_report(workdir, lines)
  final = written["results"]["stage2"]
  assert final["questions"] == summary["results"]["stage2"]["questions"] > 0
  for key in ("memory_gain", "em_oracle", "em_control", "recall@1", "bm25_recall@1"):
    assert key in final, key


def test_rerun_resumes_instead_of_starting_over(quick_demo):
  workdir, summary, _ = quick_demo
  lines = []
  again = demo.run(workdir, quick=True, log=lines.append)
  skipped = [line for line in lines if "finished before" in line]
  assert len(skipped) == len(demo.STAGES)
  # Same checkpoints, same evaluation.
  assert again["results"]["stage2"]["recall@1"] == summary["results"]["stage2"]["recall@1"]
  assert again["results"]["stage2"]["memory_gain"] == pytest.approx(
      summary["results"]["stage2"]["memory_gain"], abs=1e-5)
