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

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from clara_jax import paths
from clara_jax.data import formats, templates
from clara_jax.eval import baselines, stats
from clara_jax.eval import lens as lens_lib
from clara_jax.eval.answer_metrics import answer_scores, recall_at_k
from clara_jax.infer.api import ClaraModel
from clara_jax.model.decoder import Decoder

RECALL_AT = (1, 3, 5)
METRIC_PREFIXES = (
  "em_",
  "f1_",
  "cover_em_",
  "recall@",
  "nll_",
  "memory_gain",
  *(f"{name}_recall@" for name in baselines.BASELINES),
)
# Row labels kept in each record, for breakdowns and paired comparisons.
ROW_LABELS = ("id", "kind", "template", "seen")


def load_rows(
  path: str,
  on_error: str = "raise",
  limit: Optional[int] = None,
  report: Optional[formats.ReadReport] = None,
) -> List[Dict]:
  """Evaluation rows, parsed row by row under one schema per file
  (`formats.read_eval_rows`): stage2 rows keep their gold `pos_index`, stage1_2 rows get
  an empty one, and a bad row is an error naming file, line and field (or, with
  `on_error="skip"`, skipped and counted in `report`)."""
  return formats.read_eval_rows(path, on_error=on_error, limit=limit, report=report)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How `evaluate_records` runs: `k` memory slots (at most the candidates), `batch`
  questions a step, answers of up to `max_new_tokens`, the `seed` of the random
  non-gold picks, `gold_counts` for the gold-frequency baseline
  (`baselines.gold_counts_of`) and whether a `closed_book` answer is added."""

  k: int = 5
  batch: int = 8
  max_new_tokens: int = 64
  seed: int = 0
  gold_counts: Optional[Dict[str, int]] = None
  closed_book: bool = False


# The settings whose answers come from k memories, each its own pick of candidates.
MEMORY_SETTINGS = ("normal", "oracle", "control")


def has_gold_and_control(row: Dict) -> bool:
  """Whether a row has a gold candidate and a non-gold one (memory gain and the lens
  compare the two)."""
  return bool(row["pos_index"]) and len(row["pos_index"]) < len(row["docs"])


def candidate_memories(model: ClaraModel, rows: Sequence[Mapping]) -> np.ndarray:
  """The memories of every row's candidates [B, N, n_mem, D], compressed in one call."""
  flat = model.compress_documents([d for r in rows for d in r["docs"]])
  return flat.reshape(len(rows), -1, model.n_mem, flat.shape[-1])


def _control_selection(row: Dict, k: int, rng: np.random.Generator) -> List[int]:
  """k non-gold candidates at random: the generator's input without the answer."""
  negatives = [i for i in range(len(row["docs"])) if i not in row["pos_index"]]
  return [int(i) for i in rng.permutation(negatives)[:k]]


def _gold_selection(row: Dict, k: int, rng: np.random.Generator) -> List[int]:
  """The gold candidates first, then random non-gold ones."""
  return (list(row["pos_index"]) + _control_selection(row, k, rng))[:k]


def _oracle_selection(row: Dict, ranked: np.ndarray, k: int) -> List[int]:
  """The gold candidates first, then the reasoner's choice among the others."""
  return (list(row["pos_index"]) + [int(i) for i in ranked if int(i) not in row["pos_index"]])[:k]


def evaluate_records(
  model: ClaraModel,
  rows: List[Dict],
  settings: EvalSettings = EvalSettings(),
  progress: Optional[Callable[[int, int], None]] = None,
) -> List[Dict]:
  """Per-question records: predictions and answer scores in each setting, the
  reasoner's Recall@k, every baseline's (`baselines.recalls`, same candidates), memory
  gain, and the row's `id`, `kind`, `template`, `seen`.

  Settings: `normal` (the reasoner's top-k), `oracle` (gold first, then the reasoner's
  choice), `control` (k random non-gold candidates: no answer in the memories) and, with
  `closed_book`, `closed_book` (a prompt without memory slots: what the generator
  answers from its weights alone).
  Memory gain (rows with gold candidates): answer NLL with k random non-gold memories
  minus answer NLL with the gold memories (then random ones) in the slots, in nats per
  answer token; positive means the generator reads its memories. `memory_gain_vs_none`:
  the same against a prompt with no memory slots at all."""
  rng = np.random.default_rng(settings.seed)
  k = _slot_count(rows, settings.k)
  per_question: List[Dict] = []
  for start in range(0, len(rows), settings.batch):
    per_question += _chunk_records(model, rows[start : start + settings.batch], k, settings, rng)
    if progress is not None:
      progress(len(per_question), len(rows))
  return per_question


