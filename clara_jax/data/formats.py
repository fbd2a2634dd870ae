"""The CLaRa JSONL formats: validation with errors that name file, line and field, strict
or skip-and-count reading, and atomic writing.

Normalised rows (what every reader yields and every converter writes):

* stage1:   {"data_type": "qa"|"paraphrase", "question": [str], "answers": [str],
             "docs": [str]}  (qa: one answer per question; paraphrase: answers[0] is the
             paraphrase target and questions may be empty)
* stage1_2: {"question": str, "docs": [str], "answer": str, "answers": [str]}
* stage2:   stage1_2 fields + {"pos_index": [int]} (gold candidates; may be empty)

`answer` is the training target; `answers` keeps every alias for evaluation. Field
fallbacks follow the reference: docs from `docs`/`context`/`content`; the answer from
`answer`, `answers[0]` or `golden_answers[0]`.

Evaluation files (`read_eval_rows`) are stage2 or stage1_2, one schema per file, plus
optional extras (`id`, `kind`, `doc_ids`, ...; see EVAL_EXTRAS) checked row by row.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Dict, Generator, Iterable, Iterator, List, Optional, Tuple

from clara_jax import paths

STAGE1, STAGE1_2, STAGE2 = "stage1", "stage1_2", "stage2"
FORMATS = (STAGE1, STAGE1_2, STAGE2)
ON_ERROR = ("raise", "skip")
MAX_REASONS = 5


class DataError(ValueError):
  """Bad input, located: `path:line: field 'name': reason`."""

  def __init__(self, path: str, line: int, field: Optional[str], reason: str):
    self.path, self.line, self.field, self.reason = path, line, field, reason
    where = f"{path}:{line}" if line else path
    what = f"field '{field}': " if field else ""
    super().__init__(f"{where}: {what}{reason}")


class FieldError(ValueError):
  """A row-level problem before the file and line are known."""

  def __init__(self, field: Optional[str], reason: str):
    self.field, self.reason = field, reason
    super().__init__(f"field '{field}': {reason}" if field else reason)


@dataclasses.dataclass
class ReadReport:
  """What a reader or converter saw: rows read, kept and skipped, every skip reason
  counted, and the first full messages.

  `reasons` keeps only the first MAX_REASONS messages (so a million bad rows cost no
  memory), but `reason_counts` counts every skip by (field, reason): a summary must not
  hide that one cause of failure dominates. `schema` is the row schema a reader settled
  on (e.g. `read_eval_rows`), None where it was not detected.
  """

  rows_read: int = 0
  rows_ok: int = 0
  rows_skipped: int = 0
  reasons: List[str] = dataclasses.field(default_factory=list)
  reason_counts: Dict[Tuple[Optional[str], str], int] = dataclasses.field(default_factory=dict)
  reason_first: Dict[Tuple[Optional[str], str], str] = dataclasses.field(default_factory=dict)
  schema: Optional[str] = None

  def skip(self, error: DataError) -> None:
    self.rows_skipped += 1
    key = (getattr(error, "field", None), getattr(error, "reason", str(error)))
    if key not in self.reason_counts:
      self.reason_counts[key] = 0
      self.reason_first[key] = _where(error)
    self.reason_counts[key] += 1
    if len(self.reasons) < MAX_REASONS:
      self.reasons.append(str(error))

  def summary(self) -> str:
    text = f"{self.rows_ok} rows kept, {self.rows_skipped} skipped of {self.rows_read} read"
    if self.reason_counts:
      text += "; skip reasons:\n  " + "\n  ".join(self._counted_reasons())
    if self.reasons:
      text += "\nfirst reasons:\n  " + "\n  ".join(self.reasons)
      more = self.rows_skipped - len(self.reasons)
      if more > 0:
        text += f"\n  and {more} more"
    return text

  def _counted_reasons(self) -> List[str]:
    """One line per distinct (field, reason), most frequent first."""
    ordered = sorted(self.reason_counts.items(), key=lambda item: -item[1])
    lines = []
    for (field, reason), count in ordered:
      what = f"field '{field}': " if field else ""
      lines.append(f"{count} x {what}{reason} (first at {self.reason_first[(field, reason)]})")
    return lines


def _where(error: Exception) -> str:
  """`path:line` of a DataError (just `path` for file-level ones)."""
  path, line = getattr(error, "path", None), getattr(error, "line", None)
  if path is None:
    return "?"
  return f"{path}:{line}" if line else path


def _text(value: Any, field: str, allow_empty: bool = False) -> str:
  if not isinstance(value, str):
    raise FieldError(field, f"expected a string, found {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise FieldError(field, "is empty")
  return value


def _text_list(value: Any, field: str, allow_empty_list: bool = False) -> List[str]:
  if not isinstance(value, list):
    raise FieldError(field, f"expected a list of strings, found {type(value).__name__}")
  if not value and not allow_empty_list:
    raise FieldError(field, "is an empty list")
  return [_text(v, f"{field}[{i}]") for i, v in enumerate(value)]


def _docs(row: Dict[str, Any], num_docs: Optional[int]) -> List[str]:
  for name in ("docs", "context", "content"):
    if name in row:
      docs = _text_list(row[name], name)
      if num_docs is not None and len(docs) != num_docs:
        raise FieldError(name, f"expected {num_docs} documents, found {len(docs)}")
      return docs
  raise FieldError("docs", "missing (also looked for 'context' and 'content')")


def _answers(row: Dict[str, Any]) -> List[str]:
  if "answer" in row:
    if isinstance(row["answer"], list):
      return _text_list(row["answer"], "answer")
    return [_text(row["answer"], "answer")]
  if "answers" in row:
    return _text_list(row["answers"], "answers")
  if "golden_answers" in row:
    return _text_list(row["golden_answers"], "golden_answers")
  raise FieldError("answer", "missing (also looked for 'answers' and 'golden_answers')")


def validate_row(row: Any, fmt: str, num_docs: Optional[int] = None) -> Dict[str, Any]:
  """Checks one decoded JSON value against a format; returns the normalised row.

  Raises FieldError naming the offending field.
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
  if not isinstance(row, dict):
    raise FieldError(None, f"expected a JSON object, found {type(row).__name__}")
  if fmt == STAGE1:
    data_type = row.get("data_type", "qa")
    if data_type not in ("qa", "paraphrase"):
      raise FieldError("data_type", f"expected 'qa' or 'paraphrase', found {data_type!r}")
    docs = _docs(row, 1 if num_docs is None else num_docs)
    answers = _text_list(row.get("answers"), "answers") if "answers" in row else None
    if answers is None:
      raise FieldError("answers", "missing")
    if data_type == "qa":
      questions = _text_list(row.get("question"), "question") if "question" in row else None
      if questions is None:
        raise FieldError("question", "missing")
      if len(questions) != len(answers):
        raise FieldError("answers", f"{len(answers)} answers for {len(questions)} questions")
    else:
      q = row.get("question", [])
      questions = [] if q in ("", None) else _text_list(q, "question", allow_empty_list=True)
    return {"data_type": data_type, "question": questions, "answers": answers, "docs": docs}

  question = _text(row.get("question"), "question") if "question" in row else None
  if question is None:
    raise FieldError("question", "missing")
  docs = _docs(row, num_docs)
  answers = _answers(row)
  out = {"question": question, "docs": docs, "answer": answers[0], "answers": answers}
  if fmt == STAGE2:
    pos = row.get("pos_index", [])
    if not isinstance(pos, list) or not all(
      isinstance(p, int) and not isinstance(p, bool) for p in pos
    ):
      raise FieldError("pos_index", f"expected a list of integers, found {pos!r}")
    for p in pos:
      if not 0 <= p < len(docs):
        raise FieldError("pos_index", f"{p} is out of range for {len(docs)} documents")
    if len(set(pos)) != len(pos):
      raise FieldError("pos_index", f"repeats an index: {pos}")
    out["pos_index"] = list(pos)
  return out


