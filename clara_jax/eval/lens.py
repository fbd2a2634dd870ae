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

import io
import re
from collections import Counter
from typing import (
  TYPE_CHECKING,
  Any,
  Dict,
  Iterable,
  List,
  Mapping,
  NamedTuple,
  Optional,
  Sequence,
  Set,
  Tuple,
  cast,
)

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax import paths
from clara_jax.data.tokenizer import ClaraTokenizer
from clara_jax.eval.stats import bootstrap_ci, paired_difference
from clara_jax.model.decoder import Decoder

if TYPE_CHECKING:
  from matplotlib.figure import Figure

STOPWORDS = frozenset(
  """a about above after again against all am an and any are as at be
because been before being below between both but by can could did do does doing down during
each few for from further had has have having he her here hers herself him himself his how i
if in into is it its itself just me more most my myself no nor not now of off on once only or
other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself
yourselves also was were is born""".split()
)

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]+")


def words(text: str) -> Set[str]:
  """Lower-cased alphanumeric words of a text, without stopwords."""
  return {w.lower() for w in _WORD.findall(text)} - STOPWORDS


def token_word(tok: ClaraTokenizer, token_id: int) -> Optional[str]:
  """The word a vocabulary entry stands for, or None for special/punctuation/stopwords."""
  if tok.is_special(token_id) or token_id in (tok.bos_id, tok.eos_id, tok.pad_id):
    return None
  # SentencePiece marks a leading space with "\u2581", byte-level BPE with "\u0120" (Ġ).
  piece = tok.id_to_piece(token_id).replace("\u2581", "").replace("\u0120", "").strip()
  if not _WORD.fullmatch(piece):
    return None
  word = piece.lower()
  return None if word in STOPWORDS else word


def lens_decode(
  params: Any, model: Decoder, states: jax.typing.ArrayLike, top_t: int
) -> Tuple[np.ndarray, np.ndarray]:
  """One pass of states [B, n_mem, D] through the lens: the top-T token ids of every
  slot [B, n_mem, top_t], and each token's best log-probability over the slots [B, V]
  (log-softmax per slot, then the max over slots)."""
  logits = cast(
    jax.Array, model.apply({"params": params}, jnp.asarray(states), method=Decoder.lens_logits)
  )
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


def decoded_words(tok: ClaraTokenizer, token_ids: Iterable[int]) -> Set[str]:
  out = set()
  for t in token_ids:
    w = token_word(tok, int(t))
    if w is not None:
      out.add(w)
  return out


def content_pieces(tok: ClaraTokenizer, token_ids: Iterable[int]) -> Set[int]:
  """The ids among `token_ids` whose piece is alphabetic (2+ letters, not a stopword):
  the unit of the piece-level lens, for vocabularies that split names into pieces."""
  return {
    int(t) for t in token_ids if (word := token_word(tok, int(t))) is not None and word.isalpha()
  }


def _text_pieces(tok: ClaraTokenizer, text: str) -> Set[int]:
  return content_pieces(tok, tok.encode(text, parse_special=False))


def same_stem(a: str, b: str, prefix: int = 5) -> bool:
  """Whether two lower-cased words count as forms of one word: equal, or sharing their
  first min(len(a), len(b), `prefix`) letters when that is at least 3 (`bid` / `bids`,
  `championship` / `champions`). It also joins some unrelated words, which only leaves
  the lens fewer pieces to score."""
  n = min(len(a), len(b), prefix)
  return a == b or (n >= 3 and a[:n] == b[:n])


def question_form_pieces(tok: ClaraTokenizer, question: str, texts: Sequence[str]) -> Set[int]:
  """The content pieces of `texts` whose word is a form (`same_stem`) of a word of the
  question's pieces. A question word reappears under other ids (a sentence-initial
  `Argentine` against the question's ` Argentine`, `champions` against
  `Championship`); left in, a lens that merely repeats the question would score them as
  words the question never said."""
  # Content pieces always have a word (`content_pieces`): the None checks only narrow.
  question_words = {w for t in _text_pieces(tok, question) if (w := token_word(tok, t)) is not None}
  return {
    t
    for text in texts
    for t in _text_pieces(tok, text)
    if (word := token_word(tok, t)) is not None and any(same_stem(word, w) for w in question_words)
  }


# The paper keeps the top-50 tokens of Mistral's 32k vocabulary per vector; a smaller
# vocabulary keeps the same share, so that top-T stays as selective (and unsaturated).
PAPER_TOP_T, PAPER_VOCAB = 50, 32000


