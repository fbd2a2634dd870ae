"""Converters from public QA datasets to the CLaRa JSONL formats (see `formats`).

Sources (`SOURCE_FORMATS`), each read from JSONL (optionally .gz) or a JSON array file:

* `hotpotqa`: the original distractor-setting release, {_id, question, answer, type,
  level, supporting_facts: [[title, sent_id]], context: [[title, [sentences]]]}; the gold
  paragraphs are the context titles named in supporting_facts.
* `hotpotqa_ircot`: IRCoT's processed HotpotQA, {question_id, question_text,
  answers_objects: [{spans: [str | [str]]}], contexts: [{id, title, paragraph_text,
  is_supporting}]}; every span of every answer object is an alias, the first is the answer.
* `musique`: {id, question, answer, answer_aliases, answerable, paragraphs: [{idx, title,
  paragraph_text, is_supporting}]}; unanswerable rows (answerable == false) are skipped and
  counted whatever `on_error` says, since they are data, not errors.
* `2wiki`: 2WikiMultihopQA, the same shape as `hotpotqa` (_id, question, answer, context,
  supporting_facts).
* `nq`: NQ-open as in lost-in-the-middle, {question, answers: [str], ctxs: [{title, text,
  isgold}]}; rows carry no id, so the id is "FILE:LINE".
* `stage1`: CLaRa pretraining rows, validated and rewritten normalised (no candidates).

Conventions, the same for every source:

* Document text is `title + "\\n" + paragraph` (`doc_text`): the title stays with its
  paragraph, because for multi-hop questions the title is often the bridge entity. Sentence
  lists (hotpotqa, 2wiki) are joined with single spaces.
* Candidates: a question's own paragraphs (exact duplicates merged). When it has fewer than
  requested, BM25 (query = the question) retrieves distractors from the pooled distinct
  paragraphs of all questions in the input, never one equal to any of the question's own
  paragraphs and never one with the title of one of its gold paragraphs (a second passage
  of the gold article often holds the answer too and would be an unlabelled positive). When
  it has more, all gold are kept and the lowest-BM25 non-gold are dropped. stage1_2 uses
  the same selection with `k` documents, so gold come first, then the best distractors.
* Order: the candidates are shuffled by `random.Random(f"{seed}:{id}")`, so a row's
  shuffle depends on the seed and its id only, not on where it sits in the input;
  `pos_index` lists the gold positions after the shuffle. Same inputs and seed give
  byte-identical output. (Which distractors are retrieved depends on the pool, so on the
  inputs and `limit`: BM25 ties go to the paragraph seen first.)
* Output rows: {"question", "docs", "answer", "answers" (all aliases), "pos_index", "id"},
  each checked with `formats.validate_row` before it is written; stage1_2 rows keep
  pos_index too. The output is written atomically: it appears only if the whole conversion
  succeeds, and an existing file is untouched otherwise.
* Bad input raises `DataError` naming file, line and field (`f.jsonl:3: field
  'contexts[2].title': expected a string, found int`); JSON-array items add "(item N)" to
  the reason and give the line the item starts on. With `on_error="skip"` bad rows are
  skipped and counted instead; a JSON syntax error inside an array still raises, since the
  rest of the array cannot be found reliably. A row whose id repeats an earlier row's is
  bad input too (ids key per-question results), and so is a conversion that yields no row
  at all (an empty input, or every row skipped): it raises rather than replace the
  output with an empty file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import re
import time
from typing import (
  TYPE_CHECKING,
  Any,
  Callable,
  Dict,
  Iterable,
  Iterator,
  List,
  Optional,
  Sequence,
  Tuple,
)

from clara_jax import paths as paths_lib
from clara_jax.data.formats import (
  ON_ERROR,
  STAGE1,
  STAGE1_2,
  STAGE2,
  DataError,
  FieldError,
  ReadReport,
  check_input_file,
  iter_json_lines,
  no_rows,
  read_rows,
  validate_row,
  write_jsonl_atomic,
)
from clara_jax.data.formats import _flag as formats_flag
from clara_jax.data.formats import _text as formats_text

if TYPE_CHECKING:
  from clara_jax.data.bm25 import BM25

SOURCE_FORMATS = ("hotpotqa", "hotpotqa_ircot", "musique", "2wiki", "nq", "stage1")
OUTPUT_STAGES = (STAGE2, STAGE1_2)
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def doc_text(title: str, paragraph: str) -> str:
  """The one document-text convention: "title\\nparagraph" (either alone if the other is
  blank)."""
  title, paragraph = title.strip(), paragraph.strip()
  if title and paragraph:
    return f"{title}\n{paragraph}"
  return title or paragraph


@dataclasses.dataclass
class Example:
  """One source question, normalised.

  id: the source id (shuffle seed and output `id`); question: the question text;
  answers: every alias, the training target first; docs: candidate texts (`doc_text`),
  distinct; gold: per doc, whether it is a supporting paragraph; titles: per doc, its
  title (used to keep other passages of gold articles out of the distractors);
  path, line: where the row came from, for errors found after reading.
  """

  id: str
  question: str
  answers: List[str]
  docs: List[str]
  gold: List[bool]
  titles: List[str]
  path: str = ""
  line: int = 0


@dataclasses.dataclass
class ConvertReport:
  """What `convert` did.

  rows_in: source rows read; rows_out: rows written; skipped: rows skipped (bad rows with
  on_error="skip", plus unanswerable ones); unanswerable: of those, MuSiQue unanswerable
  rows; distractors_added: BM25-retrieved documents added over all rows;
  truncated_candidates: a question's own non-gold documents dropped to fit; pool_size:
  distinct paragraphs distractors were drawn from; seconds: wall time; reasons: the
  first skip reasons.
  """

  source_format: str
  stage: str
  out_path: str
  num_docs: int = 0
  rows_in: int = 0
  rows_out: int = 0
  skipped: int = 0
  unanswerable: int = 0
  distractors_added: int = 0
  truncated_candidates: int = 0
  pool_size: int = 0
  seconds: float = 0.0
  reasons: List[str] = dataclasses.field(default_factory=list)

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    docs = f", {self.num_docs} docs" if self.num_docs else ""
    return (
      f"converted {self.source_format} -> {self.out_path} ({self.stage}{docs}): "
      f"{self.rows_in} rows in, {self.rows_out} out, {self.skipped} skipped, "
      f"{self.distractors_added} distractors added, {self.truncated_candidates} "
      f"candidates dropped, {self.seconds:.2f} s"
    )


# ---------------------------------------------------------------------------------------
# Reading records: JSONL or a JSON array, with line numbers.


def _open_text(path: str) -> str:
  with paths_lib.open_binary(path) as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(path, line, None, f"not valid UTF-8 (byte {e.start})") from None


def _is_json_array(path: str) -> bool:
  with paths_lib.open_binary(path) as f:
    head = f.read(4096).lstrip()
  return head.startswith(b"[")


def _skip_whitespace(text: str, pos: int) -> int:
  """The position of the first non-whitespace character at or after pos."""
  match = _WHITESPACE.match(text, pos)
  assert match is not None  # the pattern matches the empty string
  return match.end()


def _iter_json_array(path: str, report: ReadReport) -> Iterator[Tuple[int, int, Any]]:
  """Yields (line the item starts on, 1-based item number, value) of a JSON array file,
  decoding one item at a time so each keeps its own location."""
  text = _open_text(path)
  decoder = json.JSONDecoder()
  pos = _skip_whitespace(text, text.index("[") + 1)
  line, counted = 1 + text.count("\n", 0, pos), pos
  item = 0
  if text.startswith("]", pos):
    pos += 1
  else:
    while True:
      item += 1
      line, counted = line + text.count("\n", counted, pos), pos
      try:
        value, end = decoder.raw_decode(text, pos)
      except json.JSONDecodeError as e:
        raise DataError(
          path, e.lineno, None, f"invalid JSON in item {item}: {e.msg} at column {e.colno}"
        ) from None
      report.rows_read += 1
      yield line, item, value
      pos = _skip_whitespace(text, end)
      if text.startswith(",", pos):
        pos = _skip_whitespace(text, pos + 1)
        continue
      if text.startswith("]", pos):
        pos += 1
        break
      raise DataError(
        path,
        1 + text.count("\n", 0, pos),
        None,
        f"invalid JSON after item {item}: expected ',' or ']'",
      )
  rest = _skip_whitespace(text, pos)
  if rest != len(text):
    raise DataError(path, 1 + text.count("\n", 0, rest), None, "extra data after the array")


def iter_records(
  path: str, on_error: str = "raise", report: Optional[ReadReport] = None
) -> Iterator[Tuple[int, Optional[int], Any]]:
  """Yields (line, item, value) for every record of a JSONL or JSON-array file (either
  optionally gzipped); item is the 1-based array index, None for JSONL."""
  report = report if report is not None else ReadReport()
  check_input_file(path)
  if _is_json_array(path):
    yield from _iter_json_array(path, report)
  else:
    for line, value in iter_json_lines(path, on_error, report):
      yield line, None, value


# ---------------------------------------------------------------------------------------
# Typed field access: every failure names the field's path in the row.


def _get(obj: Dict[str, Any], key: str, field: str) -> Any:
  if key not in obj:
    raise FieldError(field, "missing")
  return obj[key]


_str = formats_text  # the formats module's string check, same errors


def _list(value: Any, field: str, allow_empty: bool = False) -> list:
  if not isinstance(value, list):
    raise FieldError(field, f"expected a list, found {type(value).__name__}")
  if not value and not allow_empty:
    raise FieldError(field, "is an empty list")
  return value


def _dict(value: Any, field: Optional[str]) -> Dict[str, Any]:
  if not isinstance(value, dict):
    raise FieldError(field, f"expected a JSON object, found {type(value).__name__}")
  return value


def _id(value: Any, field: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise FieldError(field, f"expected a string or integer id, found {type(value).__name__}")
  return _str(str(value), field)


def _distinct(values: Iterable[str]) -> List[str]:
  return list(dict.fromkeys(values))


def _example(
  id_: str,
  question: str,
  answers: List[str],
  paragraphs: Sequence[Tuple[str, str, bool]],
  docs_field: str,
) -> Example:
  """Builds an Example from (title, paragraph, is_gold) triples, merging exact duplicate
  texts (gold if any copy is)."""
  index: Dict[str, int] = {}
  docs: List[str] = []
  gold: List[bool] = []
  titles: List[str] = []
  for i, (title, paragraph, is_gold) in enumerate(paragraphs):
    text = doc_text(title, paragraph)
    if not text:
      raise FieldError(f"{docs_field}[{i}]", "title and text are both empty")
    if text in index:
      gold[index[text]] = gold[index[text]] or is_gold
      continue
    index[text] = len(docs)
    docs.append(text)
    gold.append(is_gold)
    titles.append(title.strip())
  return Example(id_, question.strip(), _distinct(a.strip() for a in answers), docs, gold, titles)


# ---------------------------------------------------------------------------------------
# One parser per source: decoded JSON value -> Example (or None: skip, counted).


def _sentences_context(row: Dict[str, Any]) -> List[Tuple[str, str]]:
  """hotpotqa/2wiki `context`: [[title, [sentences]]] -> [(title, paragraph)]."""
  pairs = []
  for i, entry in enumerate(_list(_get(row, "context", "context"), "context")):
    entry = _list(entry, f"context[{i}]")
    if len(entry) != 2:
      raise FieldError(f"context[{i}]", f"expected [title, sentences], found {len(entry)} items")
    title = _str(entry[0], f"context[{i}][0]", allow_empty=True)
    sentences = _list(entry[1], f"context[{i}][1]", allow_empty=True)
    parts = [
      _str(s, f"context[{i}][1][{j}]", allow_empty=True).strip() for j, s in enumerate(sentences)
    ]
    pairs.append((title, " ".join(p for p in parts if p)))
  return pairs


def _supporting_titles(row: Dict[str, Any], known: set) -> set:
  titles = set()
  facts = _list(
    _get(row, "supporting_facts", "supporting_facts"), "supporting_facts", allow_empty=True
  )
  for i, fact in enumerate(facts):
    fact = _list(fact, f"supporting_facts[{i}]")
    title = _str(fact[0], f"supporting_facts[{i}][0]").strip()
    if title not in known:
      raise FieldError(
        f"supporting_facts[{i}][0]", f"title {title!r} is not among the context titles"
      )
    titles.add(title)
  return titles


def parse_hotpotqa(row: Any, where: str = "") -> Example:
  """Original HotpotQA (and 2WikiMultihopQA): gold = context titles in supporting_facts."""
  row = _dict(row, None)
  id_ = _id(_get(row, "_id", "_id"), "_id")
  question = _str(_get(row, "question", "question"), "question")
  answer = _str(_get(row, "answer", "answer"), "answer")
  pairs = _sentences_context(row)
  gold = _supporting_titles(row, {t.strip() for t, _ in pairs})
  return _example(id_, question, [answer], [(t, p, t.strip() in gold) for t, p in pairs], "context")


def _spans(answers_objects: list) -> List[str]:
  aliases = []
  for i, obj in enumerate(answers_objects):
    obj = _dict(obj, f"answers_objects[{i}]")
    spans = _list(
      _get(obj, "spans", f"answers_objects[{i}].spans"),
      f"answers_objects[{i}].spans",
      allow_empty=i > 0,
    )
    for j, span in enumerate(spans):
      # IRCoT writes spans as strings; some releases nest them one list deeper.
      group = span if isinstance(span, list) else [span]
      for m, s in enumerate(group):
        field = f"answers_objects[{i}].spans[{j}]" + (f"[{m}]" if isinstance(span, list) else "")
        aliases.append(_str(s, field))
  return aliases


def _paragraph_list(
  row: Dict[str, Any], key: str, title_key: str, text_key: str, gold_key: str
) -> List[Tuple[str, str, bool]]:
  out = []
  for i, p in enumerate(_list(_get(row, key, key), key)):
    p = _dict(p, f"{key}[{i}]")
    out.append(
      (
        _str(
          _get(p, title_key, f"{key}[{i}].{title_key}"), f"{key}[{i}].{title_key}", allow_empty=True
        ),
        _str(
          _get(p, text_key, f"{key}[{i}].{text_key}"), f"{key}[{i}].{text_key}", allow_empty=True
        ),
        formats_flag(_get(p, gold_key, f"{key}[{i}].{gold_key}"), f"{key}[{i}].{gold_key}"),
      )
    )
  return out


def parse_hotpotqa_ircot(row: Any, where: str = "") -> Example:
  """IRCoT-processed HotpotQA: aliases = all answer spans; gold = is_supporting."""
  row = _dict(row, None)
  id_ = _id(_get(row, "question_id", "question_id"), "question_id")
  question = _str(_get(row, "question_text", "question_text"), "question_text")
  answers = _spans(_list(_get(row, "answers_objects", "answers_objects"), "answers_objects"))
  paragraphs = _paragraph_list(row, "contexts", "title", "paragraph_text", "is_supporting")
  return _example(id_, question, answers, paragraphs, "contexts")


def parse_musique(row: Any, where: str = "") -> Optional[Example]:
  """MuSiQue: answer + answer_aliases; gold = is_supporting; unanswerable -> None."""
  row = _dict(row, None)
  if formats_flag(row.get("answerable", True), "answerable") is False:
    return None
  id_ = _id(_get(row, "id", "id"), "id")
  question = _str(_get(row, "question", "question"), "question")
  answers = [_str(_get(row, "answer", "answer"), "answer")]
  aliases = _list(row.get("answer_aliases", []), "answer_aliases", allow_empty=True)
  answers += [_str(a, f"answer_aliases[{i}]") for i, a in enumerate(aliases)]
  paragraphs = _paragraph_list(row, "paragraphs", "title", "paragraph_text", "is_supporting")
  return _example(id_, question, answers, paragraphs, "paragraphs")


def parse_nq(row: Any, where: str = "") -> Example:
  """NQ-open (lost-in-the-middle): answers[]; gold = ctxs[i].isgold; id = "FILE:LINE"
  unless the row has an `id`."""
  row = _dict(row, None)
  id_ = _id(row["id"], "id") if "id" in row else where
  question = _str(_get(row, "question", "question"), "question")
  answers = [
    _str(a, f"answers[{i}]")
    for i, a in enumerate(_list(_get(row, "answers", "answers"), "answers"))
  ]
  paragraphs = _paragraph_list(row, "ctxs", "title", "text", "isgold")
  return _example(id_, question, answers, paragraphs, "ctxs")


# Each takes (decoded row, "FILE:LINE" or "FILE#ITEM"); the location is the fallback id for
# sources whose rows carry none (nq).
PARSERS: Dict[str, Callable[[Any, str], Optional[Example]]] = {
  "hotpotqa": parse_hotpotqa,
  "hotpotqa_ircot": parse_hotpotqa_ircot,
  "musique": parse_musique,
  "2wiki": parse_hotpotqa,
  "nq": parse_nq,
}


@dataclasses.dataclass
class SourceReport(ReadReport):
  """ReadReport plus unanswerable: rows skipped because the source marks them so."""

  unanswerable: int = 0


def _raise_or_skip(error: DataError, on_error: str, report: ReadReport) -> None:
  if on_error == "raise":
    raise error
  report.skip(error)


def _read(
  source_format: str, paths: Sequence[str], on_error: str, report: SourceReport
) -> Iterator[Example]:
  parse = PARSERS[source_format]
  first_seen: Dict[str, str] = {}  # id -> where it was first read
  for path in paths:
    name = paths_lib.path(path).name
    for line, item, value in iter_records(path, on_error, report):
      where = f"{name}:{line}" if item is None else f"{name}#{item}"
      try:
        example = parse(value, where)
      except FieldError as e:
        reason = e.reason if item is None else f"{e.reason} (item {item})"
        _raise_or_skip(DataError(path, line, e.field, reason), on_error, report)
        continue
      if example is None:
        report.unanswerable += 1
        report.skip(DataError(path, line, "answerable", "unanswerable question, skipped"))
        continue
      example.path, example.line = path, line
      if example.id in first_seen:  # output ids key per-question results downstream
        _raise_or_skip(
          DataError(
            path, line, "id", f"duplicate {example.id!r}; first used at {first_seen[example.id]}"
          ),
          on_error,
          report,
        )
        continue
      first_seen[example.id] = f"{path}:{line}"
      report.rows_ok += 1
      yield example


def read_source(
  source_format: str,
  paths: Sequence[str] | str,
  on_error: str = "raise",
  report: Optional[SourceReport] = None,
) -> Tuple[Iterator[Example], SourceReport]:
  """Lazily parsed Examples of a source (not `stage1`) and the report they fill as they
  are read."""
  if source_format not in PARSERS:
    raise ValueError(f"unknown source format {source_format!r}; known: {tuple(PARSERS)}")
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  report = report if report is not None else SourceReport()
  paths = [paths] if isinstance(paths, str) else list(paths)
  return _read(source_format, paths, on_error, report), report


def read_hotpotqa(
  paths: Sequence[str] | str, on_error: str = "raise"
) -> Tuple[Iterator[Example], SourceReport]:
  return read_source("hotpotqa", paths, on_error)


def read_hotpotqa_ircot(
  paths: Sequence[str] | str, on_error: str = "raise"
) -> Tuple[Iterator[Example], SourceReport]:
  return read_source("hotpotqa_ircot", paths, on_error)


def read_musique(
  paths: Sequence[str] | str, on_error: str = "raise"
) -> Tuple[Iterator[Example], SourceReport]:
  return read_source("musique", paths, on_error)


def read_2wiki(
  paths: Sequence[str] | str, on_error: str = "raise"
) -> Tuple[Iterator[Example], SourceReport]:
  return read_source("2wiki", paths, on_error)


def read_nq(
  paths: Sequence[str] | str, on_error: str = "raise"
) -> Tuple[Iterator[Example], SourceReport]:
  return read_source("nq", paths, on_error)


def read_stage1(
  paths: Sequence[str] | str, on_error: str = "raise"
) -> Tuple[Iterator[Dict[str, Any]], ReadReport]:
  """Validated, normalised stage1 rows of one or more files and their ReadReport."""
  report = ReadReport()
  paths = [paths] if isinstance(paths, str) else list(paths)

  def rows() -> Iterator[Dict[str, Any]]:
    for path in paths:
      yield from read_rows(path, STAGE1, on_error, report=report)

  return rows(), report


# ---------------------------------------------------------------------------------------
# Candidate selection.


class DistractorPool:
  """The distinct paragraphs of all questions, BM25-indexed on first use (inputs that
  never need retrieval or truncation never pay for the index)."""

  def __init__(self, examples: Sequence[Example]) -> None:
    self.texts: List[str] = []
    self.index: Dict[str, int] = {}
    self.by_title: Dict[str, List[int]] = {}
    for ex in examples:
      for text, title in zip(ex.docs, ex.titles):
        if text not in self.index:
          self.index[text] = len(self.texts)
          self.texts.append(text)
          if title:
            self.by_title.setdefault(title, []).append(self.index[text])
    self._bm25: Optional[BM25] = None

  @property
  def bm25(self) -> BM25:
    if self._bm25 is None:
      from clara_jax.data.bm25 import BM25

      self._bm25 = BM25(self.texts)
    return self._bm25

  def excluded(self, ex: Example) -> List[int]:
    """Pool entries that may not be distractors for `ex`: its own paragraphs and every
    passage titled like one of its gold paragraphs."""
    out = {self.index[t] for t in ex.docs}
    for title, is_gold in zip(ex.titles, ex.gold):
      if is_gold and title:
        out.update(self.by_title.get(title, ()))
    return sorted(out)

  def retrieve(self, ex: Example, n: int) -> List[str]:
    return [self.texts[i] for i in self.bm25.top_n(ex.question, n, exclude=self.excluded(ex))]

  def own_scores(self, ex: Example) -> List[float]:
    scores = self.bm25.scores(ex.question)
    return [float(scores[self.index[t]]) for t in ex.docs]


def select_candidates(
  ex: Example, num_docs: int, pool: DistractorPool
) -> Tuple[List[str], List[bool], int, int]:
  """Exactly `num_docs` candidates for `ex`, before shuffling: (texts, is_gold,
  distractors added, own documents dropped). Raises FieldError if impossible."""
  num_gold = sum(ex.gold)
  if num_gold > num_docs:
    raise FieldError("pos_index", f"{num_gold} gold documents do not fit in {num_docs} candidates")
  if len(ex.docs) > num_docs:
    scores = pool.own_scores(ex)
    non_gold = [i for i, g in enumerate(ex.gold) if not g]
    # Stable sort: equal scores keep source order, so the choice is reproducible.
    ranked = sorted(non_gold, key=lambda i: -scores[i])
    keep = {i for i, g in enumerate(ex.gold) if g} | set(ranked[: num_docs - num_gold])
    kept = [i for i in range(len(ex.docs)) if i in keep]
    return ([ex.docs[i] for i in kept], [ex.gold[i] for i in kept], 0, len(ex.docs) - num_docs)
  need = num_docs - len(ex.docs)
  added = pool.retrieve(ex, need) if need else []
  if len(added) < need:
    raise FieldError(
      "docs",
      f"only {len(added)} distractors available from the other "
      f"questions' paragraphs; {need} needed for {num_docs} candidates",
    )
  return list(ex.docs) + added, list(ex.gold) + [False] * need, need, 0


def shuffled_row(ex: Example, texts: List[str], gold: List[bool], seed: int) -> Dict[str, Any]:
  """The output row: candidates shuffled by a per-row RNG, gold positions in pos_index."""
  order = list(range(len(texts)))
  random.Random(f"{seed}:{ex.id}").shuffle(order)
  docs = [texts[i] for i in order]
  pos_index = [p for p, i in enumerate(order) if gold[i]]
  return {
    "question": ex.question,
    "docs": docs,
    "answer": ex.answers[0],
    "answers": ex.answers,
    "pos_index": pos_index,
    "id": ex.id,
  }


def build_rows(
  examples: Sequence[Example],
  stage: str,
  num_docs: int,
  seed: int,
  on_error: str,
  read_report: ReadReport,
  report: ConvertReport,
  pool: Optional[DistractorPool] = None,
) -> Iterator[Dict[str, Any]]:
  """stage2 / stage1_2 rows of `examples`, each validated; problems raise DataError at
  the example's source line, or are skipped and counted."""
  pool = pool if pool is not None else DistractorPool(examples)
  for ex in examples:
    try:
      texts, gold, added, dropped = select_candidates(ex, num_docs, pool)
      row = shuffled_row(ex, texts, gold, seed)
      validate_row(row, stage, num_docs)
    except FieldError as e:
      _raise_or_skip(DataError(ex.path, ex.line, e.field, e.reason), on_error, read_report)
      read_report.rows_ok -= 1
      continue
    report.distractors_added += added
    report.truncated_candidates += dropped
    yield row


