"""The hidden-reasoning world and its evaluation: candidates of the gold's kind with no
bridge document, one- and two-link chains whose answer document never names the person,
held-out chains that no training row holds, the baselines on the same candidates (the
kind prior exact), the shuffled-answer ablation's pairing, and the claims table's
verdicts."""

import collections
import json
import os

import pytest

from clara_jax.data import synth
from clara_jax.eval import baselines, hidden, stats
from clara_jax.eval.evaluate import load_rows


@pytest.fixture(scope="module")
def world():
  return synth.make_world(3, "small", max_facts=2, names="pool")


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("hidden_world"))
  synth.write_world(
    directory,
    seed=3,
    size="small",
    candidates=10,
    k=2,
    max_facts=2,
    names="pool",
    lm_fresh_worlds=1,
  )
  return directory


def _rows(world, split, candidates=10):
  return synth.stage_rows(world, split, candidates=candidates, k=2)["stage2"]


def test_candidates_share_the_gold_kind_and_never_hold_a_bridge(world):
  questions = {q.id: q for q in world.questions}
  for split in ("train", "test"):
    for row in _rows(world, split):
      q = questions[row["id"]]
      assert set(row["doc_kinds"]) == {world.entities[q.gold].kind}
      assert row["doc_ids"][row["pos_index"][0]] == q.gold
      assert not set(q.chain[:-1]) & set(row["doc_ids"])
      assert [world.entities[i].text for i in row["doc_ids"]] == row["docs"]


def test_one_and_two_link_chains_whose_answer_document_never_names_the_person(world):
  kinds = collections.Counter(q.hops for q in world.questions)
  assert kinds["one_link"] > 100 and kinds["two_link"] > 50, kinds
  for q in world.questions:
    if q.hops == "single":
      continue
    named, gold = world.entities[q.chain[0]], world.entities[q.gold]
    assert len(q.chain) == (2 if q.hops == "one_link" else 3)
    assert not set(synth._words(named.name)) & set(synth._words(gold.text))
    assert q.answer in gold.text
    for entity_id, nxt in zip(q.chain, q.chain[1:]):  # each link is a fact of the world
      assert nxt in world.entities[entity_id].links.values()
    if q.hops == "two_link":
      sibling = world.entities[q.chain[1]]
      assert q.bridge_clues and all(w in sibling.name for w in q.bridge_clues)
      assert not {w.lower() for w in q.bridge_clues} & set(synth._words(q.text))


def test_held_out_chains_occur_in_no_training_row(world):
  named = lambda q: q.chain[0] if q.chain else q.gold
  train = [q for q in world.questions if q.split == "train"]
  train_pairs = {(named(q), q.gold) for q in train}
  train_entities = {e for q in train for e in (q.chain or [q.gold])}
  unseen = [q for q in world.questions if q.split == "test" and not q.seen]
  assert len([q for q in unseen if q.hops != "single"]) > 60
  for q in unseen:
    assert (named(q), q.gold) not in train_pairs
  held = [q for q in unseen if not set(q.chain or [q.gold]) & train_entities - {q.gold}]
  assert held, "some test chains touch no person of any training chain"
  # Their facts are in the LM text all the same.
  text = " ".join(synth.lm_text(world, fresh_worlds=0))
  for q in unseen[:20]:
    for entity_id in q.chain:
      assert world.entities[entity_id].name in text


def test_fresh_worlds_never_reuse_the_main_worlds_names(world):
  main = {w for e in world.docs() for w in e.name.split()}
  for i in range(3):
    fresh = synth.make_world(
      synth._fresh_seed(3, i), "small", max_facts=2, names="pool", fresh=True
    )
    brands = (
      {w for e in fresh.docs() for w in e.name.split()} - set(synth._MASCOTS) - set(synth._FIRMS)
    )
    assert not brands & main
  classic = synth.make_world(
    synth._fresh_seed(3, 0), "small", max_facts=2, names="pool", world="classic", fresh=True
  )
  assert {w for e in classic.docs() for w in e.name.split()} & main  # the old rebinding


