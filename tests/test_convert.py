"""Dataset converters: every source format to stage2/stage1_2 with exact candidate counts,
gold positions that survive the shuffle, distractors that are never the question's own
gold, seeded reproducibility, located errors, atomic output; plus the real shared files
and the `clara-jax convert` command."""

import gzip
import json
import os

import pytest

from clara_jax.data.convert import convert, doc_text
from clara_jax.data.formats import DataError, validate_row
from tests.python_process import run_python
from tests.qa_fixtures import ANIMALS, shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FOODS = [
  "clams",
  "frogs",
  "hares",
  "worms",
  "voles",
  "snails",
  "seeds",
  "slugs",
  "rabbits",
  "grain",
  "beetles",
  "crickets",
]


def _world(n_questions, n_paras, n_gold):
  """Questions as {id, question, aliases, paras: [(title, text, is_gold)]}; every
  paragraph has its own title."""
  world = []
  for i in range(n_questions):
    paras = [
      (
        f"{ANIMALS[i].title()} {j}",
        f"The {ANIMALS[i]} lives in marsh {j}. It eats {FOODS[(i + j) % 12]} daily.",
        j < n_gold,
      )
      for j in range(n_paras)
    ]
    world.append(
      {
        "id": f"q{i}",
        "question": f"What does the {ANIMALS[i]} eat in marsh 0?",
        "aliases": [FOODS[i], FOODS[i].upper()],
        "paras": paras,
      }
    )
  return world


def _hotpot_row(q):
  return {
    "_id": q["id"],
    "question": q["question"],
    "answer": q["aliases"][0],
    "type": "bridge",
    "level": "easy",
    "supporting_facts": [[t, 0] for t, _, g in q["paras"] if g],
    "context": [[t, [s + "." for s in text.rstrip(".").split(". ")]] for t, text, _ in q["paras"]],
  }


