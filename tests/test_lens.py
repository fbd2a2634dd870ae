"""Logit lens: word filtering, discriminative hidden vs control counting, summaries,
figure, and the lens job on an exported model."""

import json
import os

import jax
import numpy as np
import pytest
from lens_fixtures import piece_ids, train_tokenizer

from clara_jax.eval import lens
from clara_jax.eval.evaluate import run_lens
from clara_jax.infer.api import ClaraModel
from clara_jax.model.config import model_config
from clara_jax.model.decoder import init_params
from clara_jax.weights.export import save_params

WORDS = "red blue green river stone city team coach mayor north south kiwi falcon".split()


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(WORDS, 300)


def test_words_and_token_filtering(tok):
  assert lens.words("The Falcon team, born in 1987!") == {"falcon", "team"}
  assert lens.token_word(tok, tok.enc_id) is None and lens.token_word(tok, tok.eos_id) is None
  assert all(lens.token_word(tok, i) is None for i in tok.mem_ids)


def test_hidden_words_are_discriminative(tok):
  question = "Which team does the coach lead?"
  gold = ["The falcon team plays in the north city."]
  control = "The kiwi team plays in the south city."
  slots = np.asarray(
    [piece_ids(tok, "falcon kiwi city coach")[:4], piece_ids(tok, "north south red blue")[:4]]
  )
  rep = lens.question_report(tok, slots, question, gold, [control], clue_words=["falcon", "mascot"])
  # city/team are in both documents (not discriminative); coach is in the question.
  assert rep["hidden"] == ["falcon", "north"]
  assert rep["control_hits"] == ["kiwi", "south"]
  assert rep["hidden_rate"] == rep["control_rate"] == 1.0 and rep["hidden_count"] == 2.0
  assert rep["clues_found"] == ["falcon"] and rep["num_clues"] == 2
  s = lens.summarize([rep, dict(rep, hidden_rate=0.0, control_rate=0.0)])
  assert s["hidden_hit_rate"] == 0.5 and s["lift"] == 0.0 and s["clue_recall"] == 0.5


def test_every_control_counts_on_its_own(tok):
  """Against a control that shares the decoded gold word, that word is no hit; the rates
  are shares of controls."""
  question = "Which team does the coach lead?"
  gold = ["The falcon team plays in the north city."]
  controls = [
    "The kiwi team plays in the south city.",
    "The falcon team plays in the red city.",
    "The blue team plays in the stone city.",
  ]
  slots = np.asarray([piece_ids(tok, "falcon kiwi")])
  rep = lens.question_report(tok, slots, question, gold, controls)
  assert rep["hidden_rate"] == pytest.approx(2 / 3) and rep["hidden"] == ["falcon"]
  assert rep["control_rate"] == pytest.approx(1 / 3) and rep["control_hits"] == ["kiwi"]
  assert rep["num_controls"] == 3
  with pytest.raises(ValueError, match="control"):
    lens.question_report(tok, slots, question, gold, [])


def test_rank_auc_compares_every_discriminative_piece(tok):
  """Gold pieces above the control's: AUC 1 whatever the top-T shows; reversed: 0; shared
  and question pieces do not count; ties count half; the summary gives mean and interval."""
  assert lens.rank_auc(np.array([3.0, 1.0, 2.0]), {0, 2}, {1}) == 1.0
  assert lens.rank_auc(np.array([3.0, 1.0, 2.0]), {1}, {0, 2}) == 0.0
  assert lens.rank_auc(np.array([1.0, 1.0, 0.0]), {0}, {1, 2}) == 0.75
  assert lens.rank_auc(np.zeros(3), set(), {1}) is None
  question = "Which team does the coach lead?"
  gold = ["The falcon team plays in the north city."]
  controls = ["The kiwi team plays in the south city.", "The falcon team plays in the red city."]
  piece = lambda w: piece_ids(tok, w)[0]
  scores = np.full(tok.vocab_size, -10.0)
  # Shared (team, city) and question (coach) pieces score highest: they must not count.
  for w, v in (
    ("team", 0.0),
    ("city", 0.0),
    ("coach", 0.0),
    ("falcon", -1.0),
    ("north", -3.0),
    ("kiwi", -2.0),
    ("south", -4.0),
    ("red", -5.0),
  ):
    scores[piece(w)] = v
  slots = np.asarray([piece_ids(tok, "team city")])  # top-2 holds no discriminative word
  rep = lens.question_report(tok, slots, question, gold, controls, piece_scores_v=scores)
  # Control 1: gold {falcon -1, north -3} vs {kiwi -2, south -4}: 3 of 4 pairs.
  # Control 2 shares falcon: gold {north -3} vs {red -5}: 1 of 1.
  assert rep["rank_auc"] == pytest.approx((0.75 + 1.0) / 2)
  assert rep["hidden_rate"] == rep["control_rate"] == 0.0
  assert lens.question_report(tok, slots, question, gold, controls)["rank_auc"] is None
  s = lens.summarize([rep, dict(rep, rank_auc=0.5), dict(rep, rank_auc=None)])
  assert s["rank_questions"] == 2 and s["rank_auc"] == pytest.approx((0.875 + 0.5) / 2)
  assert s["rank_auc_ci95"] == pytest.approx(1.96 * np.std([0.875, 0.5], ddof=1) / np.sqrt(2))