def _not_empty(
  rows: Iterable[Dict[str, Any]], inputs: Sequence[str], report: ReadReport
) -> Iterator[Dict[str, Any]]:
  """`rows`, raising DataError at the end if there were none: an empty conversion (an
  empty input, or every row skipped) is an error, not an empty file that replaces the
  previous output."""
  count = 0
  for row in rows:
    count += 1
    yield row
  if not count:
    raise no_rows(", ".join(inputs), report)


# ---------------------------------------------------------------------------------------
# The whole conversion.


def _counted(
  rows: Iterable[Dict],
  total: Optional[int],
  progress: Optional[Callable[[int, Optional[int]], None]],
) -> Iterator[Dict]:
  """`rows`, telling `progress(done, total)` every 1,000 rows and at the end."""
  done = 0
  for done, row in enumerate(rows, 1):
    if progress is not None and done % 1000 == 0:
      progress(done, total)
    yield row
  if progress is not None:
    progress(done, done)


def _same_file(a: str, b: str) -> bool:
  """Whether two existing paths name one file (locally also through links)."""
  if not (paths_lib.exists(a) and paths_lib.exists(b)):
    return False
  if paths_lib.is_remote(a) or paths_lib.is_remote(b):
    return os.fspath(paths_lib.path(a)) == os.fspath(paths_lib.path(b))
  return os.path.samefile(a, b)  # local only: links and hard links name one file