def test_manifest_and_rows_record_what_evaluation_needs(world_dir):
  with open(os.path.join(world_dir, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["world"]["closed_bridge"] and manifest["world"]["hard_negatives"]
  rows = load_rows(os.path.join(world_dir, "stage2_test.jsonl"))
  for row in rows:
    q = manifest["questions"][row["id"]]
    assert row["kind"] == q["hops"] and row["seen"] == q["seen"]
    assert row["template"] == q["template"] and row["clues"] == q["clues"]
    assert len(row["control_clues"]) == len(row["docs"])
    gold_entry = row["control_clues"][row["pos_index"][0]]
    assert gold_entry == q["clues"] + q["bridge_clues"]


def test_kind_prior_of_a_hand_made_case_is_exact():
  row = {
    "question": "Which river flows through the hometown of Ama?",
    "docs": ["a", "b", "c", "d", "e"],
    "pos_index": [3],
    "doc_kinds": ["city", "team", "city", "city", "person"],
  }
  got = baselines.recalls(row, (1, 2, 3, 5))
  assert got["kind_prior"] == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0, 5: 1.0}
  assert got["random"] == {1: 0.2, 2: 0.4, 3: pytest.approx(0.6), 5: 1.0}
  two_golds = dict(row, pos_index=[3, 1])  # the team gold ranks after the city pool
  assert baselines.recalls(two_golds, (1,))["kind_prior"][1] == pytest.approx(0.5 / 3)


def test_bm25_baselines_rank_the_rows_own_candidates():
  row = {
    "question": "In which city is the team of Ama Lee based?",
    "docs": [
      "The Foo Owls are based in Bar.",
      "The Baz Hawks wear red.",
      "Ama Lee plays for the Foo Owls.",
      "Qux lies on a river.",
    ],
    "pos_index": [0],
    "doc_kinds": ["team", "team", "person", "city"],
    "doc_ids": ["t0", "t1", "p0", "c0"],
  }
  got = baselines.recalls(row, (1,), {"t1": 3, "t0": 1})
  assert got["bm25"][1] == 0.0  # the bridge, which names Ama Lee, ranks first
  assert got["bm25_two_hop"][1] == 1.0  # its text leads to the Foo Owls
  assert got["bm25_kind"][1] == 1.0 and got["gold_prior"][1] == 0.0


def test_shuffled_answers_pair_each_question_with_another_of_its_template(world):
  rows = _rows(world, "train")
  shuffled = synth.shuffled_answers(rows, seed=1)
  by_id = {r["id"]: r for r in rows}
  templates = collections.Counter(r["template"] for r in rows)
  assert len(shuffled) == sum(n for n in templates.values() if n > 1)
  for row in shuffled:
    source = by_id[row["answer_from"]]
    assert source["id"] != row["id"] and source["template"] == row["template"]
    assert row["answer"] == source["answer"]
    assert row["docs"] == by_id[row["id"]]["docs"]
  assert synth.shuffled_answers(rows, seed=1) == shuffled
  assert synth.shuffled_answers(rows, seed=2) != shuffled
  with pytest.raises(ValueError, match="template"):
    synth.shuffled_answers([{"id": "x", "answer": "a", "answers": ["a"]}])


def test_paired_bootstrap_interval():
  assert stats.bootstrap_ci([]) is None
  ci = stats.paired_difference([1, 1, 1, 0] * 10, [0, 0, 1, 0] * 10)
  assert ci["mean"] == pytest.approx(0.5) and 0.3 < ci["lo"] < 0.5 < ci["hi"] < 0.7
  tie = stats.paired_difference([1, 0] * 20, [0, 1] * 20)
  assert tie["lo"] < 0 < tie["hi"]


def _ci(mean, lo, hi, n=40):
  return {"mean": mean, "lo": lo, "hi": hi, "n": n}


def _results(stage2_r1=0.4, lens_lo=0.05):
  r1 = {
    "stage2": _ci(stage2_r1, stage2_r1 - 0.1, stage2_r1 + 0.1),
    "init": _ci(0.1, 0.05, 0.15),
    "stage2_shuffled": _ci(0.1, 0.05, 0.15),
    "stage2_retrieval": _ci(0.6, 0.5, 0.7),
    "kind_prior": _ci(0.1, 0.1, 0.1),
    "bm25_kind": _ci(0.1, 0.05, 0.15),
    "bm25_two_hop": _ci(0.1, 0.05, 0.15),
    "bm25": _ci(0.1, 0.05, 0.15),
    "gold_prior": _ci(0.12, 0.05, 0.2),
  }
  diff = _ci(stage2_r1 - 0.1, stage2_r1 - 0.2, stage2_r1)
  group = {
    "questions": 40,
    "recall@1": r1,
    "stage2-kind_prior": diff,
    "stage2-bm25_kind": diff,
    "stage2-bm25_two_hop": diff,
    "stage2-init": diff,
    "stage2_shuffled-init": _ci(0.0, -0.1, 0.1),
  }
  lens = {
    "unseen": {
      "clue_auc": _ci(0.7, 0.66, 0.74),
      "doc_auc": _ci(0.6, 0.55, 0.65),
      "clue_auc_null": {"mean": 0.5, "q95": 0.52},
      "clue_auc_vs_null": _ci(0.2, lens_lo, 0.3),
    }
  }
  return {
    "stage2": {"memory_gain": 1.5, "em_oracle": 0.9, "em_control": 0.1},
    "comparisons": {
      "one_link/unseen": group,
      "two_link/unseen": group,
      "clue_auc:stage2-init": _ci(0.1, 0.02, 0.2),
      "clue_auc:stage2-stage2_shuffled": _ci(0.1, 0.02, 0.2),
    },
    "lens_v2": {"stage2": lens, "init": lens, "stage2_shuffled": lens},
    "probe": {"lm": {"known_share": 0.9, "chance": 0.1}},
    "recall_by_knowledge": {"known": _ci(0.4, 0.3, 0.5), "unknown": None},
  }


def test_claims_table_applies_each_target():
  rows = {r[0]: r for r in hidden.claims(_results(), min_gain=1.0)}
  verdicts = [r[3] for r in rows.values() if r[3] is not None]
  assert verdicts and all(verdicts)
  prior = rows["b. one_link/unseen R@1 stage2 vs kind prior"]
  assert "0.40 [0.30, 0.50] vs 0.10" in prior[1]
  # 0.15 is above the prior's interval but not 2x it: a miss.
  rows = {r[0]: r for r in hidden.claims(_results(stage2_r1=0.15), min_gain=1.0)}
  assert rows["b. two_link/unseen R@1 stage2 vs kind prior"][3] is False
  assert rows["b. two_link/unseen R@1 stage2 - BM25 in kind"][3] is False
  # A lens whose interval against its null reaches zero is no evidence.
  rows = {r[0]: r for r in hidden.claims(_results(lens_lo=-0.01), min_gain=1.0)}
  assert rows["c. lens clue AUC stage2 - permutation null"][3] is False
  assert rows["b. one_link/unseen R@1 supervised (ceiling)"][3] is None


def test_lens_controls_are_the_candidates_of_the_golds_kind(world):
  from clara_jax.data.tokenizer import Tokenizer

  tok = Tokenizer.train(synth.world_lm_lines(world), 1024, 4, user_symbols=synth.pool_symbols())
  row = next(
    r
    for r in synth.stage_rows(world, "test", candidates=10, k=2)["stage2"]
    if r["kind"] == "two_link"
  )
  # Mix the kinds: two candidates relabelled as another kind drop out of the controls.
  mixed = dict(row, doc_kinds=list(row["doc_kinds"]))
  others = [j for j in range(10) if j not in row["pos_index"]][:2]
  for j in others:
    mixed["doc_kinds"][j] = "another kind"
  full, part = hidden.lens_matched_sets(tok, [row, mixed], set())
  assert full["num_controls"] == 9 and part["num_controls"] == 7
  assert full["num_clue_pieces"] > 0
  for gold_ids, control_ids in full["clue_pairs"]:
    assert len(gold_ids) == len(control_ids)  # matched in number