def test_top_t_keeps_the_papers_share_of_the_vocabulary():
  assert lens.scaled_top_t(32000) == 50 and lens.scaled_top_t(1040) == 2
  assert lens.scaled_top_t(100) == 1


def test_pieces_catch_names_a_small_vocabulary_splits(tok):
  """A made-up name is several pieces: the word count misses it, the piece count not."""
  name = "Kiwimayor"
  name_ids = sorted(lens.content_pieces(tok, tok.encode(name, parse_special=False)))
  assert len(name_ids) >= 2
  question = "Which team does the coach lead?"
  gold = [f"The {name} team plays in the north city."]
  control = "The kiwi team plays in the south city."
  slots = np.asarray(
    [name_ids[:2] + piece_ids(tok, "coach team")[:2], piece_ids(tok, "red blue green river")]
  )
  rep = lens.question_report(tok, slots, question, gold, [control], clue_words=[name.lower()])
  assert rep["hidden"] == [] and rep["clues_found"] == []
  want = sorted(tok.id_to_piece(i) for i in name_ids[:2])
  assert want and rep["hidden_pieces"] == want
  assert rep["control_pieces"] == []
  assert 0 < len(rep["clue_pieces_found"]) <= rep["num_clue_pieces"]
  s = lens.summarize([rep])
  assert s["hidden_piece_hit_rate"] == 1.0 and s["piece_lift"] == 1.0
  assert 0 < s["clue_piece_recall"] <= 1.0


def test_lens_job_writes_json_and_png(tok, tmp_path):
  cfg = model_config("tiny", base_vocab_size=tok.base_vocab_size, num_extra_tokens=tok.num_special)
  out = str(tmp_path / "export")
  save_params(out, cfg, init_params(cfg, jax.random.key(0)))
  tok.save(out + "/tokenizer.model")
  model = ClaraModel.load(out, doc_max_length=16, compr_rate=4, question_max_length=8, doc_batch=8)
  rows = [
    {
      "question": f"Which {w} team?",
      "docs": [f"{w} falcon north", "kiwi south red", "blue stone"],
      "answer": "x",
      "answers": ["x"],
      "pos_index": [0],
    }
    for w in ("red", "blue", "green")
  ]
  summary = run_lens({"a": model, "b": model}, rows, str(tmp_path / "lens.json"), top_t=20)
  assert set(summary) == {"a", "b"} and summary["a"] == summary["b"]
  data = json.loads((tmp_path / "lens.json").read_text())
  # The gold memories' reference comes back beside each reasoner summary.
  assert summary["a"].pop("gold_memories") == data["documents_summary"]["a"]
  assert summary["a"] == data["summary"]["a"]
  assert len(data["questions"]["a"]) == 3 and "documents_summary" in data
  assert summary["a"]["top_t"] == 20 and data["questions"]["a"][0]["num_controls"] == 2
  assert 0.0 <= summary["a"]["rank_auc"] <= 1.0 and summary["a"]["rank_questions"] == 3
  assert os.path.getsize(tmp_path / "lens.png") > 1000