def _check_arguments(source_format: str, stage: str, on_error: str, limit: Optional[int]) -> None:
  if source_format not in SOURCE_FORMATS:
    raise ValueError(f"unknown source format {source_format!r}; known: {SOURCE_FORMATS}")
  if stage not in OUTPUT_STAGES:
    raise ValueError(f"stage must be one of {OUTPUT_STAGES}, got {stage!r}")
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")


def _check_not_an_input(inputs: Sequence[str], out_path: str) -> None:
  for path in inputs:
    if _same_file(path, out_path):
      raise DataError(
        out_path,
        0,
        None,
        "the output is also an input; writing it would "
        "replace the data it is converted from (choose another --out)",
      )


def _write_candidate_rows(
  report: ConvertReport,
  inputs: Sequence[str],
  *,
  seed: int,
  on_error: str,
  limit: Optional[int],
  progress: Optional[Callable[[int, Optional[int]], None]],
) -> ReadReport:
  """Writes the stage2 / stage1_2 rows of `report`'s source format and stage (each with
  `report.num_docs` candidates) to `report.out_path`, counting into `report`; returns
  the reading's report."""
  example_iter, read_report = read_source(report.source_format, inputs, on_error)
  # The pool needs every question before the first row is built.
  examples = list(itertools.islice(example_iter, limit))
  pool = DistractorPool(examples)
  report.pool_size = len(pool.texts)
  rows = build_rows(
    examples, report.stage, report.num_docs, seed, on_error, read_report, report, pool
  )
  report.rows_out = write_jsonl_atomic(
    report.out_path,
    _counted(_not_empty(rows, inputs, read_report), len(examples), progress),
  )
  report.unanswerable = read_report.unanswerable
  return read_report


