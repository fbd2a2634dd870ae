"""The causal edit (`clara_jax.eval.edit`): which links are edited and how the world's
text changes, the summary's intervals over links, and the claim's verdicts. The whole
experiment (fine-tunes and measures) runs in the quick demo (tests/test_demo.py)."""

import os

import pytest

from clara_jax.data import synth
from clara_jax.eval import edit, stats
from clara_jax.eval.evaluate import load_rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("edit_world"))
  manifest = synth.write_world(
    directory, seed=3, size="small", candidates=10, k=2, max_facts=2, names="pool", world="hidden"
  )
  rows = load_rows(os.path.join(directory, "stage2_test.jsonl"))
  return directory, manifest, rows


def test_edits_split_held_out_links_and_point_at_a_candidate_of_the_same_kind(world):
  _, manifest, rows = world
  edits, control = edit.plan_edits(manifest, rows, seed=3)
  by_id = {r["id"]: r for r in rows}
  docs = manifest["documents"]
  assert edits and control
  edited_ids = [q for e in edits for q in e.questions]
  assert not set(edited_ids) & set(control)
  edited_links = {(e.person, e.link) for e in edits}
  assert len(edited_links) == len(edits)
  for e in edits:
    assert e.new != e.old and docs[e.new]["kind"] == docs[e.old]["kind"]
    for q in e.questions:
      row = by_id[q]
      assert row["kind"] == "one_link" and not row["seen"]
      assert row["doc_ids"][row["pos_index"][0]] == e.old and e.new in row["doc_ids"]
      assert manifest["questions"][q]["chain"] == [e.person, e.old]
  for q in control:  # a control question's link is never edited
    chain = manifest["questions"][q]["chain"]
    link = manifest["questions"][q]["attribute"].split(".")[0]
    assert (chain[0], link) not in edited_links and not by_id[q]["seen"]
  # Seeded: the same plan again, another plan at another seed.
  assert edit.plan_edits(manifest, rows, seed=3) == (edits, control)
  assert edit.plan_edits(manifest, rows, seed=4) != (edits, control)


def test_edited_text_changes_only_the_edited_links_sentences(world):
  directory, manifest, rows = world
  edits, _ = edit.plan_edits(manifest, rows, seed=3)
  unchanged, edited = edit.edited_lines(manifest, edits)
  with open(os.path.join(directory, synth.LM_WORLD_FILE)) as f:
    assert f.read().splitlines() == unchanged
  names = {i: d["name"] for i, d in manifest["documents"].items()}
  changed = [(a, b) for a, b in zip(unchanged, edited) if a != b]
  assert len(changed) >= len(edits)
  # A line is one person's document: it changes exactly by that person's edits (a
  # person may have two links edited), and every edit changes some line.
  used = set()
  for a, b in changed:
    mine = [e for e in edits if names[e.person].split()[0] in a and names[e.old] in a]
    expected = a
    for e in mine:
      expected = expected.replace(names[e.old], names[e.new])
    assert mine and expected == b, (a, b)
    used.update(mine)
  assert used == set(edits)


def test_an_edit_that_contradicts_the_world_is_refused(world):
  _, manifest, rows = world
  edits, _ = edit.plan_edits(manifest, rows, seed=3)
  wrong = edit.Edit(edits[0].person, edits[0].link, edits[0].new, edits[0].old, ())
  with pytest.raises(ValueError, match="not"):
    edit.edited_lines(manifest, [wrong])


def _records(top1_new, link_of, group="edited"):
  if group == "control":
    return [
      {
        "id": f"c{i}",
        "group": group,
        "link": link_of(i),
        "top1_old": float(v),
        "top1_new_elsewhere": None if i == 0 else float(1 - v),
      }
      for i, v in enumerate(top1_new)
    ]
  return [
    {
      "id": f"q{i}",
      "group": group,
      "link": link_of(i),
      "top1_new": float(v),
      "top1_old": float(1 - v),
      "margin": float(v) - 0.5,
      "lens_auc": 0.5 + 0.1 * v,
    }
    for i, v in enumerate(top1_new)
  ]


def test_summary_pairs_models_and_resamples_links():
  link = lambda i: f"l{i // 2}"  # two questions per edited link
  per_model = {
    "stage2": _records([0] * 20, link),
    "sham": _records([0, 0, 1, 0] * 5, link),
    "edit": _records([1, 1, 1, 0] * 5, link),
  }
  for name in per_model:
    per_model[name] += _records([1, 0] * 3, lambda i: f"c{i}", group="control")
  summary = edit.summarize(
    per_model, {m: {"new_known": 0.5, "old_known": 0.5, "links": 10} for m in per_model}
  )
  assert summary["questions"] == 20 and summary["links"] == 10
  assert summary["control_questions"] == 6
  assert summary["edited"]["edit"]["top1_new"]["mean"] == pytest.approx(0.75)
  assert summary["edit-sham"]["top1_new"]["mean"] == pytest.approx(0.5)
  assert summary["control"]["edit"]["top1_new_elsewhere"]["n"] == 5
  rows = dict((r[0], r) for r in edit.claims(summary))
  assert rows["e. edit: top-1 on the new target's document"][3] is True
  assert "n=5" in rows["e. unedited links, edit - sham: top-1 on an edit's new target"][1]
  assert summary["control:edit-sham"]["top1_old"]["mean"] == 0.0
  # Half moved is the target's edge; below it, or not above the sham, misses.
  per_model["edit"] = _records([1, 0, 0, 0] * 5, link) + per_model["edit"][20:]
  rows = dict((r[0], r) for r in edit.claims(edit.summarize(per_model)))
  assert rows["e. edit: top-1 on the new target's document"][3] is False
  per_model["edit"] = per_model["sham"]
  rows = dict((r[0], r) for r in edit.claims(edit.summarize(per_model)))
  assert rows["e. edit - sham: top-1 on the new document"][3] is False


def test_cluster_bootstrap_counts_a_cluster_once():
  values = [1.0] * 10 + [0.0] * 10
  # Duplicating each value ten times (one cluster each) must not narrow the interval.
  repeated = [v for v in values for _ in range(10)]
  clusters = [i for i in range(len(values)) for _ in range(10)]
  plain = stats.bootstrap_ci(values)
  naive = stats.bootstrap_ci(repeated)
  clustered = stats.bootstrap_ci(repeated, clusters=clusters)
  assert plain["mean"] == naive["mean"] == clustered["mean"] == 0.5
  width = lambda ci: ci["hi"] - ci["lo"]
  assert width(naive) < 0.6 * width(plain)
  assert width(clustered) == pytest.approx(width(plain), rel=0.25)
  diff = stats.paired_difference(repeated, [0.0] * 200, clusters=clusters)
  assert diff["mean"] == 0.5 and width(diff) == pytest.approx(width(clustered), rel=0.1)
  with pytest.raises(ValueError, match="one label per value"):
    stats.bootstrap_ci(values, clusters=clusters)
  assert stats.bootstrap_ci([None, 1.0, None], clusters=["a", "b", "c"])["n"] == 1