# A JSONL row longer than this is refused: no CLaRa row comes near it (a stage2 row with
# 20 candidates is tens of kilobytes), and reading an unbounded line (a JSON array or a
# binary file given by mistake, a file without newlines) would hold all of it in memory.
MAX_LINE_BYTES = 16 << 20
_LINE_CHUNK = 1 << 20  # the piece of an overlong line read at a time while skipping it


def check_input_file(path: str) -> None:
  """A missing input or a directory given for a file, named before anything is read."""
  if paths.isdir(path):
    raise IsADirectoryError(f"{path}: is a directory; expected a file")
  if not paths.exists(path):
    raise FileNotFoundError(f"{path}: no such file")


def check_output_dir(path: str) -> None:
  """An output directory must not be an existing file; checked before any work."""
  if paths.isfile(path):
    raise NotADirectoryError(f"{path}: is a file; expected a directory to write into")


def _lines(f: Any) -> Iterator[Tuple[int, Optional[bytes], int]]:
  """(line number, bytes, length) of each line of a binary stream with `readline(size)`
  (`paths.open_binary`); bytes is None for a line over MAX_LINE_BYTES, which is read past
  in chunks, never held whole."""
  line_no = 0
  while True:
    raw = f.readline(MAX_LINE_BYTES + 1)
    if not raw:
      return
    line_no += 1
    if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
      yield line_no, raw, len(raw)
      continue
    length = len(raw)
    while not raw.endswith(b"\n"):
      raw = f.readline(_LINE_CHUNK)
      if not raw:
        break
      length += len(raw)
    yield line_no, None, length


