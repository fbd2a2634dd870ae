"""The logit lens: what words do the reasoner's memory embeddings decode to?

Each query memory vector goes through the generator's output head (final norm + LM
head); the top-T tokens per vector are kept, special/punctuation/stopword pieces are
dropped, and the remaining words are compared with the documents:

* hidden words: in the gold document(s) but not in the question;
* control words: in a non-gold candidate but not in the question.

Only *discriminative* words count (gold words absent from the control document, and
control words absent from the gold documents), and top-T keeps the paper's share of the
vocabulary (`scaled_top_t`): with a small vocabulary, n_mem x top-50 tokens cover most of
it and any count saturates (see FEASIBILITY.md). Every non-gold candidate serves as a
control in turn. The lift of hidden over control hit rates is the paper's measure.

A top-T count only sees the few tokens at the very top, so at T = 2 most
question-control pairs have no hit on either side and the lift is coarse. The rank
statistic uses the whole decoding: each vocabulary piece scores its best log-probability
over the memory slots, and the rank AUC is the chance that a discriminative gold piece
outscores a discriminative control piece (ties count half; 0.5 = no preference).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.data.tokenizer import Tokenizer
from clara_jax.model.decoder import Decoder

STOPWORDS = frozenset("""a about above after again against all am an and any are as at be
because been before being below between both but by can could did do does doing down during
each few for from further had has have having he her here hers herself him himself his how i
if in into is it its itself just me more most my myself no nor not now of off on once only or
other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself
yourselves also was were is born""".split())

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]+")


def words(text: str) -> Set[str]:
  """Lower-cased alphanumeric words of a text, without stopwords."""
  return {w.lower() for w in _WORD.findall(text)} - STOPWORDS


def token_word(tok: Tokenizer, token_id: int) -> Optional[str]:
  """The word a vocabulary entry stands for, or None for special/punctuation/stopwords."""
  if tok.is_special(token_id) or token_id in (tok.bos_id, tok.eos_id, tok.pad_id):
    return None
  piece = tok.id_to_piece(token_id).replace("\u2581", "").strip()
  if not _WORD.fullmatch(piece):
    return None
  word = piece.lower()
  return None if word in STOPWORDS else word


def lens_decode(params, model: Decoder, states: jax.Array, top_t: int
                ) -> Tuple[np.ndarray, np.ndarray]:
  """One pass of states [B, M, hidden] through the lens: the top-T token ids of every
  slot [B, M, top_t], and each token's best log-probability over the slots [B, vocab]
  (log-softmax per slot, then the max over slots)."""
  logits = model.apply({"params": params}, jnp.asarray(states), method=Decoder.lens_logits)
  logits = logits.astype(jnp.float32)
  top_ids = jax.lax.top_k(logits, top_t)[1]
  best_log_probs = jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-2)
  return np.asarray(top_ids), np.asarray(best_log_probs)


def rank_auc(scores_v: np.ndarray, better: Set[int], worse: Set[int]) -> Optional[float]:
  """Chance that an id of `better` outscores an id of `worse` under `scores_v` [vocab],
  ties counting half (the Mann-Whitney AUC); None if either set is empty."""
  if not better or not worse:
    return None
  b = scores_v[sorted(better)][:, None]
  w = scores_v[sorted(worse)][None, :]
  return float(np.mean((b > w) + 0.5 * (b == w)))


def decoded_words(tok: Tokenizer, token_ids: Iterable[int]) -> Set[str]:
  out = set()
  for t in token_ids:
    w = token_word(tok, int(t))
    if w is not None:
      out.add(w)
  return out


def content_pieces(tok: Tokenizer, token_ids: Iterable[int]) -> Set[int]:
  """The ids among `token_ids` whose piece is alphabetic (2+ letters, not a stopword):
  the unit of the piece-level lens, for vocabularies that split names into pieces."""
  return {int(t) for t in token_ids if token_word(tok, int(t)) is not None
          and token_word(tok, int(t)).isalpha()}


def _text_pieces(tok: Tokenizer, text: str) -> Set[int]:
  return content_pieces(tok, tok.encode(text, parse_special=False))


# The paper keeps the top-50 tokens of Mistral's 32k vocabulary per vector; a smaller
# vocabulary keeps the same share, so that top-T stays as selective (and unsaturated).
PAPER_TOP_T, PAPER_VOCAB = 50, 32000


def scaled_top_t(vocab_size: int) -> int:
  """Top-T that keeps the paper's share of the vocabulary (50 of 32k), at least 1."""
  return max(1, round(PAPER_TOP_T * vocab_size / PAPER_VOCAB))


