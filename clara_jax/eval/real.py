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
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from clara_jax import paths
from clara_jax.data import formats
from clara_jax.eval import hidden, stats
from clara_jax.eval import lens as lens_lib
from clara_jax.eval.answer_metrics import recall_at_k

TEMPLATE_SHARE = 0.3  # pieces in more share of the documents are template words
RECALL_AT = (1, 5)
Row = tuple


def retrieval_records(model, rows: Sequence[Dict], batch: int = 8) -> List[Dict]:
  """Per question: the reasoner's ranking of its candidates and Recall@1/5 (no
  generation: what the initial reasoner is compared on)."""
  out = []
  for start in range(0, len(rows), batch):
    chunk = rows[start : start + batch]
    doc_mem = model.compress_documents([d for r in chunk for d in r["docs"]])
    doc_mem = doc_mem.reshape(len(chunk), -1, model.n_mem, doc_mem.shape[-1])
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
  tok, rows: Sequence[Dict], corpus: Sequence[str], seed: int = 0
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


def lens_examples(model, rows: Sequence[Dict], top_words: int = 12) -> List[Dict]:
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
  from clara_jax.eval.evaluate import evaluate_records, summarize_records
  from clara_jax.infer.api import ClaraModel, initial_reasoner
  from clara_jax.train.memory_cache import MemoryCache

  start = time.perf_counter()
  cache = MemoryCache(cache_dir)
  final = ClaraModel.load(paths.join(workdir, "stage2", "export")).use_memory_cache(cache)
  init = initial_reasoner(ClaraModel.load(paths.join(workdir, "stage1_2", "export")))
  init.use_memory_cache(cache)
  rows = [r for r in rows if r["pos_index"] and len(r["pos_index"]) < len(r["docs"])]
  # The permutation null draws another question of the same set (`template`).
  rows = [dict(r, template=r.get("kind", "all"), seen=False) for r in rows]
  records = {
    "stage2": evaluate_records(final, rows, k, max_new_tokens=16, seed=seed, closed_book=True),
    "stage1_2_init": retrieval_records(init, rows),
  }
  log(f"[    eval] answers and retrieval in {_minutes(start)}")
  corpus = sorted({d for r in rows for d in r["docs"]})
  matched = matched_lens_sets(final.tok, rows, corpus, seed)
  lens = {
    name: hidden.lens_records(model, rows, matched, seed)[0]
    for name, model in (("stage2", final), ("stage1_2_init", init))
  }
  examples = lens_examples(final, rows[:: max(1, len(rows) // 12)][:12])
  write_examples(
    paths.join(workdir, "examples.md"),
    examples,
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


def _r(ci) -> str:
  return stats.format_ci(ci)


def _d(ci) -> str:
  return stats.format_ci(ci, signed=True)


def _above_zero(ci) -> Any:
  return None if ci is None else ci["lo"] > 0


def claims(results: Dict[str, Any], min_gain: float) -> List[Row]:
  """(claim, measured, target, passed) rows; passed None: reported without a target.
  The targets: memory gain >= `min_gain` nats/token against a wrong document; stage2
  Recall@5 above the initial reasoner's with the interval above zero; the lens AUC
  above the permutation null with the interval above zero."""
  p = results["paired"]
  a = p["all"]
  gain, none = a["memory_gain"], a["memory_gain_vs_none"]
  rows: List[Row] = [
    (
      "a. memory gain vs a wrong candidate (nats/token)",
      _r(gain),
      f">= {min_gain:g}",
      None if gain is None else gain["mean"] >= min_gain,
    ),
    ("a. memory gain vs no memories (nats/token)", _r(none), "(reported)", None),
  ]
  for metric in ("em", "f1"):
    rows.append(
      (
        f"a. {metric.upper()} closed book / retrieved / gold memories",
        f"{_r(a[f'{metric}_closed_book'])} / {_r(a[f'{metric}_normal'])} / "
        f"{_r(a[f'{metric}_oracle'])}",
        "(reported)",
        None,
      )
    )
    rows.append(
      (
        f"a. {metric.upper()} gold memories - closed book",
        _d(a[f"{metric}:oracle-closed_book"]),
        "(reported)",
        None,
      )
    )
  for group in p:
    label = "all" if group == "all" else group
    for at in RECALL_AT:
      key = f"recall@{at}"
      r = p[group][key]
      target = at == 5 and group == "all"
      rows.append(
        (
          f"b. {label} R@{at} stage2 - init reasoner",
          f"{_d(p[group][f'{key}:stage2-init'])} (stage2 {_r(r['stage2'])}, init "
          f"{_r(r['stage1_2_init'])}), n={p[group]['questions']}",
          "diff > 0" if target else "(reported)",
          _above_zero(p[group][f"{key}:stage2-init"]) if target else None,
        )
      )
      for name, text in (("bm25", "BM25"), ("random", "random")):
        rows.append(
          (
            f"b. {label} R@{at} stage2 - {text}",
            f"{_d(p[group][f'{key}:stage2-{name}'])} ({text} {_r(r[name])})",
            "(reported)",
            None,
          )
        )
  rows.append(("c. lens doc-piece AUC (stage2)", _r(a["doc_auc"]["stage2"]), "(reported)", None))
  rows.append(
    (
      "c. lens AUC stage2 - permutation null",
      f"{_d(a['doc_auc:stage2-null'])} (null {_r(a['doc_auc']['null'])})",
      "diff > 0",
      _above_zero(a["doc_auc:stage2-null"]),
    )
  )
  rows.append(
    (
      "c. lens AUC stage2 - init reasoner",
      f"{_d(a['doc_auc:stage2-init'])} (init {_r(a['doc_auc']['stage1_2_init'])})",
      "(reported)",
      None,
    )
  )
  return rows