def scaled_top_t(vocab_size: int) -> int:
  """Top-T that keeps the paper's share of the vocabulary (50 of 32k), at least 1."""
  return max(1, round(PAPER_TOP_T * vocab_size / PAPER_VOCAB))


class _Items(NamedTuple):
  """Lens items of some text: lower-cased words (stopwords out) and content piece ids."""

  words: Set[str]
  pieces: Set[int]


class _Sides(NamedTuple):
  """The discriminative items of one gold-control comparison, question items left out:
  words and content pieces of the gold side only and of the control side only."""

  gold_words: Set[str]
  control_words: Set[str]
  gold_pieces: Set[int]
  control_pieces: Set[int]


def question_report(
  tok: ClaraTokenizer,
  slot_token_ids: np.ndarray,
  question: str,
  gold_docs: Sequence[str],
  control_docs: Sequence[str],
  clue_words: Sequence[str] = (),
  piece_scores_v: Optional[np.ndarray] = None,
) -> Dict:
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
  decoded, pieces = decoded_words(tok, top), content_pieces(tok, top)
  q_items = _Items(words(question), _text_pieces(tok, question))
  clues = {c.lower() for c in clue_words} - q_items.words
  clue_p = _clue_pieces(tok, gold_docs, clues) - q_items.pieces
  gold = _items(tok, gold_docs, q_items)
  sides = [_sides(gold, _items(tok, [doc], q_items)) for doc in control_docs]
  aucs = [] if piece_scores_v is None else [_side_auc(piece_scores_v, s) for s in sides]
  hidden_p = [pieces & s.gold_pieces for s in sides]
  control_p = [pieces & s.control_pieces for s in sides]
  return {
    "question": question,
    "decoded": sorted(decoded),
    **_word_hits(
      [decoded & s.gold_words for s in sides], [decoded & s.control_words for s in sides]
    ),
    "clues_found": sorted(decoded & clues),
    "num_clues": len(clues),
    "hidden_pieces": _piece_names(tok, set().union(*hidden_p)),
    "control_pieces": _piece_names(tok, set().union(*control_p)),
    "hidden_piece_rate": _hit_rate(hidden_p),
    "control_piece_rate": _hit_rate(control_p),
    "clue_pieces_found": _piece_names(tok, pieces & clue_p),
    "num_clue_pieces": len(clue_p),
    "num_controls": len(control_docs),
    "rank_auc": _mean_known(aucs),
    "slots": [[tok.id_to_piece(int(t)) for t in row[:10]] for row in slot_token_ids],
  }


def _items(tok: ClaraTokenizer, texts: Sequence[str], question: _Items) -> _Items:
  """The items of `texts` that are not the question's."""
  text_words = set().union(*(words(t) for t in texts))
  text_pieces = set().union(*(_text_pieces(tok, t) for t in texts))
  return _Items(text_words - question.words, text_pieces - question.pieces)


def _sides(gold: _Items, control: _Items) -> _Sides:
  return _Sides(
    gold.words - control.words,
    control.words - gold.words,
    gold.pieces - control.pieces,
    control.pieces - gold.pieces,
  )


def _side_auc(piece_scores_v: np.ndarray, sides: _Sides) -> Optional[float]:
  return rank_auc(piece_scores_v, sides.gold_pieces, sides.control_pieces)


def _clue_pieces(tok: ClaraTokenizer, gold_docs: Sequence[str], clues: Set[str]) -> Set[int]:
  """The pieces of the clue words as the gold documents spell them (clues come
  lower-cased)."""
  spelled = {w for d in gold_docs for w in _WORD.findall(d) if w.lower() in clues}
  return set().union(set(), *(_text_pieces(tok, w) for w in spelled))


def _word_hits(hidden: List[Set[str]], control: List[Set[str]]) -> Dict:
  """The word fields of `question_report` from each control's gold-side and
  control-side hits."""
  return {
    "hidden": sorted(set().union(*hidden)),
    "control_hits": sorted(set().union(*control)),
    "hidden_rate": _hit_rate(hidden),
    "control_rate": _hit_rate(control),
    "hidden_count": float(np.mean([len(x) for x in hidden])),
    "control_count": float(np.mean([len(x) for x in control])),
  }


def _hit_rate(hits: Sequence[Set]) -> float:
  """The share of controls with at least one hit."""
  return float(np.mean([bool(x) for x in hits]))


def _piece_names(tok: ClaraTokenizer, ids: Iterable[int]) -> List[str]:
  return sorted(tok.id_to_piece(i) for i in ids)