def iter_json_lines(
  path: str, on_error: str = "raise", report: Optional[ReadReport] = None
) -> Iterator[tuple]:
  """Yields (line number, decoded JSON value) for every non-blank line of a (gzipped)
  JSONL file; undecodable lines and lines over MAX_LINE_BYTES raise DataError or are
  skipped and counted."""
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  check_input_file(path)
  report = report if report is not None else ReadReport()
  with paths.open_binary(path) as f:
    for line_no, raw, length in _lines(f):
      if raw is not None and not raw.strip():
        continue
      report.rows_read += 1
      try:
        if raw is None:
          raise DataError(
            path,
            line_no,
            None,
            f"line of {length} bytes is longer than "
            f"the {MAX_LINE_BYTES} allowed for one row (not JSONL?)",
          )
        try:
          text = raw.decode("utf-8").rstrip("\r\n")  # error columns on this line
        except UnicodeDecodeError as e:
          raise DataError(
            path, line_no, None, f"not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})"
          ) from None
        try:
          value = json.loads(text)
        except json.JSONDecodeError as e:
          raise DataError(
            path, line_no, None, f"invalid JSON: {e.msg} at column {e.colno}"
          ) from None
      except DataError as error:
        if on_error == "raise":
          raise
        report.skip(error)
        continue
      yield line_no, value


def read_rows(
  path: str,
  fmt: str,
  on_error: str = "raise",
  num_docs: Optional[int] = None,
  report: Optional[ReadReport] = None,
) -> Iterator[Dict[str, Any]]:
  """Validated, normalised rows of a CLaRa JSONL file (see the module docstring).

  `on_error="raise"` stops at the first bad row with a DataError naming file, line and
  field; `"skip"` skips and counts it in `report`.
  """
  report = report if report is not None else ReadReport()
  yield from _checked_rows(
    path, on_error, report, lambda value, _: validate_row(value, fmt, num_docs)
  )


def _checked_rows(
  path: str, on_error: str, report: ReadReport, check: Callable[[Any, int], Dict[str, Any]]
) -> Generator[Dict[str, Any], None, None]:
  """`check(value, line)` of every JSON line: its row, or a FieldError that becomes a
  DataError naming file and line (raised, or skipped and counted in `report`)."""
  for line_no, value in iter_json_lines(path, on_error, report):
    try:
      row = check(value, line_no)
    except FieldError as e:
      error = DataError(path, line_no, e.field, e.reason)
      if on_error == "raise":
        raise error from None
      report.skip(error)
      continue
    report.rows_ok += 1
    yield row


# ---------------------------------------------------------------------------------------
# Evaluation files: one schema per file, gold labels never dropped, optional extras checked.

EVAL_FORMATS = (STAGE2, STAGE1_2)


def _plain_text_list(value: Any, field: str) -> List[str]:
  """A list of strings that may be empty and may hold empty strings (descriptive text,
  not identifiers)."""
  if not isinstance(value, list):
    raise FieldError(field, f"expected a list of strings, found {type(value).__name__}")
  return [_text(v, f"{field}[{i}]", allow_empty=True) for i, v in enumerate(value)]


