"""`clara-jax demo --quick`: every stage runs from the previous one on the generated
world, the evaluation and lens produce the claims table and the artefacts, and running
it again resumes (finished stages are skipped) instead of starting over. The run itself is
the session fixture `quick_demo` (tests/conftest.py)."""

import json
import os

import pytest

from clara_jax import demo

CLAIMS = ("a. memory gain", "a. EM gold", "b. Recall@1", "b. Recall@5", "b. multi-hop",
          "c. lens hidden vs control words", "c. lens hidden vs control pieces")


def test_quick_demo_writes_the_table_and_artefacts(quick_demo):
  workdir, summary, lines = quick_demo
  for name in ("summary.json", "lens.png", "losses.png", "lens.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  for stage in demo.STAGES:
    assert os.listdir(os.path.join(workdir, stage, "tensorboard"))
    assert os.path.exists(os.path.join(workdir, stage, demo.DONE_FILE))
  with open(os.path.join(workdir, "summary.json")) as f:
    written = json.load(f)
  claims = [c["claim"] for c in written["claims"]]
  for prefix in CLAIMS:
    assert any(c.startswith(prefix) for c in claims), prefix
  final = written["results"]["stage2"]
  assert final["questions"] == summary["results"]["stage2"]["questions"] > 0
  assert set(final["by_kind"]) == {"single", "multi"}
  for key in ("memory_gain", "em_oracle", "em_control", "recall@1", "bm25_recall@1"):
    assert key in final, key
  table = lines[-2].strip()
  assert table.splitlines()[0].startswith("claim")
  assert len(table.splitlines()) == len(written["claims"]) + 1
  assert all(c["passed"] in (True, False, None) for c in written["claims"])


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