def _mean_known(values: Sequence[Optional[float]]) -> Optional[float]:
  """The mean of the values that are not None; None if none is."""
  kept = [v for v in values if v is not None]
  return float(np.mean(kept)) if kept else None


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
  out = {
    "questions": len(reports),
    "hidden_hit_rate": mean("hidden_rate"),
    "control_hit_rate": mean("control_rate"),
    "hidden_per_question": mean("hidden_count"),
    "control_per_question": mean("control_count"),
  }
  out["lift"] = out["hidden_hit_rate"] - out["control_hit_rate"]
  out["lift_ci95"] = _ci95([r["hidden_rate"] - r["control_rate"] for r in reports])
  if reports:
    out["hidden_piece_hit_rate"] = mean("hidden_piece_rate")
    out["control_piece_hit_rate"] = mean("control_piece_rate")
    out["piece_lift"] = out["hidden_piece_hit_rate"] - out["control_piece_hit_rate"]
    out["piece_lift_ci95"] = _ci95(
      [r["hidden_piece_rate"] - r["control_piece_rate"] for r in reports]
    )
  ranked = [r["rank_auc"] for r in reports if r.get("rank_auc") is not None]
  if ranked:
    out["rank_auc"] = float(np.mean(ranked))
    out["rank_auc_ci95"] = _ci95(ranked)
    out["rank_questions"] = len(ranked)
  with_clues = [r for r in reports if r["num_clues"]]
  if with_clues:
    out["clue_recall"] = sum(len(r["clues_found"]) for r in with_clues) / sum(
      r["num_clues"] for r in with_clues
    )
    with_pieces = [r for r in with_clues if r.get("num_clue_pieces")]
    if with_pieces:
      out["clue_piece_recall"] = sum(len(r["clue_pieces_found"]) for r in with_pieces) / sum(
        r["num_clue_pieces"] for r in with_pieces
      )
  return out


def plot(
  reports: List[Dict], summaries: Dict[str, Dict], path: str, num_questions: int = 3
) -> None:
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
    grid = np.array(
      [[1.0 if p.replace("\u2581", "").lower() in hidden else 0.2 for p in row] for row in slots]
    )
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
  save_figure(fig, path)
  plt.close(fig)