def _one_per_doc(values: List[Any], field: str, num_docs: int) -> List[Any]:
  """Per-document annotations must line up with `docs`, or they describe the wrong one."""
  if len(values) != num_docs:
    raise FieldError(field, f"expected {num_docs} entries (one per document), found {len(values)}")
  return values


def _flag(value: Any, field: str) -> bool:
  if not isinstance(value, bool):
    raise FieldError(field, f"expected true or false, found {type(value).__name__}")
  return value


def _control_clues(value: Any, num_docs: int) -> List[List[str]]:
  if not isinstance(value, list):
    raise FieldError(
      "control_clues", f"expected a list of lists of strings, found {type(value).__name__}"
    )
  clues = [_plain_text_list(v, f"control_clues[{i}]") for i, v in enumerate(value)]
  return _one_per_doc(clues, "control_clues", num_docs)


# name -> check(value, number of documents) returning the value to keep. Identifiers
# (`id`, `doc_ids`) must be non-empty; descriptive text may be empty.
EVAL_EXTRAS: Dict[str, Callable[[Any, int], Any]] = {
  "id": lambda v, n: _text(v, "id"),
  "kind": lambda v, n: _text(v, "kind", allow_empty=True),
  "template": lambda v, n: _text(v, "template", allow_empty=True),
  "seen": lambda v, n: _flag(v, "seen"),
  "doc_ids": lambda v, n: _one_per_doc(
    _text_list(v, "doc_ids", allow_empty_list=True), "doc_ids", n
  ),
  "doc_kinds": lambda v, n: _one_per_doc(_plain_text_list(v, "doc_kinds"), "doc_kinds", n),
  "clues": lambda v, n: _plain_text_list(v, "clues"),
  "control_clues": _control_clues,
  "bridge_clues": lambda v, n: _plain_text_list(v, "bridge_clues"),
}


class _EvalRowChecker:
  """Per-file state of `read_eval_rows`: the file's schema and where it came from, and
  the line of every id kept so far.

  The schema is fixed once per file, so a row that disagrees is an error at that row,
  never a reason to re-read the whole file under another schema (which silently dropped
  every gold label).
  """

  def __init__(self, fmt: Optional[str]):
    self.schema = fmt
    self.origin = "declared by the caller" if fmt else ""
    self.id_lines: Dict[str, int] = {}

  def check(self, value: Any, line_no: int) -> Dict[str, Any]:
    """The normalised row with its extras; raises FieldError."""
    if isinstance(value, dict):
      self._settle_schema(value, line_no)
    row = validate_row(value, self.schema or STAGE1_2)  # a non-object fails here
    row.setdefault("pos_index", [])  # stage1_2: one shape for downstream code
    num_docs = len(row["docs"])
    for name, check in EVAL_EXTRAS.items():
      if name in value:
        row[name] = check(value[name], num_docs)
    self._check_unique_id(row, line_no)
    return row

  def _settle_schema(self, value: Dict[str, Any], line_no: int) -> None:
    if self.schema is None:
      self.schema = STAGE2 if "pos_index" in value else STAGE1_2
      self.origin = f"detected from line {line_no}"
    has_gold = "pos_index" in value
    if self.schema == STAGE2 and not has_gold:
      raise FieldError("pos_index", f"missing; this file's rows are stage2 ({self.origin})")
    if self.schema == STAGE1_2 and has_gold:
      raise FieldError(
        "pos_index",
        f"unexpected; this file's rows are stage1_2 ({self.origin}), which have no gold labels",
      )

  def _check_unique_id(self, row: Dict[str, Any], line_no: int) -> None:
    """Ids key per-question results; a repeated one would merge two questions."""
    if "id" not in row:
      return
    first = self.id_lines.get(row["id"])
    if first is not None:
      raise FieldError("id", f"duplicate {row['id']!r}; first used on line {first}")
    self.id_lines[row["id"]] = line_no


def read_corpus(path: str) -> List[Dict[str, str]]:
  """The documents of a corpus JSONL file, one {"id", "text"} object per line (`id`
  defaults to the row's position), checked row by row: `text` a non-empty string, ids
  unique, since they name the search results. Other keys are ignored. A file without
  rows is an error."""
  return _read_texts_with_ids(path, "text")


