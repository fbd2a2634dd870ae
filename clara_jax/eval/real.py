"""Evaluation of a real-data run on a pretrained base (`clara-jax real-data --base`):
held-out NQ and HotpotQA questions, never trained on.

* Reading: memory gain of the stage2 generator (answer NLL with a non-gold candidate's
  memories, or with none, minus with the gold's), and EM/F1 closed book (no memory
  slots), with the reasoner's top-k and with the gold memories.
* Retrieval: Recall@1/5 of the stage2 reasoner against the stage1_2-initialised one
  (the reasoner stage2 starts from), BM25 and a uniform random pick, on the same 20
  candidates, as paired-bootstrap intervals of the per-question differences.
* Lens (`clara_jax.eval.lens`, v2): the reasoner's query memories decoded through the
  LM head. Per question and non-gold candidate c, the rank AUC of the gold document's
  content pieces absent from the question and from c against c's pieces absent from the
  question and from the gold, sizes matched; pieces in more than 30% of the corpus's
  documents are left out as template words, and so are the question's words in any
  other form or spelling (`lens.question_form_pieces`). Against a permutation null
  (each question scored with the lens of another question of its set) and against the
  initial reasoner.
* Examples (`examples.md`): per question, the top lens words of the reasoner's memories,
  marked when they are in the gold document and not in the question.

Every model reads the candidates' memories from the run's memory cache: stage2 trains
neither the compressor nor the base, so they are the memories it trained on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from clara_jax import paths
from clara_jax.data import formats
from clara_jax.eval import hidden, stats
from clara_jax.eval import lens as lens_lib
from clara_jax.eval.answer_metrics import recall_at_k
from clara_jax.eval.stats import (
  ClaimRow,
  above_zero,
  format_ci,
  format_difference,
  mean_at_least,
  reported,
)

if TYPE_CHECKING:
  from clara_jax.data.tokenizer import ClaraTokenizer
  from clara_jax.infer.api import ClaraModel

TEMPLATE_SHARE = 0.3  # pieces in more share of the documents are template words
RECALL_AT = (1, 5)
EXAMPLES = 12  # questions on the examples page, spread over the held-out rows


def retrieval_records(model: ClaraModel, rows: Sequence[Dict], batch: int = 8) -> List[Dict]:
  """Per question: the reasoner's ranking of its candidates and Recall@1/5 (no
  generation: what the initial reasoner is compared on)."""
  from clara_jax.eval.evaluate import candidate_memories

  out = []
  for start in range(0, len(rows), batch):
    chunk = rows[start : start + batch]
    doc_mem = candidate_memories(model, chunk)
    order, _ = model.retrieve([r["question"] for r in chunk], doc_mem, doc_mem.shape[1])
    for row, ranked in zip(chunk, order):
      out.append(
        {
          "id": row.get("id"),
          "kind": row.get("kind"),
          "retrieved": [int(i) for i in ranked[: max(RECALL_AT)]],
          **{f"recall@{at}": recall_at_k(ranked, row["pos_index"], at) for at in RECALL_AT},
        }
      )
  return out


def matched_lens_sets(
  tok: ClaraTokenizer, rows: Sequence[Dict], corpus: Sequence[str], seed: int = 0
) -> List[Dict]:
  """Each row's `lens.matched_sets` of its first gold document against every non-gold
  candidate, template pieces (`TEMPLATE_SHARE` of `corpus`) and the pieces of its
  candidates that are forms of its question's words (`lens.question_form_pieces`) left
  out; built once, so every model is scored on the same sets."""
  excluded = set(lens_lib.template_pieces(tok, {"all": list(corpus)}, TEMPLATE_SHARE))
  rng = np.random.default_rng(seed)
  out = []
  for row in rows:
    gold = row["pos_index"][0]
    controls = [d for j, d in enumerate(row["docs"]) if j not in row["pos_index"]]
    forms = lens_lib.question_form_pieces(tok, row["question"], row["docs"])
    out.append(
      lens_lib.matched_sets(
        tok, row["question"], row["docs"][gold], controls, excluded | forms, rng=rng
      )
    )
  return out


def lens_examples(model: ClaraModel, rows: Sequence[Dict], top_words: int = 12) -> List[Dict]:
  """Per row: the question, answer, gold document, and the reasoner memories' top lens
  words (best log-probability over the memory slots), each marked `in_question` (a form
  of a question word, `lens.same_stem`) or `in_gold` (else in the gold document)."""
  from clara_jax.model.decoder import Decoder

  q_mem = model.reason([r["question"] for r in rows])
  top_ids, scores = lens_lib.lens_decode(model.params, Decoder(model.cfg), q_mem, top_t=1)
  del top_ids
  out = []
  for row, score_v in zip(rows, scores):
    gold = row["docs"][row["pos_index"][0]]
    gold_words, q_words = lens_lib.words(gold), lens_lib.words(row["question"])
    picked: List[Dict] = []
    for token_id in np.argsort(-score_v):
      word = lens_lib.token_word(model.tok, int(token_id))
      if word is None or any(p["word"] == word for p in picked):
        continue
      in_question = any(lens_lib.same_stem(word, q) for q in q_words)
      picked.append(
        {
          "word": word,
          "log_prob": float(score_v[token_id]),
          "in_question": in_question,
          "in_gold": word in gold_words and not in_question,
        }
      )
      if len(picked) == top_words:
        break
    out.append(
      {
        "id": row.get("id"),
        "kind": row.get("kind"),
        "question": row["question"],
        "answer": row["answers"][0],
        "gold": gold,
        "words": picked,
      }
    )
  return out


def write_examples(path: str, examples: Sequence[Dict], title: str) -> None:
  """A markdown page: per question, the gold document, then the lens words with those
  from the gold document (not the question) in bold."""
  lines = [
    f"# {title}",
    "",
    "Top words of the stage2 reasoner's query memories decoded through the LM head "
    "(best log-probability over the memory slots). **Bold**: in the gold document "
    "and not in the question; _italic_: in the question.",
    "",
  ]
  for ex in examples:
    shown = " ".join(
      f"**{w['word']}**" if w["in_gold"] else (f"_{w['word']}_" if w["in_question"] else w["word"])
      for w in ex["words"]
    )
    gold = " ".join(ex["gold"].split())
    lines += [
      f"## {ex['question']}",
      "",
      f"- set: {ex['kind']}; answer: {ex['answer']}",
      f"- gold document: {gold[:400]}{' ...' if len(gold) > 400 else ''}",
      f"- lens: {shown}",
      "",
    ]
  paths.write_text(path, "\n".join(lines))


def evaluate_run(
  workdir: str,
  rows: List[Dict],
  k: int,
  cache_dir: str,
  seed: int = 0,
  log: Callable[[str], None] = print,
) -> Dict[str, Any]:
  """The evaluation of the run in `workdir` on held-out `rows` (stage2 rows with
  `kind`); writes `eval/*.jsonl`, `eval/*.json`, `lens.json`, `examples.md`. Returns the
  results `claims` reads (the key "lens_matched" marks them)."""
  from clara_jax.eval.evaluate import (
    EvalSettings,
    evaluate_records,
    has_gold_and_control,
    summarize_records,
  )

  start = time.perf_counter()
  final, init = _cached_models(workdir, cache_dir)
  rows = [r for r in rows if has_gold_and_control(r)]
  # The permutation null draws another question of the same set (`template`).
  rows = [dict(r, template=r.get("kind", "all"), seen=False) for r in rows]
  records = {
    "stage2": evaluate_records(
      final, rows, EvalSettings(k, max_new_tokens=16, seed=seed, closed_book=True)
    ),
    "stage1_2_init": retrieval_records(init, rows),
  }
  log(f"[    eval] answers and retrieval in {_minutes(start)}")
  corpus = sorted({d for r in rows for d in r["docs"]})
  matched = matched_lens_sets(final.tok, rows, corpus, seed)
  lens = {
    name: hidden.lens_records(model, rows, matched, seed)[0]
    for name, model in (("stage2", final), ("stage1_2_init", init))
  }
  write_examples(
    paths.join(workdir, "examples.md"),
    lens_examples(final, rows[:: max(1, len(rows) // EXAMPLES)][:EXAMPLES]),
    "The reasoner's memories through the logit lens, held-out questions",
  )
  for name, recs in records.items():
    formats.write_jsonl_atomic(paths.join(workdir, "eval", f"{name}.jsonl"), recs)
  for name, recs in lens.items():
    formats.write_jsonl_atomic(paths.join(workdir, "eval", f"lens_{name}.jsonl"), recs)
  results = {
    "questions": len(rows),
    "k": k,
    "stage2": summarize_records(records["stage2"], k),
    "lens_matched": {name: hidden.lens_summary(recs) for name, recs in lens.items()},
    "paired": paired(records, lens),
  }
  paths.write_json(paths.join(workdir, "eval", "real.json"), results, indent=1)
  log(f"[    eval] {len(rows)} held-out questions in {_minutes(start)}")
  return results


def _cached_models(workdir: str, cache_dir: str) -> Tuple[ClaraModel, ClaraModel]:
  """(the stage2 export, the stage1_2-initialised reasoner), both reading candidates'
  memories from the memory cache in `cache_dir`."""
  from clara_jax.infer.api import ClaraModel, initial_reasoner
  from clara_jax.train.memory_cache import MemoryCache

  cache = MemoryCache(cache_dir)
  final = ClaraModel.load(paths.join(workdir, "stage2", "export")).use_memory_cache(cache)
  init = initial_reasoner(ClaraModel.load(paths.join(workdir, "stage1_2", "export")))
  init.use_memory_cache(cache)
  return final, init


def _minutes(start: float) -> str:
  seconds = time.perf_counter() - start
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def paired(records: Dict[str, List[Dict]], lens: Dict[str, List[Dict]]) -> Dict[str, Any]:
  """Means with intervals and paired differences over the same questions: overall and
  per set (`kind`)."""
  final, init = records["stage2"], records["stage1_2_init"]
  if [r.get("id") for r in final] != [r.get("id") for r in init]:
    raise ValueError("stage2 and init records are not of the same questions")
  groups = {"all": list(range(len(final)))}
  for kind in sorted({kind for r in final if (kind := r.get("kind")) is not None}):
    groups[kind] = [i for i, r in enumerate(final) if r.get("kind") == kind]
  out: Dict[str, Any] = {}
  for group, idx in groups.items():
    f = [final[i] for i in idx]
    g: Dict[str, Any] = {"questions": len(idx)}
    for at in RECALL_AT:
      key = f"recall@{at}"
      mine = [r[key] for r in f]
      g[key] = {
        "stage2": stats.bootstrap_ci(mine),
        "stage1_2_init": stats.bootstrap_ci([init[i][key] for i in idx]),
        "bm25": stats.bootstrap_ci([r[f"bm25_{key}"] for r in f]),
        "random": stats.bootstrap_ci([r[f"random_{key}"] for r in f]),
      }
      g[f"{key}:stage2-init"] = stats.paired_difference(mine, [init[i][key] for i in idx])
      for name in ("bm25", "random"):
        g[f"{key}:stage2-{name}"] = stats.paired_difference(mine, [r[f"{name}_{key}"] for r in f])
    for key in ("memory_gain", "memory_gain_vs_none"):
      g[key] = stats.bootstrap_ci([r.get(key) for r in f])
    for metric in ("em", "f1"):
      for setting in ("closed_book", "normal", "oracle", "control"):
        g[f"{metric}_{setting}"] = stats.bootstrap_ci([r.get(f"{metric}_{setting}") for r in f])
      for setting in ("normal", "oracle"):
        g[f"{metric}:{setting}-closed_book"] = stats.paired_difference(
          [r.get(f"{metric}_{setting}") for r in f], [r.get(f"{metric}_closed_book") for r in f]
        )
    lf, li = [lens["stage2"][i] for i in idx], [lens["stage1_2_init"][i] for i in idx]
    g["doc_auc"] = {
      "stage2": stats.bootstrap_ci([r["doc_auc"] for r in lf]),
      "stage1_2_init": stats.bootstrap_ci([r["doc_auc"] for r in li]),
      "null": stats.bootstrap_ci([r["null_doc_auc"] for r in lf]),
    }
    g["doc_auc:stage2-null"] = stats.paired_difference(
      [r["doc_auc"] for r in lf], [r["null_doc_auc"] for r in lf]
    )
    g["doc_auc:stage2-init"] = stats.paired_difference(
      [r["doc_auc"] for r in lf], [r["doc_auc"] for r in li]
    )
    out[group] = g
  return out


# b. what stage2's recall is compared with beside the initial reasoner: (key, text).
RECALL_BASELINES = (("bm25", "BM25"), ("random", "random"))


def claims(results: Dict[str, Any], min_gain: float) -> List[ClaimRow]:
  """(claim, measured, target, passed) rows; passed None: reported without a target.
  The targets: memory gain >= `min_gain` nats/token against a wrong document; stage2
  Recall@5 above the initial reasoner's with the interval above zero; the lens AUC
  above the permutation null with the interval above zero."""
  paired = results["paired"]
  rows = _reading_claims(paired["all"], min_gain)
  for group, measures in paired.items():
    rows += _retrieval_claims(group, measures)
  return rows + _lens_claims(paired["all"])


def _reading_claims(overall: Dict[str, Any], min_gain: float) -> List[ClaimRow]:
  """a. rows: the memory gain (the target) against a wrong candidate and against none,
  and EM / F1 closed book, with retrieved and with gold memories."""
  gain = overall["memory_gain"]
  rows: List[ClaimRow] = [
    (
      "a. memory gain vs a wrong candidate (nats/token)",
      format_ci(gain),
      f">= {min_gain:g}",
      mean_at_least(gain, min_gain),
    ),
    reported(
      "a. memory gain vs no memories (nats/token)", format_ci(overall["memory_gain_vs_none"])
    ),
  ]
  for metric in ("em", "f1"):
    settings = [format_ci(overall[f"{metric}_{s}"]) for s in ("closed_book", "normal", "oracle")]
    rows.append(
      reported(f"a. {metric.upper()} closed book / retrieved / gold memories", " / ".join(settings))
    )
    rows.append(
      reported(
        f"a. {metric.upper()} gold memories - closed book",
        format_difference(overall[f"{metric}:oracle-closed_book"]),
      )
    )
  return rows


def _retrieval_claims(group: str, measures: Dict[str, Any]) -> List[ClaimRow]:
  """b. rows of one question set (or "all"): stage2's Recall@1/5 minus the initial
  reasoner's (the target: Recall@5 over all questions) and minus RECALL_BASELINES'."""
  rows: List[ClaimRow] = []
  for at in RECALL_AT:
    key = f"recall@{at}"
    recalls, vs_init = measures[key], measures[f"{key}:stage2-init"]
    target = at == 5 and group == "all"
    rows.append(
      (
        f"b. {group} R@{at} stage2 - init reasoner",
        f"{format_difference(vs_init)} (stage2 {format_ci(recalls['stage2'])}, init "
        f"{format_ci(recalls['stage1_2_init'])}), n={measures['questions']}",
        "diff > 0" if target else "(reported)",
        above_zero(vs_init) if target else None,
      )
    )
    for name, text in RECALL_BASELINES:
      rows.append(
        reported(
          f"b. {group} R@{at} stage2 - {text}",
          f"{format_difference(measures[f'{key}:stage2-{name}'])} ({text} "
          f"{format_ci(recalls[name])})",
        )
      )
  return rows


def _lens_claims(overall: Dict[str, Any]) -> List[ClaimRow]:
  """c. rows: stage2's lens doc-piece AUC, against its permutation null (the target)
  and against the initial reasoner."""
  aucs = overall["doc_auc"]
  return [
    reported("c. lens doc-piece AUC (stage2)", format_ci(aucs["stage2"])),
    (
      "c. lens AUC stage2 - permutation null",
      f"{format_difference(overall['doc_auc:stage2-null'])} (null {format_ci(aucs['null'])})",
      "diff > 0",
      above_zero(overall["doc_auc:stage2-null"]),
    ),
    reported(
      "c. lens AUC stage2 - init reasoner",
      f"{format_difference(overall['doc_auc:stage2-init'])} "
      f"(init {format_ci(aucs['stage1_2_init'])})",
    ),
  ]