def save_figure(fig: Figure, path: str, dpi: int = 100) -> None:
  """`fig.savefig(path)` for any path `clara_jax.paths` writes (a `gs://` URI too), all
  or nothing; the format from the file's extension, as matplotlib picks it."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format=paths.path(path).suffix[1:] or None, dpi=dpi)
  paths.write_atomic(path, [buffer.getvalue()])


# ---------------------------------------------------------------------------------------
# Lens v2: matched controls, clue headline, permutation null, bootstrap intervals.
#
# The v1 rank AUC compares the gold document's pieces with every non-gold candidate's,
# whatever its kind: against a control of another kind, the gold template's type words
# ("team", "founded") count as hidden although any question of that kind would decode
# them. v2 compares the gold with candidates of its own kind only, drops template pieces
# from both sides, matches the two sides in number, and puts the headline on the clue
# pieces (the gold entity's and bridge entity's names against the control entity's
# name). Its chance level is checked by a permutation null: every question scored with
# another question's lens of the same template, which keeps template knowledge and
# removes question-specific knowledge.
# ---------------------------------------------------------------------------------------

Pairs = List[Tuple[List[int], List[int]]]


def template_pieces(
  tok: ClaraTokenizer, docs_by_kind: Mapping[str, Sequence[str]], max_share: float = 0.3
) -> Set[int]:
  """Content pieces in more than `max_share` of the documents of at least one kind: the
  template and type words ("based", "founded", "river") that any question of that kind
  could decode without knowing its documents. Shares are per kind, so a word common in
  one kind is a template word even if rare overall. A kind of few documents marks
  almost all its pieces (one document of two is a share of 0.5): give each kind many."""
  out: Set[int] = set()
  for docs in docs_by_kind.values():
    if not docs:
      continue
    counts = Counter(p for doc in docs for p in _text_pieces(tok, doc))
    out |= {p for p, n in counts.items() if n > max_share * len(docs)}
  return out


def word_pieces(tok: ClaraTokenizer, names: Iterable[str]) -> Set[int]:
  """Content pieces of each word as it is spelled after a space in running text.

  The tokenizer's dummy prefix makes `encode(word)` the after-space spelling ("\u2581"
  + word), the pieces a document holds for a word that follows a space. Encoding
  " " + word gives the same content pieces with the tokenizers trained here (an extra
  lone "\u2581"), but a vocabulary with a "\u2581\u2581" piece (Mistral) may split it
  differently, so the word itself is encoded. Case is kept: callers give the spelling
  the documents use."""
  return set().union(set(), *(_text_pieces(tok, w.strip()) for w in names if w.strip()))


def _match_sizes(a: Set[int], b: Set[int], rng: np.random.Generator) -> Tuple[List[int], List[int]]:
  """Both sets (sorted), the larger subsampled without replacement to the size of the
  smaller, so that neither side's AUC rests on more pieces; unchanged if either is empty
  (the AUC is then unavailable) or the sizes agree. Draws from `rng` only to subsample."""
  sa, sb = sorted(a), sorted(b)
  if not sa or not sb or len(sa) == len(sb):
    return sa, sb
  if len(sa) > len(sb):
    return sorted(int(x) for x in rng.choice(sa, len(sb), replace=False)), sb
  return sa, sorted(int(x) for x in rng.choice(sb, len(sa), replace=False))


def matched_sets(
  tok: ClaraTokenizer,
  question: str,
  gold_doc: str,
  control_docs: Sequence[str],
  excluded: Set[int],
  gold_clue_words: Sequence[str] = (),
  control_clue_words: Optional[Sequence[Sequence[str]]] = None,
  rng: Optional[np.random.Generator] = None,
) -> Dict:
  """The matched piece sets of one question, before any scores: built once per question,
  they are scored by `score_matched` with the question's own lens and, unchanged, with
  the permutation null's (the null then differs from the real value only in the scores).

  `control_docs` are the non-gold candidates of the gold's kind (the caller's duty:
  this takes what it is given); `control_clue_words[c]` the name words of control c's
  entity (None: no clue comparison). For each control c:
    doc:  G = pieces(gold) - pieces(c) - Q - excluded,  C = pieces(c) - pieces(gold) - Q - excluded;
    clue: G = clue(gold) - clue(c) - Q - excluded,      C = clue(c) - clue(gold) - Q - excluded,
  where Q is the question's pieces and clue(.) the pieces of the clue words; each pair
  matched in number by `_match_sizes` (seeded `rng`; default: seed 0).

  Returns {"doc_pairs", "clue_pairs": [(gold ids, control ids)] per control (sorted int
  lists), "num_gold_pieces": |pieces(gold) - Q - excluded|, "num_clue_pieces":
  |clue(gold) - Q - excluded|, "num_controls"}."""
  rng = np.random.default_rng(0) if rng is None else rng
  if control_clue_words is not None and len(control_clue_words) != len(control_docs):
    raise ValueError(
      f"question {question!r}: {len(control_clue_words)} control clue lists "
      f"for {len(control_docs)} controls"
    )
  drop = _text_pieces(tok, question) | set(excluded)
  gold = _text_pieces(tok, gold_doc)
  gold_clue = word_pieces(tok, gold_clue_words)
  doc_pairs: Pairs = []
  clue_pairs: Pairs = []
  for c, doc in enumerate(control_docs):
    control = _text_pieces(tok, doc)
    doc_pairs.append(_match_sizes(gold - control - drop, control - gold - drop, rng))
    if control_clue_words is not None:
      control_clue = word_pieces(tok, control_clue_words[c])
      clue_pairs.append(
        _match_sizes(gold_clue - control_clue - drop, control_clue - gold_clue - drop, rng)
      )
  return {
    "doc_pairs": doc_pairs,
    "clue_pairs": clue_pairs,
    "num_gold_pieces": len(gold - drop),
    "num_clue_pieces": len(gold_clue - drop),
    "num_controls": len(control_docs),
  }


def _mean_auc(scores_v: np.ndarray, pairs: Pairs) -> Optional[float]:
  """Mean over controls of `rank_auc` of each (gold, control) pair under `scores_v`
  [vocab]; None if no control had both sides."""
  return _mean_known([rank_auc(scores_v, set(g), set(c)) for g, c in pairs])


def score_matched(sets: Dict, piece_scores_v: np.ndarray) -> Dict:
  """The report of one question's `matched_sets` under a lens `piece_scores_v` [vocab]
  (`lens_decode`'s best log-probabilities): "doc_auc" and "clue_auc" (the headline),
  each a mean over controls or None, and the piece counts."""
  return {
    "doc_auc": _mean_auc(piece_scores_v, sets["doc_pairs"]),
    "clue_auc": _mean_auc(piece_scores_v, sets["clue_pairs"]),
    "num_gold_pieces": sets["num_gold_pieces"],
    "num_clue_pieces": sets["num_clue_pieces"],
    "num_controls": sets["num_controls"],
  }


def group_derangement(groups: Sequence[str], rng: np.random.Generator) -> np.ndarray:
  """[questions] source row per question: another question of the same group, a uniform random
  derangement within each group (rejection-sampled: no question keeps its own row);
  -1 for a question alone in its group, which has no null."""
  groups = list(groups)
  source = np.full(len(groups), -1, np.int64)
  members: Dict[str, List[int]] = {}
  for q, g in enumerate(groups):
    members.setdefault(g, []).append(q)
  for g in sorted(members):
    idx = np.asarray(members[g])
    if idx.size < 2:
      continue
    while True:
      perm = rng.permutation(idx.size)
      if not np.any(perm == np.arange(idx.size)):
        break
    source[idx] = idx[perm]
  return source


MEASURES = ("clue_auc", "doc_auc")


def permutation_null(
  matched: Sequence[Dict],
  score_rows: np.ndarray,
  groups: Sequence[str],
  num_permutations: int = 200,
  seed: int = 0,
) -> Dict:
  """The lens AUCs when each question is scored with another question's lens.

  `matched` [questions]: each question's `matched_sets`; `score_rows` [questions, V]: each
  question's lens scores (`lens_decode`'s best log-probabilities); `groups` [questions]: each
  question's template. Each permutation draws a `group_derangement`, so a question is
  scored with the lens of another question of its template: what the lens shows
  without knowing that question's documents. Questions alone in their group are left
  out. Pure and deterministic given `seed`.

  Returns, for each measure in MEASURES, {"mean": mean over permutations of the mean
  over questions, "q95": the 95% quantile of that per-permutation mean, "per_question":
  [questions] each question's mean over permutations (None: singleton or no value)}, plus
  "num_permutations" and "num_questions" (questions with a null)."""
  score_rows = np.asarray(score_rows)
  if not len(matched) == len(score_rows) == len(groups):
    raise ValueError(
      f"{len(matched)} matched sets, {len(score_rows)} score rows and "
      f"{len(groups)} groups: one each per question"
    )
  rng = np.random.default_rng(seed)
  values = {m: np.full((num_permutations, len(matched)), np.nan) for m in MEASURES}
  source = np.full(len(matched), -1)
  for k in range(num_permutations):
    source = group_derangement(groups, rng)
    for q in np.flatnonzero(source >= 0):
      report = score_matched(matched[int(q)], score_rows[source[q]])
      for m in MEASURES:
        if report[m] is not None:
          values[m][k, q] = report[m]
  out: Dict = {"num_permutations": num_permutations, "num_questions": int(np.sum(source >= 0))}
  for m in MEASURES:
    out[m] = _null_summary(values[m])
  return out


def _null_summary(values: np.ndarray) -> Dict:
  """{"mean", "q95", "per_question"} of null values [permutations, Q] (NaN: none). A
  question's value is None in every permutation or in none (the sets decide, not the
  scores), so every permutation averages the same questions."""
  known = ~np.isnan(values[0]) if values.size else np.zeros(values.shape[1], bool)
  if not known.any():
    return {"mean": None, "q95": None, "per_question": [None] * values.shape[1]}
  per_perm = values[:, known].mean(axis=1)
  per_q = values.mean(axis=0)
  return {
    "mean": float(per_perm.mean()),
    "q95": float(np.quantile(per_perm, 0.95)),
    "per_question": [float(v) if k else None for v, k in zip(per_q, known)],
  }


def summarize_matched(reports: Sequence[Dict], null: Optional[Dict] = None, seed: int = 0) -> Dict:
  """Lens v2 over questions: for each measure in MEASURES, its mean with the percentile
  bootstrap 95% interval over questions ({"mean", "lo", "hi", "n"}, None without
  values); with a `permutation_null` of the same questions (in the same order), the
  null's {"mean", "q95"} under "<measure>_null" and the paired per-question difference
  real - null with its interval under "<measure>_vs_null" (questions with both)."""
  out: Dict = {"questions": len(reports)}
  for m in MEASURES:
    real = [r.get(m) for r in reports]
    out[m] = bootstrap_ci(real, seed)
    if null is not None:
      per_q = null[m]["per_question"]
      if len(per_q) != len(reports):
        raise ValueError(f"null of {len(per_q)} questions for {len(reports)} reports")
      out[m + "_null"] = {"mean": null[m]["mean"], "q95": null[m]["q95"]}
      out[m + "_vs_null"] = paired_difference(real, per_q, seed)
  return out
