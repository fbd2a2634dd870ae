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
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import tempfile
from typing import Any, Dict, Iterable, Iterator, List, Optional

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
  """What a reader or converter saw: rows read, kept, skipped and the first reasons."""

  rows_read: int = 0
  rows_ok: int = 0
  rows_skipped: int = 0
  reasons: List[str] = dataclasses.field(default_factory=list)

  def skip(self, error: DataError) -> None:
    self.rows_skipped += 1
    if len(self.reasons) < MAX_REASONS:
      self.reasons.append(str(error))

  def summary(self) -> str:
    text = f"{self.rows_ok} rows kept, {self.rows_skipped} skipped of {self.rows_read} read"
    if self.reasons:
      text += "; first reasons:\n  " + "\n  ".join(self.reasons)
    return text


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
    if not isinstance(pos, list) or not all(isinstance(p, int) and not isinstance(p, bool)
                                            for p in pos):
      raise FieldError("pos_index", f"expected a list of integers, found {pos!r}")
    for p in pos:
      if not 0 <= p < len(docs):
        raise FieldError("pos_index", f"{p} is out of range for {len(docs)} documents")
    if len(set(pos)) != len(pos):
      raise FieldError("pos_index", f"repeats an index: {pos}")
    out["pos_index"] = list(pos)
  return out


def _open_binary(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_json_lines(path: str, on_error: str = "raise",
                    report: Optional[ReadReport] = None) -> Iterator[tuple]:
  """Yields (line number, decoded JSON value) for every non-blank line of a (gzipped)
  JSONL file; undecodable lines raise DataError or are skipped and counted."""
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  report = report if report is not None else ReadReport()
  with _open_binary(path) as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      report.rows_read += 1
      try:
        try:
          text = raw.decode("utf-8").rstrip("\r\n")  # error columns on this line
        except UnicodeDecodeError as e:
          raise DataError(path, line_no, None,
                          f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
        try:
          value = json.loads(text)
        except json.JSONDecodeError as e:
          raise DataError(path, line_no, None, f"invalid JSON: {e.msg} at column {e.colno}")
      except DataError as error:
        if on_error == "raise":
          raise
        report.skip(error)
        continue
      yield line_no, value


def read_rows(path: str, fmt: str, on_error: str = "raise", num_docs: Optional[int] = None,
              report: Optional[ReadReport] = None) -> Iterator[Dict[str, Any]]:
  """Validated, normalised rows of a CLaRa JSONL file (see the module docstring).

  `on_error="raise"` stops at the first bad row with a DataError naming file, line and
  field; `"skip"` skips and counts it in `report`.
  """
  report = report if report is not None else ReadReport()
  for line_no, value in iter_json_lines(path, on_error, report):
    try:
      row = validate_row(value, fmt, num_docs)
    except FieldError as e:
      error = DataError(path, line_no, e.field, e.reason)
      if on_error == "raise":
        raise error from None
      report.skip(error)
      continue
    report.rows_ok += 1
    yield row


def write_jsonl_atomic(path: str, rows: Iterable[Dict[str, Any]]) -> int:
  """Writes rows as JSONL through a temporary file renamed into place, so a failure
  (including bad input raised by the `rows` iterator) never leaves a partial file and
  never touches an existing one. Returns the number of rows written."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".jsonl", dir=directory)
  count = 0
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return count
