"""Logit lens v2: template pieces, matched same-kind controls, the clue AUC headline, the
within-template permutation null and the bootstrap summary. No model: hand-made lens
scores over the vocabulary of a small real tokenizer."""

import numpy as np
import pytest
from lens_fixtures import piece_ids, train_tokenizer

from clara_jax.eval import lens

NAMES = "red blue green stone falcon kiwi bear wolf hawk mayor coach south".split()
TEMPLATE = "team founded plays city river flows near lake north".split()
WORDS = NAMES + TEMPLATE + "the in was which".split()


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(WORDS, 400)


def _id(tok, word):
  return piece_ids(tok, word)[0]


def _matched_report(tok, piece_scores_v, *args, **kwargs):
  """`lens.score_matched` of `lens.matched_sets(tok, *args, **kwargs)`."""
  return lens.score_matched(lens.matched_sets(tok, *args, **kwargs), piece_scores_v)


def _scores(tok, values, base=-20.0):
  """Lens scores [vocab]: `base` everywhere, values[word] on the word's piece."""
  s = np.full(tok.vocab_size, base)
  for w, v in values.items():
    s[_id(tok, w)] = v
  return s


def _kinds():
  team = [f"the {n} team was founded in the {p} city" for n, p in zip(NAMES[:3], NAMES[6:9])] + [
    f"the {n} team plays in the {p} city" for n, p in zip(NAMES[3:6], NAMES[9:12])
  ]
  river = [f"the {n} river flows near the {p} lake" for n, p in zip(NAMES[:6], NAMES[6:])]
  return {"team": team, "river": river}


def test_template_pieces_are_found_and_excluded(tok):
  """Words in > 30% of one kind's documents are template pieces, names are not; once
  excluded, a template word of the gold's template that the control's template lacks no
  longer counts as hidden."""
  kinds = _kinds()
  template = lens.template_pieces(tok, kinds)
  assert template == {_id(tok, w) for w in TEMPLATE if w != "north"}
  assert not template & {_id(tok, w) for w in NAMES}
  # "founded" is in 3 of 6 team documents: a template word at 0.3, not at 0.6.
  assert _id(tok, "founded") not in lens.template_pieces(tok, kinds, max_share=0.6)
  gold, control = kinds["team"][0], kinds["team"][3]  # founded vs plays
  scores = _scores(
    tok,
    {
      "founded": 0.0,
      NAMES[0]: -2.0,
      NAMES[6]: -2.0,
      NAMES[3]: -1.0,
      NAMES[9]: -1.0,
      "plays": -10.0,
    },
  )
  question = "which team"
  rep = _matched_report(tok, scores, question, gold, [control], template)
  assert rep["doc_auc"] == 0.0  # the control's names outscore the gold's
  assert rep["num_gold_pieces"] == 2 and rep["num_controls"] == 1
  # Without the exclusion "founded" counts for the gold side: 5 of 9 pairs.
  unexcluded = _matched_report(tok, scores, question, gold, [control], set())
  assert unexcluded["doc_auc"] == pytest.approx(5 / 9)


def test_matched_controls_equalise_set_sizes(tok):
  """The larger side is subsampled (without replacement, seeded) to the smaller's size;
  which pieces are kept depends on the rng, not on their order."""
  gold = "the falcon red blue green stone team"
  control = "the kiwi team"
  all_gold = {_id(tok, w) for w in "falcon red blue green stone".split()}
  kept = set()
  for seed in range(20):
    sets = lens.matched_sets(
      tok,
      "which team",
      gold,
      [control, gold.replace("falcon", "bear")],
      set(),
      ["falcon", "red", "blue"],
      [["kiwi"], ["bear", "wolf"]],
      rng=np.random.default_rng(seed),
    )
    (g, c), (g2, c2) = sets["doc_pairs"]
    assert c == [_id(tok, "kiwi")] and len(g) == 1 and set(g) <= all_gold
    assert g2 == [_id(tok, "falcon")] and c2 == [_id(tok, "bear")]  # 1 vs 1: untouched
    (cg, cc), (cg2, cc2) = sets["clue_pairs"]
    assert cc == [_id(tok, "kiwi")] and len(cg) == 1
    assert len(cg2) == len(cc2) == 2 and set(cc2) == {_id(tok, "bear"), _id(tok, "wolf")}
    kept.add(g[0])
  assert len(kept) > 2
  assert sets["num_gold_pieces"] == 5 and sets["num_clue_pieces"] == 3
  # The control side is subsampled when it is the larger one.
  sets = lens.matched_sets(tok, "which team", control, [gold], set())
  ((g, c),) = sets["doc_pairs"]
  assert g == [_id(tok, "kiwi")] and len(c) == 1 and set(c) <= all_gold
  assert sets["clue_pairs"] == [] and sets["num_clue_pieces"] == 0