def question_report(tok: Tokenizer, slot_token_ids: np.ndarray, question: str,
                    gold_docs: Sequence[str], control_docs: Sequence[str],
                    clue_words: Sequence[str] = (),
                    piece_scores_v: Optional[np.ndarray] = None) -> Dict:
  """Per-question lens result from the top tokens of every memory slot [n_mem, T].

  Each control document (every non-gold candidate: one random control is a noisy
  estimate of the same rate) is compared with the gold documents on its own: a hit for
  the gold side is a decoded gold item absent from the question and from that control,
  a hit for the control side the reverse. `hidden_rate`/`control_rate` are the shares of
  controls with at least one such hit; `hidden`/`control_hits` list the items over all
  controls. Words (whole vocabulary words) and pieces (token ids, which also catch names
  that a small vocabulary splits) are counted the same way. With `piece_scores_v`
  ([vocab], from `lens_decode`), `rank_auc` is the mean over controls of `rank_auc` of
  the discriminative gold pieces against the control's (None: no control had both)."""
  if not control_docs:
    raise ValueError(f"question {question!r}: the lens needs at least one control document")
  top = slot_token_ids.reshape(-1)
  decoded = decoded_words(tok, top)
  q_words = words(question)
  gold = set().union(*(words(d) for d in gold_docs)) - q_words
  clues = {c.lower() for c in clue_words} - q_words
  pieces = content_pieces(tok, top)
  q_pieces = _text_pieces(tok, question)
  gold_p = set().union(*(_text_pieces(tok, d) for d in gold_docs)) - q_pieces
  # Clue words come lower-cased; their pieces are those of the gold text's spelling.
  spelled = {w for d in gold_docs for w in _WORD.findall(d) if w.lower() in clues}
  clue_p = set().union(set(), *(_text_pieces(tok, w) for w in spelled)) - q_pieces
  hits = {key: [] for key in ("hidden", "control", "hidden_p", "control_p")}
  aucs = []
  for doc in control_docs:
    control = words(doc) - q_words
    control_p = _text_pieces(tok, doc) - q_pieces
    if piece_scores_v is not None:
      aucs.append(rank_auc(piece_scores_v, gold_p - control_p, control_p - gold_p))
    hits["hidden"].append(decoded & (gold - control))
    hits["control"].append(decoded & (control - gold))
    hits["hidden_p"].append(pieces & (gold_p - control_p))
    hits["control_p"].append(pieces & (control_p - gold_p))
  rate = lambda sets: float(np.mean([bool(x) for x in sets]))
  count = lambda sets: float(np.mean([len(x) for x in sets]))
  union = lambda sets: set().union(*sets)
  piece = lambda ids: sorted(tok.id_to_piece(i) for i in ids)
  return {"question": question, "decoded": sorted(decoded),
          "hidden": sorted(union(hits["hidden"])),
          "control_hits": sorted(union(hits["control"])),
          "hidden_rate": rate(hits["hidden"]), "control_rate": rate(hits["control"]),
          "hidden_count": count(hits["hidden"]), "control_count": count(hits["control"]),
          "clues_found": sorted(decoded & clues), "num_clues": len(clues),
          "hidden_pieces": piece(union(hits["hidden_p"])),
          "control_pieces": piece(union(hits["control_p"])),
          "hidden_piece_rate": rate(hits["hidden_p"]),
          "control_piece_rate": rate(hits["control_p"]),
          "clue_pieces_found": piece(pieces & clue_p), "num_clue_pieces": len(clue_p),
          "num_controls": len(control_docs),
          "rank_auc": (float(np.mean([a for a in aucs if a is not None]))
                       if any(a is not None for a in aucs) else None),
          "slots": [[tok.id_to_piece(int(t)) for t in row[:10]] for row in slot_token_ids]}