def _slot_count(rows: Sequence[Dict], k: int) -> int:
  """k, at most the candidates of a row; every row must have as many."""
  n_cands = {len(r["docs"]) for r in rows}
  if len(n_cands) != 1:
    raise ValueError(f"every row needs the same number of documents, found {sorted(n_cands)}")
  return min(k, n_cands.pop())


def _chunk_records(
  model: ClaraModel, chunk: List[Dict], k: int, settings: EvalSettings, rng: np.random.Generator
) -> List[Dict]:
  """`evaluate_records` of one batch of rows."""
  questions = [r["question"] for r in chunk]
  doc_mem = candidate_memories(model, chunk)
  chosen, _ = model.retrieve(questions, doc_mem, doc_mem.shape[1])
  selections = _selections(chunk, chosen, k, rng)
  answers = _answers(model, questions, doc_mem, selections, k, settings)
  gains = _memory_gains(model, chunk, doc_mem, selections, k) if "gold" in selections else None
  return [
    _question_record(
      row,
      chosen[i],
      {setting: predictions[i] for setting, predictions in answers.items()},
      gains[i] if gains is not None else {},
      settings.gold_counts,
    )
    for i, row in enumerate(chunk)
  ]


def _selections(
  chunk: List[Dict], chosen: np.ndarray, k: int, rng: np.random.Generator
) -> Dict[str, np.ndarray]:
  """Candidate indices [B, k] per setting from the reasoner's ranking `chosen` [B, D]:
  `normal`, `oracle` and, when every row has gold and non-gold candidates, `control`
  and `gold` (the memory gain's: gold first, then random non-gold)."""
  out = {
    "normal": chosen[:, :k],
    "oracle": np.stack([_oracle_selection(r, ranked, k) for r, ranked in zip(chunk, chosen)]),
  }
  if all(has_gold_and_control(r) for r in chunk):
    out["control"] = np.stack([_control_selection(r, k, rng) for r in chunk])
    out["gold"] = np.stack([_gold_selection(r, k, rng) for r in chunk])
  return out


def _take(doc_mem: np.ndarray, selection: np.ndarray) -> np.ndarray:
  """The selected candidates' memories [B, k, n_mem, D] of `doc_mem` [B, N, n_mem, D]."""
  return np.take_along_axis(doc_mem, selection[:, :, None, None], axis=1)


def _turns(model: ClaraModel, questions: Sequence[str], k: int) -> List[Tuple[str, str]]:
  """The answer prompt of each question over k memory slots."""
  return [templates.answer_turn(q, model.n_mem, k, model.prompt_style) for q in questions]


def _answers(
  model: ClaraModel,
  questions: Sequence[str],
  doc_mem: np.ndarray,
  selections: Dict[str, np.ndarray],
  k: int,
  settings: EvalSettings,
) -> Dict[str, List[str]]:
  """{setting: the generator's answer per question}, in MEMORY_SETTINGS order (those
  with a selection), then `closed_book` when asked for."""
  turns = _turns(model, questions, k)
  out = {
    setting: model.generate_turns(
      turns, _take(doc_mem, selections[setting]), k, settings.max_new_tokens
    )
    for setting in MEMORY_SETTINGS
    if setting in selections
  }
  if settings.closed_book:
    no_slots = _turns(model, questions, 0)
    out["closed_book"] = model.generate_turns(no_slots, doc_mem[:, :0], 0, settings.max_new_tokens)
  return out