def test_clue_pieces_are_spelled_as_after_a_space(tok):
  """A clue word's pieces are those the word has after a space in running text, split
  names included; a mismatched number of control clue lists is an error."""
  for word in ("falcon", "Hawkmayor", "Kiwistone"):
    pieces = lens.word_pieces(tok, [word])
    assert pieces == lens.content_pieces(tok, tok.encode(" " + word, parse_special=False))
    assert pieces and pieces <= lens._text_pieces(tok, f"the {word} team was founded")
  assert len(lens.word_pieces(tok, ["Hawkmayor"])) >= 2
  with pytest.raises(ValueError, match="control clue"):
    lens.matched_sets(tok, "q", "the falcon team", ["the kiwi team"], set(), ["falcon"], [])


def test_clue_auc_one_when_gold_clues_score_highest_zero_reversed(tok):
  question = "which team was founded near the lake"
  gold = "the falcon team was founded in the north city"
  controls = [
    "the kiwi team was founded in the south city",
    "the bear team was founded in the wolf city",
  ]
  clue_words = ["falcon", "north"]  # the gold entity's name and the bridge entity's
  control_clues = [["kiwi"], ["bear"]]
  scores = _scores(
    tok,
    {"falcon": 1.0, "north": 1.0, "kiwi": -1.0, "bear": -1.0, "south": 0.0, "wolf": 0.0},
    base=0.5,
  )
  args = (question, gold, controls, set(), clue_words, control_clues)
  rep = _matched_report(tok, scores, *args)
  assert rep["clue_auc"] == 1.0 and rep["doc_auc"] == 1.0
  assert rep["num_clue_pieces"] == 2 and rep["num_controls"] == 2
  rev = _matched_report(tok, -scores, *args)
  assert rev["clue_auc"] == 0.0 and rev["doc_auc"] == 0.0
  # A piece both names share (north, scored lowest) is no clue on either side.
  # Counted, north would tie the sides: {falcon 1, north -5} vs {kiwi -1, south 0} is 0.5.
  low_north = scores.copy()
  low_north[_id(tok, "north")] = -5.0
  shared = _matched_report(tok, low_north, *args[:4], clue_words, [["kiwi", "south", "north"]] * 2)
  assert shared["clue_auc"] == 1.0
  # Clue pieces in the question or excluded do not count; none left: no clue AUC.
  rep = _matched_report(
    tok, scores, "which falcon team", gold, controls, {_id(tok, "north")}, clue_words, control_clues
  )
  assert rep["num_clue_pieces"] == 0 and rep["clue_auc"] is None
  # Left of the gold: founded and city, which every control shares: no doc AUC either.
  assert rep["num_gold_pieces"] == 2 and rep["doc_auc"] is None
  assert _matched_report(tok, scores, *args[:5])["clue_auc"] is None


def _world(tok, num_questions, favour_gold, seed):
  """Questions of two templates with 4 same-kind candidates each (distinct names). The
  lens favours one candidate's name: the gold's (`favour_gold`), or a uniformly random
  candidate's, as if the gold labels were shuffled."""
  rng = np.random.default_rng(seed)
  kinds = {"team": "the {} team was founded in the city", "river": "the {} river flows near"}
  inputs, rows, groups = [], [], []
  for q in range(num_questions):
    kind = ("team", "river")[q % 2]
    names = list(rng.choice(NAMES, 4, replace=False))
    docs = [kinds[kind].format(n) for n in names]
    favoured = 0 if favour_gold else int(rng.integers(4))
    scores = rng.normal(size=tok.vocab_size)
    scores[_id(tok, names[favoured])] += 3.0
    inputs.append(
      dict(
        question=f"which {kind}",
        gold_doc=docs[0],
        control_docs=docs[1:],
        gold_clue_words=[names[0]],
        control_clue_words=[[n] for n in names[1:]],
      )
    )
    rows.append(scores)
    groups.append(kind)
  excluded = lens.template_pieces(tok, {k: [t.format(n) for n in NAMES] for k, t in kinds.items()})
  matched = [
    lens.matched_sets(tok, excluded=excluded, rng=np.random.default_rng(q), **inp)
    for q, inp in enumerate(inputs)
  ]
  return matched, np.stack(rows), groups


