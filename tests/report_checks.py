"""Checks shared by the demo and real-data tests: the pipeline's report on disk."""

import json
import os

CLAIMS = (
  "a. memory gain",
  "a. EM gold",
  "b. Recall@1",
  "b. Recall@5",
  "b. multi-hop",
  "c. lens hidden vs control words",
  "c. lens hidden vs control pieces",
)
# The generated world's hidden-reasoning table (clara_jax.eval.hidden.claims).
HIDDEN_CLAIMS = (
  "a. memory gain",
  "a. EM gold",
  "b. one_link/unseen R@1",
  "b. two_link/unseen R@1",
  "c. lens clue AUC",
  "d. links of held-out chains",
)


def check_report(workdir: str, lines, claims=CLAIMS, kinds=("single", "multi")) -> dict:
  """Artefacts, every claim's row and the printed table; returns summary.json."""
  for name in ("summary.json", "lens.json", "lens.png", "losses.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "summary.json")) as f:
    written = json.load(f)
  for prefix in claims:
    assert any(c.startswith(prefix) for c in [c["claim"] for c in written["claims"]]), prefix
  assert set(written["results"]["stage2"]["by_kind"]) == set(kinds)
  table = lines[-2].strip()
  assert table.splitlines()[0].startswith("claim")
  assert len(table.splitlines()) == len(written["claims"]) + 1
  assert all(c["passed"] in (True, False, None) for c in written["claims"])
  return written