def _memory_gains(
  model: ClaraModel,
  chunk: List[Dict],
  doc_mem: np.ndarray,
  selections: Dict[str, np.ndarray],
  k: int,
) -> List[Dict[str, float]]:
  """Per row: answer NLL with the gold, the control and no memories, and the memory
  gains (control minus gold, none minus gold)."""
  questions = [r["question"] for r in chunk]
  turns, targets = _turns(model, questions, k), [r["answer"] for r in chunk]
  nll_gold = model.answer_nll(turns, targets, _take(doc_mem, selections["gold"]), k)
  nll_control = model.answer_nll(turns, targets, _take(doc_mem, selections["control"]), k)
  nll_none = model.answer_nll(_turns(model, questions, 0), targets, doc_mem[:, :0], 0)
  return [
    {
      "nll_gold": float(gold),
      "nll_control": float(control),
      "nll_none": float(none),
      "memory_gain": float(control - gold),
      "memory_gain_vs_none": float(none - gold),
    }
    for gold, control, none in zip(nll_gold, nll_control, nll_none)
  ]


def _question_record(
  row: Dict,
  ranked: np.ndarray,
  answers: Dict[str, str],
  gains: Dict[str, float],
  gold_counts: Optional[Dict[str, int]],
) -> Dict:
  """One question's record from its candidates' ranking [D], its answer per setting and
  its memory gains (empty: none measured)."""
  record = {
    "question": row["question"],
    "answers": row["answers"],
    "pos_index": row["pos_index"],
    "retrieved": [int(x) for x in ranked[: max(RECALL_AT)]],
    **{key: row[key] for key in ROW_LABELS if key in row},
    **gains,
  }
  for setting, prediction in answers.items():
    record[f"prediction_{setting}"] = prediction
    record.update(
      {f"{m}_{setting}": v for m, v in answer_scores(prediction, row["answers"]).items()}
    )
  for at in RECALL_AT:
    record[f"recall@{at}"] = recall_at_k(ranked, row["pos_index"], at)
  for name, by_at in baselines.recalls(row, RECALL_AT, gold_counts).items():
    record.update({f"{name}_recall@{at}": value for at, value in by_at.items()})
  return record


def group_of(record: Dict) -> Optional[str]:
  """'one_link/unseen'-style group of a record with a `kind` and a `seen` label."""
  if "kind" not in record or "seen" not in record:
    return None
  return f"{record['kind']}/{'seen' if record['seen'] else 'unseen'}"


def summarize_records(
  per_question: List[Dict], k: int, timings: Optional[Dict[str, float]] = None
) -> Dict:
  """Means over questions, broken down by `kind`, by seen/unseen and by both; and for
  each baseline the paired-bootstrap interval of the reasoner's Recall@1 and @5 minus
  the baseline's (`vs_baselines`, also per breakdown)."""
  n = max(len(per_question), 1)
  metric_keys = sorted({k_ for r in per_question for k_ in r if k_.startswith(METRIC_PREFIXES)})
  summary: Dict[str, Any] = {
    "questions": len(per_question),
    "k": k,
    **_means(per_question, metric_keys),
    **{f"{key}_per_question": value / n for key, value in (timings or {}).items()},
    "vs_baselines": _vs_baselines(per_question),
  }
  for name, key_of in (
    ("by_kind", lambda r: r.get("kind")),
    ("by_group", group_of),
    ("by_seen", lambda r: None if "seen" not in r else ("seen" if r["seen"] else "unseen")),
  ):
    groups = sorted({g for r in per_question if (g := key_of(r)) is not None})
    if groups:
      summary[name] = {}
      for g in groups:
        members = [r for r in per_question if key_of(r) == g]
        summary[name][g] = {
          "questions": len(members),
          **_means(members, metric_keys),
          "vs_baselines": _vs_baselines(members),
        }
  return summary


def _vs_baselines(records: List[Dict]) -> Dict[str, Dict[str, Optional[Dict[str, float]]]]:
  out: Dict[str, Dict[str, Optional[Dict[str, float]]]] = {}
  for name in baselines.BASELINES:
    for at in (1, 5):
      key = f"{name}_recall@{at}"
      if records and all(key in r for r in records):
        out.setdefault(name, {})[f"recall@{at}"] = stats.paired_difference(
          [r[f"recall@{at}"] for r in records], [r[key] for r in records]
        )
  return out