def _summary(tok, num_questions, favour_gold, seed):
  matched, rows, groups = _world(tok, num_questions, favour_gold, seed)
  reports = [lens.score_matched(m, r) for m, r in zip(matched, rows)]
  null = lens.permutation_null(matched, rows, groups, num_permutations=50, seed=seed)
  return lens.summarize_matched(reports, null, seed=seed)


def test_shuffled_gold_labels_give_chance_clue_auc(tok):
  """Seeded statistical check: when the lens favours a random candidate, the clue AUC's
  bootstrap interval holds 0.5 and the difference from the null holds 0; when it
  favours the gold, both are far from chance (the check has power)."""
  shuffled = _summary(tok, 80, favour_gold=False, seed=1)
  ci = shuffled["clue_auc"]
  assert ci["n"] == 80 and ci["lo"] < 0.5 < ci["hi"] and ci["hi"] - ci["lo"] < 0.25
  assert shuffled["clue_auc_vs_null"]["lo"] < 0.0 < shuffled["clue_auc_vs_null"]["hi"]
  assert abs(shuffled["clue_auc_null"]["mean"] - 0.5) < 0.1
  real = _summary(tok, 80, favour_gold=True, seed=1)
  assert real["clue_auc"]["lo"] > 0.9
  assert real["clue_auc_vs_null"]["lo"] > 0.3
  assert abs(real["clue_auc_null"]["mean"] - 0.5) < 0.1


def test_random_scores_give_chance_clue_auc(tok):
  matched, rows, _ = _world(tok, 80, favour_gold=False, seed=2)
  rows = np.random.default_rng(3).normal(size=rows.shape)
  ci = lens.summarize_matched([lens.score_matched(m, r) for m, r in zip(matched, rows)])
  assert ci["clue_auc"]["lo"] < 0.5 < ci["clue_auc"]["hi"]
  assert ci["doc_auc"]["lo"] < 0.5 < ci["doc_auc"]["hi"]


def test_group_derangement_pairs_within_groups_and_drops_singletons():
  groups = ["a", "b", "a", "c", "b", "a", "a"]
  seen = set()
  for seed in range(50):
    source = lens.group_derangement(groups, np.random.default_rng(seed))
    assert source[3] == -1
    for q, s in enumerate(source):
      if q != 3:
        assert s != q and groups[s] == groups[q]
    assert sorted(source[[0, 2, 5, 6]]) == [0, 2, 5, 6]  # a permutation of the group
    assert list(source[[1, 4]]) == [4, 1]
    seen.add(tuple(source))
  assert len(seen) > 3  # random, not one fixed derangement


def test_permutation_null_scores_with_another_question_of_the_same_group(tok):
  """Each row scores its own question's gold name lowest and the other gold names of its
  group highest: real AUC 0, null 1 exactly when the null uses only another question's
  row of the same group (a row of another group leaves the names at the base: 0.5)."""
  names = ["red", "blue", "green", "stone", "falcon", "north"]
  groups = ["a", "a", "a", "b", "b", "c"]
  controls = ["the kiwi team", "the south team"]
  matched, rows = [], []
  for q, name in enumerate(names):
    matched.append(
      lens.matched_sets(
        tok, "which team", f"the {name} team", controls, set(), [name], [["kiwi"], ["south"]]
      )
    )
    values = {n: 5.0 for n, g in zip(names, groups) if g == groups[q]}
    values[name] = -5.0
    rows.append(_scores(tok, values, base=0.0))
  rows = np.stack(rows)
  reports = [lens.score_matched(m, r) for m, r in zip(matched, rows)]
  assert [r["clue_auc"] for r in reports] == [0.0] * 6
  null = lens.permutation_null(matched, rows, groups, num_permutations=20, seed=0)
  assert null["clue_auc"]["per_question"] == [1.0] * 5 + [None]
  assert null["clue_auc"]["mean"] == null["clue_auc"]["q95"] == 1.0
  assert null["num_questions"] == 5 and null["num_permutations"] == 20
  s = lens.summarize_matched(reports, null)
  assert s["clue_auc"]["mean"] == 0.0 and s["clue_auc"]["n"] == 6
  assert s["clue_auc_vs_null"]["mean"] == -1.0 and s["clue_auc_vs_null"]["n"] == 5
  with pytest.raises(ValueError, match="per question"):
    lens.permutation_null(matched, rows[:5], groups)