def read_questions(path: str) -> List[Dict[str, str]]:
  """The questions of a JSONL file, one {"question", "id"} object per line (`id`
  defaults to the row's position), checked row by row: `question` a non-empty string,
  ids unique, since they name the answers. Other keys are ignored. A file without rows
  is an error."""
  return _read_texts_with_ids(path, "question")


def _read_texts_with_ids(path: str, field: str) -> List[Dict[str, str]]:
  """The rows of a JSONL file as {"id", `field`}: `field` a non-empty string, `id` a
  string or integer (default: the row's position) unique in the file."""
  id_lines: Dict[str, int] = {}

  def check(value: Any, line_no: int) -> Dict[str, str]:
    if not isinstance(value, dict):
      raise FieldError(None, f"expected a JSON object, found {type(value).__name__}")
    if field not in value:
      raise FieldError(field, "missing")
    text = _text(value[field], field)
    row_id = value.get("id", str(len(id_lines)))
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
      raise FieldError("id", f"expected a string or integer, found {type(row_id).__name__}")
    row_id = _text(str(row_id), "id")
    if row_id in id_lines:
      raise FieldError("id", f"duplicate {row_id!r}; first used on line {id_lines[row_id]}")
    id_lines[row_id] = line_no
    return {"id": row_id, field: text}

  report = ReadReport()
  rows = list(_checked_rows(path, "raise", report, check))
  if not rows:
    raise no_rows(path, report)
  return rows


def _check_limit(limit: Optional[int]) -> None:
  """`limit=0` would silently evaluate nothing, so only positive limits are allowed."""
  if limit is None:
    return
  if isinstance(limit, bool) or not isinstance(limit, int):
    raise TypeError(f"limit must be a positive int or None, got {limit!r}")
  if limit <= 0:
    raise ValueError(f"limit must be positive, got {limit}")


def no_rows(path: str, report: ReadReport) -> DataError:
  """An evaluation over no rows reports nothing meaningful, so it is an error."""
  if not report.rows_read:
    return DataError(path, 0, None, "no rows: the file is empty")
  return DataError(
    path, 0, None, f"no rows: all {report.rows_skipped} rows were skipped; {report.summary()}"
  )


def read_eval_rows(
  path: str,
  fmt: Optional[str] = None,
  on_error: str = "raise",
  limit: Optional[int] = None,
  report: Optional[ReadReport] = None,
) -> List[Dict[str, Any]]:
  """Validated evaluation rows of a stage2 or stage1_2 JSONL file, read row by row.

  fmt: "stage2" or "stage1_2", or None to detect it from the first JSON object ("stage2"
  if it has `pos_index`); every row must then match that schema. stage1_2 rows get
  `pos_index: []`. The optional extras in EVAL_EXTRAS are checked and kept; other keys are
  ignored. Ids must be unique. on_error: "raise" (DataError at the first bad row) or
  "skip" (count it in `report`, whose `schema` records the schema used). limit: keep the
  first `limit` good rows (rows after them are not read). A file that yields no row
  raises DataError.
  """
  _check_limit(limit)
  if fmt is not None and fmt not in EVAL_FORMATS:
    raise ValueError(f"fmt must be one of {EVAL_FORMATS} or None, got {fmt!r}")
  report = report if report is not None else ReadReport()
  checker, rows = _EvalRowChecker(fmt), []
  checked = _checked_rows(path, on_error, report, checker.check)
  try:
    for row in checked:
      rows.append(row)
      if limit is not None and len(rows) >= limit:
        break
  finally:
    checked.close()
    report.schema = checker.schema
  if not rows:
    raise no_rows(path, report)
  return rows


def write_json_atomic(path: str, obj: Any, indent: int = 1) -> None:
  """One JSON document, written all or nothing (`paths.write_atomic`)."""
  paths.write_atomic(path, [json.dumps(obj, indent=indent, sort_keys=False)])


def write_jsonl_atomic(path: str, rows: Iterable[Dict[str, Any]]) -> int:
  """Writes rows as JSONL all or nothing (`paths.write_atomic`), so a failure (including
  bad input raised by the `rows` iterator) never leaves a partial file and never touches
  an existing one. Returns the number of rows written."""
  count = 0

  def lines() -> Iterator[str]:
    nonlocal count
    for row in rows:
      yield json.dumps(row, ensure_ascii=False) + "\n"
      count += 1

  paths.write_atomic(path, lines())
  return count