def evaluate(
  model: ClaraModel,
  rows: List[Dict],
  k: int = 5,
  batch: int = 8,
  max_new_tokens: int = 64,
  out_path: Optional[str] = None,
  seed: int = 0,
  gold_counts: Optional[Dict[str, int]] = None,
  progress: Optional[Callable[[int, int], None]] = None,
  closed_book: bool = False,
) -> Dict:
  """`evaluate_records` and `summarize_records`; writes `out_path` (summary) and
  `out_path`.jsonl (per question) when given. Returns the summary."""
  settings = EvalSettings(k, batch, max_new_tokens, seed, gold_counts, closed_book)
  timings_before = dict(vars(model.timings))
  per_question = evaluate_records(model, rows, settings, progress)
  spent = {key: vars(model.timings)[key] - timings_before[key] for key in timings_before}
  summary = summarize_records(per_question, min(k, len(rows[0]["docs"])) if rows else k, spent)
  if out_path:
    _write_json(out_path, summary)
    formats.write_jsonl_atomic(_beside(out_path, ".jsonl"), per_question)
  return summary


def _means(records: List[Dict], keys: Sequence[str]) -> Dict[str, float]:
  out = {}
  for key in keys:
    values = [r[key] for r in records if key in r]
    if values:
      out[key] = float(np.mean(values))
  return out


def lens_reports(
  model: ClaraModel,
  rows: List[Dict],
  top_t: Optional[int] = None,
  clues: Optional[Sequence[Sequence[str]]] = None,
  progress: Optional[Callable[[int, int], None]] = None,
) -> Dict:
  """Lens over the reasoner memories of every question with a gold candidate, plus the
  gold documents' own memories as a reference point; every non-gold candidate is a
  control. `top_t` None: `lens.scaled_top_t` of the model's vocabulary."""
  top_t = top_t or lens_lib.scaled_top_t(model.cfg.vocab_size)
  decoder = Decoder(model.cfg)
  keep = [i for i, r in enumerate(rows) if has_gold_and_control(r)]
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
    reports.append(
      lens_lib.question_report(
        model.tok, q_ids[i], row["question"], golds, controls, clue, q_scores[i]
      )
    )
    doc_reports.append(
      lens_lib.question_report(
        model.tok, d_ids[i], row["question"], golds, controls, clue, d_scores[i]
      )
    )
    if progress is not None:
      progress(i + 1, len(rows))
  summary = dict(lens_lib.summarize(reports), top_t=top_t)
  return {
    "reasoner": reports,
    "documents": doc_reports,
    "summary": summary,
    "documents_summary": dict(lens_lib.summarize(doc_reports), top_t=top_t),
  }


def run_lens(
  checkpoints: Dict[str, ClaraModel],
  rows: List[Dict],
  out_path: str,
  top_t: Optional[int] = None,
  clues: Optional[Sequence[Sequence[str]]] = None,
  progress: Optional[Callable[[str], Callable[[int, int], None]]] = None,
) -> Dict:
  """Lens for one or more checkpoints side by side; writes JSON and a PNG figure.

  Returns each checkpoint's reasoner summary, with the summary of the gold documents'
  own memories under "gold_memories": the reference that the reasoner's lens is read
  against (the reasoner is trained to score near those memories)."""
  results = {
    name: lens_reports(m, rows, top_t, clues, progress(name) if progress else None)
    for name, m in checkpoints.items()
  }
  summary = {name: r["summary"] for name, r in results.items()}
  _write_json(
    out_path,
    {
      "summary": summary,
      "documents_summary": {n: r["documents_summary"] for n, r in results.items()},
      "questions": {n: r["reasoner"] for n, r in results.items()},
    },
  )
  first = next(iter(results.values()))
  lens_lib.plot(first["reasoner"], summary, _beside(out_path, ".png"))
  return {
    name: dict(r["summary"], gold_memories=r["documents_summary"]) for name, r in results.items()
  }


def _write_json(path: str, obj: Any) -> None:
  paths.write_json(path, obj, indent=2)


def _beside(path: str, suffix: str) -> str:
  """`path` with its extension replaced by `suffix` (a `gs://` URI kept one)."""
  return str(paths.path(path).with_suffix(suffix))