def _ircot_row(q):
  return {
    "question_id": q["id"],
    "question_text": q["question"],
    "answers_objects": [
      {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": q["aliases"]}
    ],
    "contexts": [
      {"id": str(j), "title": t, "paragraph_text": text, "is_supporting": g}
      for j, (t, text, g) in enumerate(q["paras"])
    ],
  }


def _musique_row(q):
  return {
    "id": q["id"],
    "question": q["question"],
    "answer": q["aliases"][0],
    "answer_aliases": q["aliases"][1:],
    "answerable": True,
    "paragraphs": [
      {"idx": j, "title": t, "paragraph_text": text, "is_supporting": g}
      for j, (t, text, g) in enumerate(q["paras"])
    ],
  }


def _nq_row(q):
  return {
    "question": q["question"],
    "answers": q["aliases"],
    "ctxs": [
      {"title": t, "text": text, "hasanswer": True, "isgold": g} for t, text, g in q["paras"]
    ],
  }


def _write_array(path, rows):
  # One item per line, so item N starts on line N + 1.
  path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
  return str(path)


def _write_jsonl(path, rows):
  data = "".join(json.dumps(r) + "\n" for r in rows).encode()
  path.write_bytes(gzip.compress(data) if str(path).endswith(".gz") else data)
  return str(path)


# format -> (row builder, writer, file name, world shape, stage2 candidates)
SOURCES = {
  "hotpotqa": (_hotpot_row, _write_array, "hotpot.json", (6, 4, 2), 8),
  "hotpotqa_jsonl": (_hotpot_row, _write_jsonl, "hotpot.jsonl", (6, 4, 2), 8),
  "hotpotqa_ircot": (_ircot_row, _write_jsonl, "ircot.jsonl", (6, 4, 2), 8),
  "musique": (_musique_row, _write_jsonl, "musique.jsonl", (6, 4, 2), 8),
  "2wiki": (_hotpot_row, _write_array, "2wiki.json", (6, 4, 2), 8),
  "nq": (_nq_row, _write_jsonl, "nq.jsonl.gz", (12, 1, 1), 8),
}


def _source(tmp_path, name, world=None):
  build, write, filename, shape, candidates = SOURCES[name]
  world = world if world is not None else _world(*shape)
  fmt = "hotpotqa" if name == "hotpotqa_jsonl" else name
  return fmt, write(tmp_path / filename, [build(q) for q in world]), world, candidates


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _check_rows(rows, world, num_docs, fmt):
  by_id = {q["id"]: q for q in world}
  for i, row in enumerate(rows):
    q = by_id[row["id"]] if fmt != "nq" else world[i]
    gold = {doc_text(t, text) for t, text, g in q["paras"] if g}
    own = {doc_text(t, text) for t, text, _ in q["paras"]}
    assert len(row["docs"]) == num_docs and len(set(row["docs"])) == num_docs
    assert {row["docs"][p] for p in row["pos_index"]} == gold
    distractors = [d for p, d in enumerate(row["docs"]) if p not in row["pos_index"]]
    assert not gold & set(distractors)
    if len(own) <= num_docs:
      assert own <= set(row["docs"])
    assert row["answer"] == q["aliases"][0] and set(row["answers"]) <= set(q["aliases"])
    assert row["question"] == q["question"]
    validate_row(row, "stage2", num_docs)


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_source_to_stage2(tmp_path, name):
  fmt, path, world, candidates = _source(tmp_path, name)
  out = str(tmp_path / "out.jsonl")
  calls = []
  report = convert(
    fmt,
    path,
    out,
    candidates=candidates,
    seed=3,
    progress=lambda done, total: calls.append((done, total)),
  )
  rows = _read(out)
  assert report.rows_in == report.rows_out == len(rows) == len(world)
  assert calls == [(len(rows), len(rows))]  # the last call closes the bar
  own = len(world[0]["paras"])
  assert report.distractors_added == len(world) * (candidates - own)
  _check_rows(rows, world, candidates, fmt)
  # The shuffle moved gold away from the front in at least one row.
  assert any(sorted(r["pos_index"]) != list(range(len(r["pos_index"]))) for r in rows)


def test_stage1_2_keeps_gold_and_best_distractors(tmp_path):
  fmt, path, world, _ = _source(tmp_path, "hotpotqa_ircot")
  out = str(tmp_path / "s12.jsonl")
  report = convert(fmt, path, out, stage="stage1_2", k=3)
  rows = _read(out)
  assert report.num_docs == 3 and report.truncated_candidates == len(world)
  _check_rows(rows, world, 3, fmt)
  for row in rows:
    validate_row(row, "stage1_2", 3)


def test_truncation_drops_the_lowest_bm25_non_gold(tmp_path):
  question = "Which river flows through Zorbia?"
  paras = [
    ("Zorbia", "Zorbia is a country.", True),
    ("Kell", "Kell river is long.", True),
    ("Moss", "Moss grows on stones.", False),
    ("Zorbia river", "The Zorbia river flows north.", False),
    ("Clay", "Clay is used for pots.", False),
    ("Flows", "Rivers flows through Zorbia valleys.", False),
  ]
  path = _write_jsonl(
    tmp_path / "m.jsonl",
    [_musique_row({"id": "m1", "question": question, "aliases": ["Kell"], "paras": paras})],
  )
  out = str(tmp_path / "out.jsonl")
  report = convert("musique", path, out, candidates=4)
  (row,) = _read(out)
  kept = {d.split("\n")[0] for d in row["docs"]}
  assert kept == {"Zorbia", "Kell", "Zorbia river", "Flows"}
  assert report.truncated_candidates == 2 and report.distractors_added == 0


def test_distractors_skip_other_passages_of_gold_articles(tmp_path):
  # Two questions whose gold passages are different chunks of the same article: the other
  # chunk likely holds the answer too, so it must not be an (unlabelled) distractor.
  world = _world(12, 1, 1)
  world[1]["paras"] = [("Otter 0", "Otters also eat fish and crabs.", True)]
  fmt, path, world, _ = _source(tmp_path, "nq", world)
  out = str(tmp_path / "out.jsonl")
  convert(fmt, path, out, candidates=8)
  rows = _read(out)
  for row in rows[:2]:
    assert sum(d.startswith("Otter 0\n") for d in row["docs"]) == 1
  _check_rows(rows, world, 8, fmt)


def test_seeded_reproducibility(tmp_path):
  fmt, path, _, candidates = _source(tmp_path, "musique")
  outs = {}
  for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
    outs[name] = tmp_path / f"{name}.jsonl"
    convert(fmt, path, str(outs[name]), candidates=candidates, seed=seed)
  assert outs["a"].read_bytes() == outs["b"].read_bytes()
  assert outs["a"].read_bytes() != outs["c"].read_bytes()
  # Same candidates, different order.
  for ra, rc in zip(_read(outs["a"]), _read(outs["c"])):
    assert sorted(ra["docs"]) == sorted(rc["docs"])


def _bad_ircot(tmp_path):
  rows = [_ircot_row(q) for q in _world(6, 4, 2)]
  rows[2]["contexts"][2]["title"] = 5
  return _write_jsonl(tmp_path / "hotpot.jsonl", rows)


def test_bad_field_raises_with_file_line_field(tmp_path):
  path = _bad_ircot(tmp_path)
  with pytest.raises(DataError) as err:
    convert("hotpotqa_ircot", path, str(tmp_path / "out.jsonl"), candidates=8)
  assert str(err.value) == (f"{path}:3: field 'contexts[2].title': expected a string, found int")
  assert (err.value.line, err.value.field) == (3, "contexts[2].title")


def test_skip_counts_bad_rows(tmp_path):
  path = _bad_ircot(tmp_path)
  report = convert(
    "hotpotqa_ircot", path, str(tmp_path / "out.jsonl"), candidates=8, on_error="skip"
  )
  assert (report.rows_in, report.rows_out, report.skipped) == (6, 5, 1)
  assert report.reasons == [f"{path}:3: field 'contexts[2].title': expected a string, found int"]
  assert len(_read(tmp_path / "out.jsonl")) == 5


def test_json_array_errors_name_the_item(tmp_path):
  rows = [_hotpot_row(q) for q in _world(6, 4, 2)]
  rows[1]["context"][1][0] = 7
  path = _write_array(tmp_path / "hotpot.json", rows)
  with pytest.raises(
    DataError,
    match=r"hotpot\.json:3: field 'context\[1\]\[0\]': "
    r"expected a string, found int \(item 2\)",
  ):
    convert("hotpotqa", path, str(tmp_path / "out.jsonl"), candidates=8)
  rows[1]["context"][1][0] = "Heron 1"
  rows[3]["supporting_facts"][0][0] = "Nowhere"
  path = _write_array(tmp_path / "hotpot.json", rows)
  with pytest.raises(
    DataError,
    match=r":5: field 'supporting_facts\[0\]\[0\]': title "
    r"'Nowhere' is not among the context titles \(item 4\)",
  ):
    convert("hotpotqa", path, str(tmp_path / "out.jsonl"), candidates=8)


def test_malformed_json_line(tmp_path):
  path = tmp_path / "m.jsonl"
  _write_jsonl(path, [_musique_row(q) for q in _world(6, 4, 2)])
  lines = path.read_bytes().splitlines()
  lines[1] = lines[1][:40]
  path.write_bytes(b"\n".join(lines) + b"\n")
  with pytest.raises(DataError, match=r"m\.jsonl:2: invalid JSON"):
    convert("musique", str(path), str(tmp_path / "out.jsonl"), candidates=8)
  report = convert("musique", str(path), str(tmp_path / "out.jsonl"), candidates=8, on_error="skip")
  assert (report.rows_out, report.skipped) == (5, 1)


def test_existing_output_survives_a_failed_conversion(tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_text("precious\n")
  with pytest.raises(DataError):
    convert("hotpotqa_ircot", _bad_ircot(tmp_path), str(out), candidates=8)
  assert out.read_text() == "precious\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hotpot.jsonl", "out.jsonl"]


def test_output_equal_to_an_input_is_refused_and_the_input_kept(tmp_path):
  fmt, path, _, candidates = _source(tmp_path, "hotpotqa_ircot")
  with open(path, "rb") as f:
    before = f.read()
  alias = str(tmp_path / "alias.jsonl")
  os.symlink(path, alias)
  for out in (path, alias):  # the same file by name, or through a link
    with pytest.raises(DataError, match="the output is also an input"):
      convert(fmt, path, out, candidates=candidates)
  with open(path, "rb") as f:
    assert f.read() == before
  result = _cli(fmt, "--input", path, "--out", path, "--candidates", str(candidates))
  assert result.returncode == 2 and "the output is also an input" in result.stderr


def test_outputs_get_the_umask_mode(tmp_path):
  fmt, path, _, candidates = _source(tmp_path, "hotpotqa_ircot")
  out = str(tmp_path / "out.jsonl")
  old = os.umask(0o022)
  try:
    convert(fmt, path, out, candidates=candidates)
    assert os.stat(out).st_mode & 0o777 == 0o644
    os.umask(0o077)
    convert(fmt, path, out, candidates=candidates)
    assert os.stat(out).st_mode & 0o777 == 0o600
  finally:
    os.umask(old)


def test_unanswerable_musique_rows_are_counted_skips(tmp_path):
  rows = [_musique_row(q) for q in _world(6, 4, 2)]
  rows[4]["answerable"] = False
  path = _write_jsonl(tmp_path / "m.jsonl", rows)
  report = convert("musique", path, str(tmp_path / "out.jsonl"), candidates=8)
  assert (report.rows_out, report.skipped, report.unanswerable) == (5, 1, 1)
  assert "m.jsonl:5: field 'answerable'" in report.reasons[0]


def test_too_small_pool_is_a_located_error(tmp_path):
  fmt, path, _, _ = _source(tmp_path, "nq", _world(3, 1, 1))
  with pytest.raises(DataError, match=r"nq\.jsonl\.gz:1: field 'docs': only 2 distractors"):
    convert(fmt, path, str(tmp_path / "out.jsonl"), candidates=8)


def test_limit(tmp_path):
  fmt, path, world, _ = _source(tmp_path, "musique")
  report = convert(fmt, path, str(tmp_path / "out.jsonl"), candidates=6, limit=4)
  assert report.rows_in == report.rows_out == 4


# ---------------------------------------------------------------------------------------
# The real shared files.


def test_real_hotpotqa_to_stage2(tmp_path):
  path = shared_path("hotpotqa_dev500.jsonl")
  out = str(tmp_path / "hotpot.jsonl")
  report = convert("hotpotqa_ircot", path, out, candidates=20)
  rows = _read(out)
  assert report.rows_in == report.rows_out == len(rows) == 500 and report.skipped == 0
  with open(path) as f:
    source = {r["question_id"]: r for r in map(json.loads, f)}
  for row in rows:
    assert len(row["docs"]) == 20 and len(set(row["docs"])) == 20
    assert len(row["pos_index"]) == 2 and row["answer"].strip()
    gold = {
      doc_text(c["title"], c["paragraph_text"])
      for c in source[row["id"]]["contexts"]
      if c["is_supporting"]
    }
    assert {row["docs"][p] for p in row["pos_index"]} == gold


def test_real_nq_to_stage2(tmp_path):
  path = shared_path("nq_open_oracle.jsonl.gz")
  out = str(tmp_path / "nq.jsonl")
  report = convert("nq", path, out, candidates=20)
  rows = _read(out)
  assert report.rows_in == report.rows_out == len(rows) == 2655
  assert report.distractors_added == 2655 * 19
  with gzip.open(path, "rt") as f:
    source = [json.loads(line) for line in f]
  for row, src in zip(rows, source):
    assert len(row["docs"]) == 20 and len(row["pos_index"]) == 1
    ctx = src["ctxs"][0]
    assert row["docs"][row["pos_index"][0]] == doc_text(ctx["title"], ctx["text"])
    assert row["answers"] == src["answers"]


def test_real_stage1_passthrough(tmp_path):
  path = shared_path("clara_pretrain_1k.jsonl")
  out = str(tmp_path / "s1.jsonl")
  report = convert("stage1", path, out)
  assert report.rows_in == report.rows_out == 1000 and report.skipped == 0
  with open(path) as f:
    source = [validate_row(json.loads(line), "stage1") for line in f]
  assert _read(out) == source


# ---------------------------------------------------------------------------------------
# The command line.


def _cli(*args):
  return run_python("-m", "clara_jax.cli", "convert", *args, cwd=ROOT)


def test_cli_convert(tmp_path):
  _, path, world, _ = _source(tmp_path, "hotpotqa_ircot")
  out = str(tmp_path / "out.jsonl")
  result = _cli("hotpotqa_ircot", "--input", path, "--out", out, "--candidates", "8", "--seed", "2")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2 and lines[0].startswith("converted hotpotqa_ircot")
  summary = json.loads(lines[-1])
  assert summary["rows_out"] == len(world) and summary["num_docs"] == 8
  assert len(_read(out)) == len(world)

  bad = _bad_ircot(tmp_path)
  result = _cli("hotpotqa_ircot", "--input", bad, "--out", out, "--candidates", "8")
  assert result.returncode == 2
  assert f"{bad}:3: field 'contexts[2].title'" in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_convert_does_not_import_jax(tmp_path):
  _, path, _, _ = _source(tmp_path, "nq")
  code = (
    "import sys; from clara_jax.cli import main; "
    f"rc = main(['convert', 'nq', '--input', {path!r}, '--out', "
    f"{str(tmp_path / 'o.jsonl')!r}, '--candidates', '5']); "
    "print('jax' in sys.modules, rc)"
  )
  result = run_python("-c", code, cwd=ROOT)
  assert result.stdout.strip().splitlines()[-1] == "False 0", result.stderr
