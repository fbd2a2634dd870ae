"""Format validation: every bad-input case names file, line and field; skip mode counts;
atomic writes never leave partial files."""

import gzip
import json

import pytest

from clara_jax.data import formats
from clara_jax.data.formats import DataError, ReadReport, read_rows, write_jsonl_atomic

GOOD2 = {"question": "Who?", "docs": ["a b", "c d", "e f"], "answer": "a", "pos_index": [0]}


def _write(path, lines):
  path.write_bytes(
    b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines) + b"\n"
  )
  return str(path)


def test_normalises_each_format(tmp_path):
  s1 = _write(
    tmp_path / "s1.jsonl",
    [
      {"data_type": "qa", "question": ["q1", "q2"], "answers": ["a1", "a2"], "docs": ["d"]},
      {"data_type": "paraphrase", "question": "", "answers": ["p"], "docs": ["d"]},
    ],
  )
  rows = list(read_rows(s1, "stage1"))
  assert rows[1]["question"] == [] and rows[0]["answers"] == ["a1", "a2"]
  s12 = _write(
    tmp_path / "s12.jsonl",
    [
      {"question": "q", "docs": ["d"] * 5, "golden_answers": ["x", "y"]},
      {"question": "q", "context": ["d"] * 5, "answers": ["z"]},
    ],
  )
  rows = list(read_rows(s12, "stage1_2", num_docs=5))
  assert rows[0]["answer"] == "x" and rows[0]["answers"] == ["x", "y"]
  assert rows[1]["docs"] == ["d"] * 5
  gz = tmp_path / "s2.jsonl.gz"
  gz.write_bytes(gzip.compress((json.dumps(GOOD2) + "\n").encode()))
  assert list(read_rows(str(gz), "stage2"))[0]["pos_index"] == [0]


BAD = [
  (b'{"question": "Who?", "docs": ["a"], "answer": "a"', None, "invalid JSON"),
  (b'{"question": "caf\xe9", "docs": ["a"], "answer": "a"}', None, "not valid UTF-8"),
  ({**GOOD2, "question": 3}, "question", "expected a string"),
  ({k: v for k, v in GOOD2.items() if k != "answer"}, "answer", "missing"),
  ({**GOOD2, "docs": ["a", "  "]}, "docs[1]", "is empty"),
  ({**GOOD2, "pos_index": [3]}, "pos_index", "out of range for 3 documents"),
  ({**GOOD2, "pos_index": ["0"]}, "pos_index", "list of integers"),
  ([1, 2], None, "expected a JSON object"),
]


@pytest.mark.parametrize("line,field,reason", BAD)
def test_bad_rows_name_file_line_and_field(tmp_path, line, field, reason):
  path = _write(tmp_path / "bad.jsonl", [GOOD2, line])
  with pytest.raises(DataError) as err:
    list(read_rows(path, "stage2"))
  message = str(err.value)
  assert message.startswith(f"{path}:2: ")
  assert reason in message
  if field:
    assert f"field '{field}'" in message
  report = ReadReport()
  rows = list(read_rows(path, "stage2", on_error="skip", report=report))
  assert len(rows) == 1 and report.rows_skipped == 1 and report.rows_read == 2
  assert reason in report.summary()


def test_wrong_number_of_documents(tmp_path):
  path = _write(tmp_path / "s12.jsonl", [{**GOOD2, "docs": ["a"] * 4}])
  with pytest.raises(DataError, match=r"s12.jsonl:1: field 'docs': expected 5 documents"):
    list(read_rows(path, "stage1_2", num_docs=5))
  path = _write(
    tmp_path / "s1.jsonl",
    [{"data_type": "qa", "question": ["q"], "answers": ["a", "b"], "docs": ["d"]}],
  )
  with pytest.raises(DataError, match="2 answers for 1 questions"):
    list(read_rows(path, "stage1"))


def test_missing_file_and_bad_options(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    list(read_rows(str(tmp_path / "nope.jsonl"), "stage2"))
  with pytest.raises(ValueError, match="on_error"):
    list(read_rows(str(tmp_path / "nope.jsonl"), "stage2", on_error="ignore"))


def test_atomic_write_keeps_existing_file_on_failure(tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_text("previous\n")

  def rows():
    yield {"a": 1}
    raise DataError("in.jsonl", 7, "docs", "is empty")

  with pytest.raises(DataError):
    write_jsonl_atomic(str(out), rows())
  assert out.read_text() == "previous\n"
  assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
  assert write_jsonl_atomic(str(out), [{"a": 1}, {"b": "é"}]) == 2
  assert [json.loads(line) for line in out.read_text("utf-8").splitlines()] == [
    {"a": 1},
    {"b": "é"},
  ]
  assert formats.validate_row(GOOD2, "stage2")["answers"] == ["a"]