def convert(
  source_format: str,
  inputs: Sequence[str] | str,
  out_path: str,
  *,
  candidates: int = 20,
  k: int = 5,
  seed: int = 0,
  on_error: str = "raise",
  stage: str = STAGE2,
  limit: Optional[int] = None,
  progress: Optional[Callable[[int, Optional[int]], None]] = None,
) -> ConvertReport:
  """Converts `inputs` (one path or several, pooled) of `source_format` to `stage` JSONL
  at `out_path`, written atomically.

  candidates: documents per stage2 row; k: documents per stage1_2 row; seed: candidate
  shuffle seed; on_error: "raise" (DataError at the first bad row) or "skip" (count it);
  limit: convert only the first `limit` usable rows (the distractor pool is built from
  those rows only). `stage` is ignored for source_format "stage1". progress(rows
  written, total or None): called as rows are written.
  """
  start = time.perf_counter()
  _check_arguments(source_format, stage, on_error, limit)
  inputs = [inputs] if isinstance(inputs, str) else list(inputs)
  _check_not_an_input(inputs, out_path)
  if source_format == STAGE1:
    report = ConvertReport(source_format, STAGE1, out_path)
    rows, read_report = read_stage1(inputs, on_error)
    report.rows_out = write_jsonl_atomic(
      out_path,
      _counted(_not_empty(itertools.islice(rows, limit), inputs, read_report), None, progress),
    )
  else:
    num_docs = candidates if stage == STAGE2 else k
    if num_docs < 1:
      raise ValueError(f"need at least one document per row, got {num_docs}")
    report = ConvertReport(source_format, stage, out_path, num_docs=num_docs)
    read_report = _write_candidate_rows(
      report, inputs, seed=seed, on_error=on_error, limit=limit, progress=progress
    )
  report.rows_in = read_report.rows_read
  report.skipped = read_report.rows_skipped
  report.reasons = list(read_report.reasons)
  report.seconds = round(time.perf_counter() - start, 3)
  return report
