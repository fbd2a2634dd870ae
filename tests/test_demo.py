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


def _results(lift, ci, auc=0.56):
  lens = {"hidden_hit_rate": 0.2 + lift, "control_hit_rate": 0.2, "lift": lift,
          "lift_ci95": ci, "top_t": 2, "rank_auc": auc, "rank_auc_ci95": 0.03,
          "gold_memories": {"rank_auc": 0.58, "rank_auc_ci95": 0.03, "piece_lift": 0.07,
                            "piece_lift_ci95": 0.07}}
  return {"stage2": {"memory_gain": 1.5, "em_oracle": 0.9, "em_control": 0.1,
                     "recall@1": 0.5, "recall@5": 0.8,
                     "by_kind": {"multi": {"recall@1": 0.2, "bm25_recall@1": 0.3}}},
          "stage1_2_init": {"recall@1": 0.4, "recall@5": 0.8},
          "lens": {"stage2": lens, "stage1_2_init": lens}}


def test_claims_table_applies_each_target():
  rows = {r[0]: r for r in demo.claims(_results(0.10, 0.04), min_gain=1.0)}
  assert rows["a. memory gain (nats/token)"][3] and rows["a. EM gold memories vs random"][3]
  assert rows["b. Recall@1 stage2 vs init"][3]
  assert not rows["b. Recall@5 stage2 vs init"][3]  # equal is no win
  assert not rows["b. multi-hop Recall@1 vs BM25"][3]
  lens_row = rows["c. lens hidden vs control words (top-2)"]
  assert lens_row[3] and "+0.10 +- 0.04" in lens_row[1]
  auc_row = rows["c. lens rank AUC gold vs control pieces"]
  assert auc_row[3] and "0.560 +- 0.030" in auc_row[1]
  reference = rows["c. reference: gold memories' own lens"]
  assert reference[1] == "AUC 0.580 +- 0.030, lift +0.07 +- 0.07" and reference[3] is None
  # A lift inside its 95% interval is no evidence of hidden words.
  rows = {r[0]: r for r in demo.claims(_results(0.03, 0.05, auc=0.52), min_gain=2.0)}
  assert not rows["c. lens hidden vs control words (top-2)"][3]
  assert not rows["c. lens rank AUC gold vs control pieces"][3]  # 0.52 - 0.03 < 0.5
  assert not rows["a. memory gain (nats/token)"][3]
  table = demo.format_table(list(rows.values()))
  assert len(table.splitlines()) == len(rows) + 1 and "miss" in table
