"""The `evaluate` and `lens` jobs over stage2 / stage1_2-format files.

evaluate: answers in the Normal setting (reasoner retrieves k of the candidates) and
the Oracle setting (the gold candidates first, then the reasoner's choice); EM, F1,
Cover EM; Recall@1/3/5 of the reasoner and of a BM25 baseline on the same candidates;
per-question outputs as JSONL beside the summary; latency per question split into
compress / query / decode milliseconds.

lens: the logit lens of `clara_jax.eval.lens` over every question's reasoner memories
(and, for comparison, over the gold document's memories), for one or two checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from clara_jax.data import formats, templates
from clara_jax.eval import lens as lens_lib
from clara_jax.eval.answer_metrics import answer_scores, recall_at_k
from clara_jax.infer.api import ClaraModel
from clara_jax.model.decoder import Decoder

RECALL_AT = (1, 3, 5)
METRIC_PREFIXES = ("em_", "f1_", "cover_em_", "recall@", "bm25_recall@", "nll_",
                   "memory_gain")


def load_rows(path: str, on_error: str = "raise", limit: Optional[int] = None) -> List[Dict]:
  """stage2 rows (stage1_2 rows get an empty pos_index). A row's optional `id` and
  `kind` (e.g. the generated world's single / multi) are kept for breakdowns."""
  try:
    rows = list(formats.read_rows(path, "stage2", on_error))
  except formats.DataError:
    rows = [dict(r, pos_index=[]) for r in formats.read_rows(path, "stage1_2", on_error)]
  extras = []
  for _, value in formats.iter_json_lines(path, on_error):
    if isinstance(value, dict):
      extras.append({key: value[key] for key in ("id", "kind") if isinstance(value.get(key), str)})
  if len(extras) == len(rows):  # skipped rows would misalign: then no extras
    rows = [dict(row, **extra) for row, extra in zip(rows, extras)]
  return rows[:limit] if limit else rows


def _control_selection(row: Dict, k: int, rng: np.random.Generator) -> List[int]:
  """k non-gold candidates at random: the generator's input without the answer."""
  negatives = [i for i in range(len(row["docs"])) if i not in row["pos_index"]]
  return [int(i) for i in rng.permutation(negatives)[:k]]


def _gold_selection(row: Dict, k: int, rng: np.random.Generator) -> List[int]:
  """The gold candidates first, then random non-gold ones."""
  return (list(row["pos_index"]) + _control_selection(row, k, rng))[:k]


def _bm25_ranking(question: str, docs: Sequence[str]) -> List[int]:
  from clara_jax.data.bm25 import BM25
  scores = BM25(list(docs)).scores(question)
  return list(np.argsort(-np.asarray(scores), kind="stable"))


def evaluate(model: ClaraModel, rows: List[Dict], k: int = 5, batch: int = 8,
             max_new_tokens: int = 64, out_path: Optional[str] = None, seed: int = 0) -> Dict:
  """Runs the evaluation; writes `out_path` (summary) and `out_path`.jsonl (per
  question) when given. Returns the summary.

  Settings: `normal` (the reasoner's top-k), `oracle` (gold first, then the reasoner's
  choice) and `control` (k random non-gold candidates: no answer in the memories).
  Memory gain (rows with gold candidates): answer NLL with k random non-gold memories
  minus answer NLL with the gold memories (then random ones) in the slots, in nats per
  answer token; positive means the generator reads its memories. Metrics are also
  broken down by the rows' `kind` when they have one."""
  rng = np.random.default_rng(seed)
  n_cands = {len(r["docs"]) for r in rows}
  if len(n_cands) != 1:
    raise ValueError(f"every row needs the same number of documents, found {sorted(n_cands)}")
  k = min(k, n_cands.pop())
  per_question, timings_before = [], dict(vars(model.timings))
  for start in range(0, len(rows), batch):
    chunk = rows[start:start + batch]
    questions = [r["question"] for r in chunk]
    doc_mem = model.compress_documents([d for r in chunk for d in r["docs"]])
    doc_mem = doc_mem.reshape(len(chunk), -1, model.n_mem, doc_mem.shape[-1])
    chosen, scores = model.retrieve(questions, doc_mem, doc_mem.shape[1])
    normal_sel = chosen[:, :k]
    oracle_sel = np.stack([
        (list(r["pos_index"]) + [int(i) for i in ranked if int(i) not in r["pos_index"]])[:k]
        for r, ranked in zip(chunk, chosen)])
    has_gold = all(r["pos_index"] and len(r["pos_index"]) < len(r["docs"]) for r in chunk)
    control_sel = np.stack([_control_selection(r, k, rng) for r in chunk]) if has_gold else None
    gold_sel = np.stack([_gold_selection(r, k, rng) for r in chunk]) if has_gold else None
    turns = [templates.answer_turn(q, model.n_mem, k, model.prompt_style) for q in questions]
    take = lambda sel: np.take_along_axis(doc_mem, sel[:, :, None, None], axis=1)
    answers, settings = {}, ["normal", "oracle"] + (["control"] if has_gold else [])
    for setting, sel in (("normal", normal_sel), ("oracle", oracle_sel),
                         ("control", control_sel)):
      if sel is not None:
        answers[setting] = model.generate_turns(turns, take(sel), k, max_new_tokens)
    if has_gold:
      targets = [r["answer"] for r in chunk]
      nll_gold = model.answer_nll(turns, targets, take(gold_sel), k)
      nll_control = model.answer_nll(turns, targets, take(control_sel), k)
    for i, row in enumerate(chunk):
      bm25 = _bm25_ranking(row["question"], row["docs"])
      record = {"question": row["question"], "answers": row["answers"],
                "pos_index": row["pos_index"],
                "retrieved": [int(x) for x in chosen[i][:max(RECALL_AT)]],
                "bm25": [int(x) for x in bm25[:max(RECALL_AT)]]}
      for key in ("id", "kind"):
        if key in row:
          record[key] = row[key]
      if has_gold:
        record.update(nll_gold=float(nll_gold[i]), nll_control=float(nll_control[i]),
                      memory_gain=float(nll_control[i] - nll_gold[i]))
      for setting in settings:
        record[f"prediction_{setting}"] = answers[setting][i]
        record.update({f"{m}_{setting}": v for m, v in
                       answer_scores(answers[setting][i], row["answers"]).items()})
      for at in RECALL_AT:
        record[f"recall@{at}"] = recall_at_k(chosen[i], row["pos_index"], at)
        record[f"bm25_recall@{at}"] = recall_at_k(bm25, row["pos_index"], at)
      per_question.append(record)
  n = max(len(per_question), 1)
  metric_keys = sorted({k_ for r in per_question for k_ in r if k_.startswith(METRIC_PREFIXES)})
  spent = {key: vars(model.timings)[key] - timings_before[key] for key in timings_before}
  summary = {"questions": len(per_question), "k": k, **_means(per_question, metric_keys),
             **{f"{key}_per_question": value / n for key, value in spent.items()}}
  kinds = sorted({r["kind"] for r in per_question if "kind" in r})
  if kinds:
    summary["by_kind"] = {kind: {"questions": sum(r.get("kind") == kind for r in per_question),
                                 **_means([r for r in per_question if r.get("kind") == kind],
                                          metric_keys)} for kind in kinds}
  if out_path:
    _write_json(out_path, summary)
    with open(os.path.splitext(out_path)[0] + ".jsonl", "w") as f:
      for record in per_question:
        f.write(json.dumps(record) + "\n")
  return summary


def _means(records: List[Dict], keys: Sequence[str]) -> Dict[str, float]:
  out = {}
  for key in keys:
    values = [r[key] for r in records if key in r]
    if values:
      out[key] = float(np.mean(values))
  return out


def lens_reports(model: ClaraModel, rows: List[Dict], top_t: Optional[int] = None,
                 clues: Optional[Sequence[Sequence[str]]] = None) -> Dict:
  """Lens over the reasoner memories of every question with a gold candidate, plus the
  gold documents' own memories as a reference point; every non-gold candidate is a
  control. `top_t` None: `lens.scaled_top_t` of the model's vocabulary."""
  top_t = top_t or lens_lib.scaled_top_t(model.cfg.vocab_size)
  decoder = Decoder(model.cfg)
  keep = [i for i, r in enumerate(rows) if r["pos_index"] and len(r["pos_index"]) < len(r["docs"])]
  rows = [rows[i] for i in keep]
  clues = [clues[i] for i in keep] if clues is not None else None
  q_mem = model.reason([r["question"] for r in rows])
  q_ids, q_scores = lens_lib.lens_decode(model.params, decoder, q_mem, top_t)
  gold_texts = [r["docs"][r["pos_index"][0]] for r in rows]
  d_mem = model.compress_documents(gold_texts)
  d_ids, d_scores = lens_lib.lens_decode(model.params, decoder, d_mem, top_t)
  reports, doc_reports = [], []
  for i, row in enumerate(rows):
    controls = [d for j, d in enumerate(row["docs"]) if j not in row["pos_index"]]
    golds = [row["docs"][j] for j in row["pos_index"]]
    clue = clues[i] if clues is not None else ()
    reports.append(lens_lib.question_report(model.tok, q_ids[i], row["question"], golds,
                                            controls, clue, q_scores[i]))
    doc_reports.append(lens_lib.question_report(model.tok, d_ids[i], row["question"], golds,
                                                controls, clue, d_scores[i]))
  summary = dict(lens_lib.summarize(reports), top_t=top_t)
  return {"reasoner": reports, "documents": doc_reports, "summary": summary,
          "documents_summary": dict(lens_lib.summarize(doc_reports), top_t=top_t)}


def run_lens(checkpoints: Dict[str, ClaraModel], rows: List[Dict], out_path: str,
             top_t: Optional[int] = None, clues=None) -> Dict:
  """Lens for one or more checkpoints side by side; writes JSON and a PNG figure.

  Returns each checkpoint's reasoner summary, with the summary of the gold documents'
  own memories under "gold_memories": the reference that the reasoner's lens is read
  against (the reasoner is trained to score near those memories)."""
  results = {name: lens_reports(m, rows, top_t, clues) for name, m in checkpoints.items()}
  summary = {name: r["summary"] for name, r in results.items()}
  _write_json(out_path, {"summary": summary,
                         "documents_summary": {n: r["documents_summary"]
                                               for n, r in results.items()},
                         "questions": {n: r["reasoner"] for n, r in results.items()}})
  first = next(iter(results.values()))
  lens_lib.plot(first["reasoner"], summary, os.path.splitext(out_path)[0] + ".png")
  return {name: dict(r["summary"], gold_memories=r["documents_summary"])
          for name, r in results.items()}


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
