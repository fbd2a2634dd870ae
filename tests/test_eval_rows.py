"""Evaluation-file reading: one schema per file, so a bad row is an error at that row and
never a reason to drop every gold label; extras checked per row; counted skip reasons."""

import json

import pytest

from clara_jax.data.formats import MAX_REASONS, DataError, ReadReport, read_eval_rows

DOCS = ["alpha one", "beta two", "gamma three"]


def _row(i, **extra):
  """A good stage2 row whose gold label differs per row (so a lost label is visible)."""
  return {
    "id": f"q{i}",
    "question": f"Q{i}?",
    "docs": DOCS,
    "answer": f"a{i}",
    "pos_index": [i % 3],
    **extra,
  }


def _stage1_2(i, **extra):
  row = _row(i, **extra)
  del row["pos_index"]
  return row


def _write(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_stage2_detected_and_every_gold_label_kept(tmp_path):
  path = _write(tmp_path / "s2.jsonl", [_row(i, kind="single") for i in range(5)])
  report = ReadReport()
  rows = read_eval_rows(path, report=report)
  assert report.schema == "stage2"
  assert [r["pos_index"] for r in rows] == [[0], [1], [2], [0], [1]]
  assert [r["id"] for r in rows] == [f"q{i}" for i in range(5)]
  assert all(r["kind"] == "single" for r in rows)
  assert report.rows_ok == 5 and report.rows_skipped == 0


def test_bad_middle_row_raises_at_its_line(tmp_path):
  rows = [_row(0), _row(1), {**_row(2), "pos_index": [7]}, _row(3)]
  path = _write(tmp_path / "s2.jsonl", rows)
  with pytest.raises(DataError) as err:
    read_eval_rows(path)
  assert str(err.value).startswith(f"{path}:3: field 'pos_index': 7 is out of range")
  assert (err.value.line, err.value.field) == (3, "pos_index")


def test_skip_keeps_gold_labels_of_other_rows(tmp_path):
  """The old loader re-read the file as stage1_2 here: every pos_index became []."""
  rows = [_row(0), _row(1), {**_row(2), "question": 5}, _row(4)]
  path = _write(tmp_path / "s2.jsonl", rows)
  report = ReadReport()
  out = read_eval_rows(path, on_error="skip", report=report)
  assert [r["pos_index"] for r in out] == [[0], [1], [1]]
  assert [r["id"] for r in out] == ["q0", "q1", "q4"]
  assert report.schema == "stage2" and report.rows_skipped == 1
  assert report.reason_counts == {("question", "expected a string, found int"): 1}


def test_stage1_2_gets_empty_pos_index(tmp_path):
  path = _write(tmp_path / "s12.jsonl", [_stage1_2(0), _stage1_2(1, kind="multi")])
  report = ReadReport()
  rows = read_eval_rows(path, report=report)
  assert report.schema == "stage1_2"
  assert [r["pos_index"] for r in rows] == [[], []]
  assert rows[1]["kind"] == "multi" and "kind" not in rows[0]
  assert set(rows[0]) == {"question", "docs", "answer", "answers", "pos_index", "id"}


def test_stage2_file_with_row_lacking_pos_index(tmp_path):
  path = _write(tmp_path / "mixed.jsonl", [_row(0), _row(1), _stage1_2(2)])
  with pytest.raises(DataError) as err:
    read_eval_rows(path)
  assert str(err.value) == (
    f"{path}:3: field 'pos_index': missing; this file's rows are stage2 (detected from line 1)"
  )


def test_stage1_2_file_with_row_having_pos_index(tmp_path):
  path = _write(tmp_path / "mixed.jsonl", [_stage1_2(0), _row(1)])
  with pytest.raises(
    DataError,
    match=r"mixed.jsonl:2: field 'pos_index': unexpected; "
    r"this file's rows are stage1_2 \(detected from line 1",
  ):
    read_eval_rows(path)


def test_detection_skips_non_objects_and_declared_schema_wins(tmp_path):
  path = _write(tmp_path / "s.jsonl", ["[1, 2]", _stage1_2(1), _stage1_2(2)])
  report = ReadReport()
  rows = read_eval_rows(path, on_error="skip", report=report)
  assert report.schema == "stage1_2" and len(rows) == 2
  assert report.reasons == [f"{path}:1: expected a JSON object, found list"]
  declared = _write(tmp_path / "d.jsonl", [_row(0), _stage1_2(1)])
  with pytest.raises(
    DataError,
    match=r"d.jsonl:1: field 'pos_index': unexpected; this file's "
    r"rows are stage1_2 \(declared by the caller\)",
  ):
    read_eval_rows(declared, fmt="stage1_2")
  with pytest.raises(
    DataError,
    match=r"d.jsonl:2: field 'pos_index': missing; this file's "
    r"rows are stage2 \(declared by the caller\)",
  ):
    read_eval_rows(declared, fmt="stage2")
  with pytest.raises(ValueError, match="fmt must be one of"):
    read_eval_rows(path, fmt="stage1")


def test_good_extras_kept(tmp_path):
  extras = {
    "kind": "multi",
    "template": "",
    "seen": False,
    "doc_ids": ["d0", "d1", "d2"],
    "doc_kinds": ["person", "city", ""],
    "clues": [],
    "bridge_clues": ["b"],
    "control_clues": [["x"], [], ["y", "z"]],
    "unknown_key": {"ignored": 1},
  }
  path = _write(tmp_path / "s2.jsonl", [_row(0, **extras)])
  row = read_eval_rows(path)[0]
  assert {k: row[k] for k in extras if k != "unknown_key"} == {
    k: v for k, v in extras.items() if k != "unknown_key"
  }
  assert "unknown_key" not in row


BAD_EXTRAS = [
  ({"id": ""}, "id", "is empty"),
  ({"id": 3}, "id", "expected a string, found int"),
  ({"kind": None}, "kind", "expected a string, found NoneType"),
  ({"template": ["t"]}, "template", "expected a string, found list"),
  ({"seen": "yes"}, "seen", "expected true or false, found str"),
  ({"seen": 1}, "seen", "expected true or false, found int"),
  ({"doc_ids": ["d0", "d1"]}, "doc_ids", "expected 3 entries (one per document), found 2"),
  ({"doc_ids": ["d0", "", "d2"]}, "doc_ids[1]", "is empty"),
  ({"doc_ids": "d0"}, "doc_ids", "expected a list of strings, found str"),
  ({"doc_kinds": ["a", "b", "c", "d"]}, "doc_kinds", "expected 3 entries"),
  ({"doc_kinds": ["a", 2, "c"]}, "doc_kinds[1]", "expected a string, found int"),
  ({"clues": "c"}, "clues", "expected a list of strings, found str"),
  ({"clues": [None]}, "clues[0]", "expected a string, found NoneType"),
  ({"control_clues": [["x"], []]}, "control_clues", "expected 3 entries"),
  ({"control_clues": ["x", [], []]}, "control_clues[0]", "expected a list of strings"),
  ({"control_clues": {"a": 1}}, "control_clues", "expected a list of lists of strings"),
  ({"bridge_clues": [1]}, "bridge_clues[0]", "expected a string, found int"),
]


@pytest.mark.parametrize("extra,field,reason", BAD_EXTRAS)
def test_bad_extra_names_file_line_and_field(tmp_path, extra, field, reason):
  path = _write(tmp_path / "s2.jsonl", [_row(0), _row(1, **extra), _row(2)])
  with pytest.raises(DataError) as err:
    read_eval_rows(path)
  assert str(err.value).startswith(f"{path}:2: field '{field}': {reason}")
  report = ReadReport()
  rows = read_eval_rows(path, on_error="skip", report=report)
  assert [r["id"] for r in rows] == ["q0", "q2"] and report.rows_skipped == 1


def test_duplicate_id_names_earlier_line(tmp_path):
  path = _write(tmp_path / "s2.jsonl", [_row(0), _row(1), _row(2), {**_row(3), "id": "q1"}])
  with pytest.raises(DataError) as err:
    read_eval_rows(path)
  assert str(err.value) == f"{path}:4: field 'id': duplicate 'q1'; first used on line 2"
  rows = read_eval_rows(path, on_error="skip")
  assert [r["id"] for r in rows] == ["q0", "q1", "q2"] and rows[1]["pos_index"] == [1]


def test_skipped_row_does_not_claim_its_id(tmp_path):
  """A row skipped for another reason must not make the next row with its id a duplicate."""
  path = _write(tmp_path / "s2.jsonl", [{**_row(0), "docs": []}, _row(0)])
  rows = read_eval_rows(path, on_error="skip")
  assert [r["id"] for r in rows] == ["q0"]


def test_empty_file_is_an_error(tmp_path):
  path = _write(tmp_path / "empty.jsonl", ["", "  "])
  for on_error in ("raise", "skip"):
    with pytest.raises(DataError) as err:
      read_eval_rows(path, on_error=on_error)
    assert str(err.value) == f"{path}: no rows: the file is empty"
    assert err.value.line == 0


def test_all_rows_skipped_is_an_error(tmp_path):
  path = _write(tmp_path / "bad.jsonl", [{**_row(i), "answer": ""} for i in range(3)])
  report = ReadReport()
  with pytest.raises(DataError) as err:
    read_eval_rows(path, on_error="skip", report=report)
  message = str(err.value)
  assert message.startswith(f"{path}: no rows: all 3 rows were skipped")
  assert "3 x field 'answer': is empty" in message
  assert report.rows_skipped == 3 and report.rows_ok == 0


def test_limit_keeps_first_good_rows(tmp_path):
  rows = [_row(0), {**_row(1), "seen": "no"}, _row(2), _row(3), "not json"]
  path = _write(tmp_path / "s2.jsonl", rows)
  report = ReadReport()
  out = read_eval_rows(path, on_error="skip", limit=2, report=report)
  assert [r["id"] for r in out] == ["q0", "q2"]
  assert (report.rows_read, report.rows_ok, report.rows_skipped) == (3, 2, 1)
  assert [r["id"] for r in read_eval_rows(path, limit=1)] == ["q0"]
  assert len(read_eval_rows(path, on_error="skip", limit=100)) == 3
  assert len(read_eval_rows(path, on_error="skip")) == 3
  for bad in (0, -1):
    with pytest.raises(ValueError, match="limit must be positive"):
      read_eval_rows(path, limit=bad)
  with pytest.raises(TypeError, match="limit"):
    read_eval_rows(path, limit=1.5)


def test_report_counts_every_reason_and_says_how_many_more(tmp_path):
  rows = (
    [_row(0)]
    + [_stage1_2(i) for i in range(1, 5)]
    + [{**_row(i), "seen": 0} for i in range(5, 8)]
    + [_row(8), "{oops"]
  )
  path = _write(tmp_path / "s2.jsonl", rows)
  report = ReadReport()
  read_eval_rows(path, on_error="skip", report=report)
  assert (report.rows_read, report.rows_ok, report.rows_skipped) == (10, 2, 8)
  missing = "missing; this file's rows are stage2 (detected from line 1)"
  assert report.reason_counts == {
    ("pos_index", missing): 4,
    ("seen", "expected true or false, found int"): 3,
    (None, "invalid JSON: Expecting property name enclosed in double quotes at column 2"): 1,
  }
  summary = report.summary()
  assert summary.startswith("2 rows kept, 8 skipped of 10 read")
  assert f"4 x field 'pos_index': {missing} (first at {path}:2)" in summary
  assert f"3 x field 'seen': expected true or false, found int (first at {path}:6)" in summary
  assert "1 x invalid JSON" in summary and f"(first at {path}:10)" in summary
  assert len(report.reasons) == MAX_REASONS
  assert f"and {8 - MAX_REASONS} more" in summary
  assert summary.index("4 x") < summary.index("3 x") < summary.index("1 x")


def test_summary_without_hidden_skips_says_no_more():
  report = ReadReport(rows_read=2, rows_ok=1)
  report.skip(DataError("f.jsonl", 2, "docs", "is empty"))
  summary = report.summary()
  assert "1 x field 'docs': is empty (first at f.jsonl:2)" in summary
  assert "f.jsonl:2: field 'docs': is empty" in summary and "more" not in summary