def test_summary_keys_and_paired_difference(tok):
  reports = [
    {"clue_auc": 0.8, "doc_auc": 0.6},
    {"clue_auc": 0.6, "doc_auc": None},
    {"clue_auc": None, "doc_auc": 0.7},
  ]
  s = lens.summarize_matched(reports)
  assert set(s) == {"questions", "clue_auc", "doc_auc"}
  assert s["clue_auc"]["mean"] == pytest.approx(0.7) and s["clue_auc"]["n"] == 2
  assert s["doc_auc"]["mean"] == pytest.approx(0.65) and s["doc_auc"]["lo"] >= 0.6
  null = {m: {"mean": 0.5, "q95": 0.6, "per_question": [0.5, 0.5, None]} for m in lens.MEASURES}
  s = lens.summarize_matched(reports, null)
  assert set(s) == {
    "questions",
    "clue_auc",
    "doc_auc",
    "clue_auc_null",
    "doc_auc_null",
    "clue_auc_vs_null",
    "doc_auc_vs_null",
  }
  assert s["clue_auc_vs_null"]["mean"] == pytest.approx(0.2)
  assert s["doc_auc_vs_null"] == {
    "mean": pytest.approx(0.1),
    "lo": pytest.approx(0.1),
    "hi": pytest.approx(0.1),
    "n": 1,
  }
  assert lens.summarize_matched([])["clue_auc"] is None


def test_deterministic_under_a_seed(tok):
  matched, rows, groups = _world(tok, 12, favour_gold=False, seed=4)
  again, rows2, _ = _world(tok, 12, favour_gold=False, seed=4)
  assert matched == again and np.array_equal(rows, rows2)
  a = lens.permutation_null(matched, rows, groups, num_permutations=10, seed=7)
  assert a == lens.permutation_null(matched, rows, groups, num_permutations=10, seed=7)
  b = lens.permutation_null(matched, rows, groups, num_permutations=10, seed=8)
  assert a["clue_auc"]["per_question"] != b["clue_auc"]["per_question"]
  assert a["clue_auc"]["q95"] >= a["clue_auc"]["mean"]
  # Each permutation draws its own derangement: ten differ from the first alone.
  first = lens.permutation_null(matched, rows, groups, num_permutations=1, seed=7)
  assert a["clue_auc"]["per_question"] != first["clue_auc"]["per_question"]
  reports = [lens.score_matched(m, r) for m, r in zip(matched, rows)]
  assert lens.summarize_matched(reports, a, seed=3) == lens.summarize_matched(reports, a, seed=3)
  assert (
    lens.summarize_matched(reports, seed=3)["clue_auc"]
    != lens.summarize_matched(reports, seed=4)["clue_auc"]
  )
  kinds = _kinds()
  args = (
    tok,
    rows[0],
    "which team",
    kinds["team"][0],
    kinds["team"][1:] + ["the kiwi team"],
    set(),
    ["red", "green"],
    [[n] for n in NAMES[1:6]] + [["kiwi"]],
  )
  one = _matched_report(*args, rng=np.random.default_rng(5))
  assert one == _matched_report(*args, rng=np.random.default_rng(5))
  assert _matched_report(*args) == _matched_report(*args, rng=np.random.default_rng(0))
  subsamples = {
    str(lens.matched_sets(*args[:1], *args[2:], rng=np.random.default_rng(s))) for s in range(10)
  }
  assert len(subsamples) > 1  # the subsample does depend on the rng


def test_question_forms_are_candidate_pieces_sharing_a_stem_with_a_question_word(tok):
  assert lens.same_stem("championship", "champions") and lens.same_stem("bid", "bids")
  assert not lens.same_stem("census", "censor") and not lens.same_stem("co", "coach")
  question = "the red falcon"  # pieces "▁red", "▁falcon"
  doc = "bluered falls near the lake"  # "▁blue" "red" "▁fal" "l" "s" ...
  pieces = {tok.id_to_piece(t): t for t in tok.encode(doc, parse_special=False)}
  assert "red" in pieces and pieces["red"] != _id(tok, "red")  # the same word, another id
  forms = lens.question_form_pieces(tok, question, [doc, "stone"])
  assert forms == {pieces["red"], pieces["\u2581fal"]}


def test_real_lens_sets_leave_question_forms_out_of_both_sides(tok):
  from clara_jax.eval import real

  docs = [
    "bluered falls near the lake hawk wolf",
    "kiwi stone bear falls mayor",
    "coach south bluered green river",
  ]
  row = {"question": "the red falcon", "docs": docs, "pos_index": [0]}
  forms = lens.question_form_pieces(tok, row["question"], docs)
  assert forms
  # Stopword-only documents keep every candidate piece under the template share.
  sets = real.matched_lens_sets(tok, [row], docs + ["the in was which"] * 10)[0]
  scored = {t for g, c in sets["doc_pairs"] for t in g + c}
  assert scored and not scored & forms