def _ci95(differences: Sequence[float]) -> float:
  """Half-width of the normal 95% interval of a mean of paired per-question differences
  (0 for fewer than two questions)."""
  if len(differences) < 2:
    return 0.0
  return float(1.96 * np.std(differences, ddof=1) / np.sqrt(len(differences)))


def summarize(reports: List[Dict]) -> Dict[str, float]:
  """Hit rates (share of question-control pairs with >= 1 discriminative item), items
  per pair, the lift of hidden over control with the half-width of its 95% interval
  over questions, the mean rank AUC with its interval where reports have one, and clue
  recall where clues are known."""
  n = max(len(reports), 1)
  mean = lambda key: sum(r[key] for r in reports) / n
  out = {"questions": len(reports), "hidden_hit_rate": mean("hidden_rate"),
         "control_hit_rate": mean("control_rate"),
         "hidden_per_question": mean("hidden_count"),
         "control_per_question": mean("control_count")}
  out["lift"] = out["hidden_hit_rate"] - out["control_hit_rate"]
  out["lift_ci95"] = _ci95([r["hidden_rate"] - r["control_rate"] for r in reports])
  if reports:
    out["hidden_piece_hit_rate"] = mean("hidden_piece_rate")
    out["control_piece_hit_rate"] = mean("control_piece_rate")
    out["piece_lift"] = out["hidden_piece_hit_rate"] - out["control_piece_hit_rate"]
    out["piece_lift_ci95"] = _ci95([r["hidden_piece_rate"] - r["control_piece_rate"]
                                    for r in reports])
  ranked = [r["rank_auc"] for r in reports if r.get("rank_auc") is not None]
  if ranked:
    out["rank_auc"] = float(np.mean(ranked))
    out["rank_auc_ci95"] = _ci95(ranked)
    out["rank_questions"] = len(ranked)
  with_clues = [r for r in reports if r["num_clues"]]
  if with_clues:
    out["clue_recall"] = (sum(len(r["clues_found"]) for r in with_clues)
                          / sum(r["num_clues"] for r in with_clues))
    with_pieces = [r for r in with_clues if r.get("num_clue_pieces")]
    if with_pieces:
      out["clue_piece_recall"] = (sum(len(r["clue_pieces_found"]) for r in with_pieces)
                                  / sum(r["num_clue_pieces"] for r in with_pieces))
  return out


def plot(reports: List[Dict], summaries: Dict[str, Dict], path: str,
         num_questions: int = 3) -> None:
  """PNG: per-question slot x top-token tables (as heat-coloured text grids) and a bar
  chart of hidden vs control hit rates for each compared checkpoint."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  shown = reports[:num_questions]
  fig, axes = plt.subplots(1, len(shown) + 1, figsize=(5 * (len(shown) + 1), 4))
  axes = np.atleast_1d(axes)
  for ax, rep in zip(axes, shown):
    slots = rep["slots"]
    hidden = set(rep["hidden"])
    grid = np.array([[1.0 if p.replace("\u2581", "").lower() in hidden else 0.2
                      for p in row] for row in slots])
    ax.imshow(grid, cmap="Oranges", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(slots):
      for j, piece in enumerate(row):
        ax.text(j, i, piece.replace("\u2581", "")[:8], ha="center", va="center", fontsize=6)
    ax.set_title(rep["question"][:48], fontsize=8)
    ax.set_xlabel("top tokens")
    ax.set_ylabel("memory slot")
  bars = axes[-1]
  names = list(summaries)
  x = np.arange(len(names))
  bars.bar(x - 0.2, [summaries[n]["hidden_hit_rate"] for n in names], 0.4, label="gold (hidden)")
  bars.bar(x + 0.2, [summaries[n]["control_hit_rate"] for n in names], 0.4, label="control")
  bars.set_xticks(x, names, fontsize=8)
  bars.set_ylim(0, 1)
  bars.set_title("question-control pairs with >= 1 discriminative word", fontsize=8)
  for i, n in enumerate(names):
    if "rank_auc" in summaries[n]:
      bars.text(i, 0.95, f"rank AUC {summaries[n]['rank_auc']:.2f}", ha="center", fontsize=7)
  bars.legend(fontsize=8, loc="center right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
