"""The bad-input fault table: every case `test_bad_inputs.py` runs, and `docs/faults.md`
generated from it.

Each case builds its inputs in an empty directory (the command runs there, so paths are
relative), runs one `clara-jax` command and states what must happen: the exit code
(2: bad input or usage; 1: an environmental failure; 0: a bad row skipped and counted
under `--on_error skip`), the substrings the one-line message must hold (file, line,
field where they apply), and which new files the command may leave (none, unless it
succeeded). Every file that was there before must be byte-identical afterwards.

Regenerate the documentation from the repository root with:

    python -m tests.faults.bad_input_cases > docs/faults.md
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Dict, Optional, Tuple

REGENERATE = "python -m tests.faults.bad_input_cases > docs/faults.md"
HUGE_LINE_BYTES = 50 << 20  # one 50 MB line: over formats.MAX_LINE_BYTES

# Runners: how the command is run.
IN_PROCESS = "in-process"
UNPRIVILEGED = "unprivileged"  # a child process as an unprivileged user (read-only dir)
FULL_DISK = "full-disk"  # the atomic writers' low-level write fails with ENOSPC part-way


@dataclasses.dataclass(frozen=True)
class Case:
  """One row of the table.

  id: the test id; tried: what is wrong (for the docs); argv: the command line after
  `clara-jax`, paths relative to the case directory ("{repo}" is the repository root);
  code: expected exit code; expect: substrings of the stderr line (for code 0: of the
  `skipped:` lines); files: {relative path: content} written first, where content is
  text, bytes, a list of JSONL rows (dicts or `Raw` lines) or a callable
  `(path, fixtures)` that makes it; creates: files the command may add (it succeeded);
  stdout: substrings of stdout; runner: IN_PROCESS, UNPRIVILEGED or FULL_DISK; needs:
  modules without which the case is skipped.
  """

  id: str
  tried: str
  argv: Tuple[str, ...]
  code: int
  expect: Tuple[str, ...]
  files: Dict[str, Any] = dataclasses.field(default_factory=dict)
  creates: Tuple[str, ...] = ()
  stdout: Tuple[str, ...] = ()
  runner: str = IN_PROCESS
  needs: Tuple[str, ...] = ()

  @property
  def command(self) -> str:
    return self.argv[0]


@dataclasses.dataclass(frozen=True)
class Raw:
  """A JSONL line written as is (not JSON-encoded)."""

  text: str


# ------------------------------------------------------------------------------ inputs


def _nq(i: int, **change) -> Dict[str, Any]:
  animal, food, other = (("otter", "clams", "heron"), ("heron", "frogs", "otter"))[i % 2]
  row = {
    "question": f"What does the {animal} eat?",
    "answers": [food],
    "ctxs": [
      {"title": animal.title(), "text": f"The {animal} eats {food}.", "isgold": True},
      {"title": other.title(), "text": f"The {other} sleeps all day.", "isgold": False},
    ],
  }
  row.update(change)
  return row


def _stage2(i: int, **change) -> Dict[str, Any]:
  row = {
    "id": f"q{i}",
    "question": f"Where does animal {i} live?",
    "docs": [f"Animal {i} lives in the marsh.", f"Animal {i + 1} lives in the hills."],
    "answer": "the marsh",
    "answers": ["the marsh"],
    "pos_index": [0],
  }
  row.update(change)
  for key in [k for k, v in change.items() if v is _DROP]:
    del row[key]
  return row


_DROP = object()  # `_stage2(i, answer=_DROP)`: the key is absent


def _stage1(**change) -> Dict[str, Any]:
  row = {
    "data_type": "qa",
    "question": ["What does the otter eat?"],
    "answers": ["clams"],
    "docs": ["The otter eats clams."],
  }
  row.update(change)
  return row


def _truncated(rows) -> bytes:
  """The rows as JSONL, cut in the middle of the last one."""
  text = "".join(json.dumps(r) + "\n" for r in rows).rstrip("\n")
  return text[: len(text) - len(json.dumps(rows[-1])) // 2].encode()


def _huge_line(path: str, fixtures) -> None:
  """A good row, then one JSON line of 50 MB (a string field that never ends in time)."""
  with open(path, "wb") as f:
    f.write((json.dumps(_stage2(0)) + "\n").encode())
    f.write(b'{"question": "' + b"a" * HUGE_LINE_BYTES + b'"}\n')


def _huge_nq_line(path: str, fixtures) -> None:
  with open(path, "wb") as f:
    f.write(b'{"question": "' + b"a" * HUGE_LINE_BYTES + b'"}\n')
    f.write((json.dumps(_nq(0)) + "\n").encode())


def _non_utf8(first_row) -> bytes:
  return (json.dumps(first_row) + "\n").encode() + b'{"question": "caf\xe9 au lait?"}\n'


def _directory(path: str, fixtures) -> None:
  os.makedirs(path)


def _workdir(path: str, fixtures) -> None:
  """A workdir holding the tiny (untrained) export, copied."""
  shutil.copytree(fixtures.export_dir, os.path.join(path, "export"))


def _workdir_with(edit: Callable[[str], None]) -> Callable[[str, Any], None]:
  def make(path: str, fixtures) -> None:
    _workdir(path, fixtures)
    edit(os.path.join(path, "export"))

  return make


def _export_of(name: str) -> Callable[[str, Any], None]:
  """A workdir holding one of the fixtures' other exports (e.g. with NaN weights)."""

  def make(path: str, fixtures) -> None:
    shutil.copytree(getattr(fixtures, name), os.path.join(path, "export"))

  return make


def _remove_config(export: str) -> None:  # an export or a HF checkpoint
  os.remove(os.path.join(export, "config.json"))


def _corrupt_config(export: str) -> None:
  with open(os.path.join(export, "config.json"), "w") as f:
    f.write('{"hidden_size": 64, "num_layers": ')


def _truncate_params(export: str) -> None:
  """Cuts the largest file of the orbax checkpoint in half (an interrupted copy)."""
  files = [
    os.path.join(root, n)
    for root, _, names in os.walk(os.path.join(export, "params"))
    for n in names
  ]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)


def _hf_checkpoint(path: str, fixtures) -> None:
  shutil.copytree(fixtures.hf_dir, path)


def _hf_with(edit: Callable[[str], None]) -> Callable[[str, Any], None]:
  def make(path: str, fixtures) -> None:
    _hf_checkpoint(path, fixtures)
    edit(path)

  return make


def _hf_tensor(name: str, value: float, index: int = 0) -> Callable[[str], None]:
  """Sets element `index` of tensor `name` of the HF checkpoint to `value`."""

  def edit(path: str) -> None:
    import numpy as np

    from clara_jax.weights import safetensors_io as st

    file = os.path.join(path, "model.safetensors")
    tensors = {k: np.array(v) for k, v in st.load_safetensors(file).items()}
    tensors[name].reshape(-1)[index] = value
    st.write_safetensors(file, tensors, {"format": "pt"})

  return edit


def _hf_corrupt_config(path: str) -> None:
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write('{"architectures": ["MistralForCausalLM"], ')


def _hf_truncate(path: str) -> None:
  file = os.path.join(path, "model.safetensors")
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) - 64)


def _clara_checkpoint(
  config: Dict[str, Any], first_last: Optional[str] = None
) -> Callable[[str, Any], None]:
  """An official-format CLaRa directory for the fixtures' tiny HF base: config.json, and
  decoder_first_last_layers.pth ("nan": with a NaN in the embedding; "garbage": not a
  PyTorch file)."""

  def make(path: str, fixtures) -> None:
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(config, f)
    if first_last == "garbage":
      with open(os.path.join(path, "decoder_first_last_layers.pth"), "wb") as f:
        f.write(b"these are not the tensors you are looking for")
    elif first_last == "nan":
      import torch

      rows = fixtures.hf_vocab + config["doc_max_length"] // config["compr_rate"] + 3
      embed = torch.zeros(rows, fixtures.hf_hidden)
      embed[3, 5] = float("nan")
      torch.save(
        {
          "model.embed_tokens.weight": embed,
          "lm_head.weight": torch.zeros(rows, fixtures.hf_hidden),
        },
        os.path.join(path, "decoder_first_last_layers.pth"),
      )

  return make


CLARA_CONFIG = {"lora_r": 2, "doc_max_length": 8, "compr_rate": 4}

# --------------------------------------------------------------------------- the table

CONVERT = ("convert", "nq", "--input", "in.jsonl", "--out", "out.jsonl", "--candidates", "2")
PREVIOUS = {"out.jsonl": '{"previous": "output"}\n'}  # an existing output, to be kept
GOOD_NQ = [_nq(0), _nq(1)]
EVALUATE = ("evaluate", "--workdir", "wd", "--data", "data.jsonl", "--out", "out.json")
EVAL_FILES = {"wd": _workdir, "out.json": '{"previous": "summary"}\n'}
GOOD = [_stage2(0), _stage2(1)]
LENS = ("lens", "--workdir", "wd", "--data", "data.jsonl", "--out", "lens.json")
INDEX = ("index", "--workdir", "wd", "--corpus", "corpus.jsonl", "--out", "idx")
TRAIN = ("train", "--config={repo}/configs/lm.py", "--workdir=run")
IMPORT_HF = ("import-hf", "--hf_dir", "hf", "--out", "imported", "--num_extra_tokens", "3")
IMPORT_GGUF = (
  "import-gguf",
  "--gguf",
  "model.gguf",
  "--out",
  "imported",
  "--num_extra_tokens",
  "3",
)
IMPORT_CLARA = ("import-clara", "--ckpt_dir", "clara", "--hf_dir", "hf", "--out", "imported")


def _eval(id_, tried, rows, expect, argv=EVALUATE, **kw) -> Case:
  files = dict(EVAL_FILES, **{"data.jsonl": rows}, **kw.pop("files", {}))
  return Case(id_, tried, argv, 2, expect, files, **kw)


CASES = [
  # convert: a QA dataset to CLaRa rows (no jax); the existing out.jsonl must survive.
  Case(
    "convert-truncated-json",
    "the file ends in the middle of a row",
    CONVERT,
    2,
    ("in.jsonl:2", "invalid JSON"),
    {"in.jsonl": _truncated(GOOD_NQ), **PREVIOUS},
  ),
  Case(
    "convert-row-not-object",
    "a row is a JSON list, not an object",
    CONVERT,
    2,
    ("in.jsonl:2", "expected a JSON object, found list"),
    {"in.jsonl": [_nq(0), ["a", "list"]], **PREVIOUS},
  ),
  Case(
    "convert-question-not-string",
    "`question` is a number",
    CONVERT,
    2,
    ("in.jsonl:1", "field 'question'", "expected a string, found int"),
    {"in.jsonl": [_nq(0, question=42), _nq(1)], **PREVIOUS},
  ),
  Case(
    "convert-answers-not-list",
    "`answers` is a string, not a list",
    CONVERT,
    2,
    ("in.jsonl:2", "field 'answers'", "expected a list, found str"),
    {"in.jsonl": [_nq(0), _nq(1, answers="frogs")], **PREVIOUS},
  ),
  Case(
    "convert-docs-not-strings",
    "stage1 `docs` holds a number",
    ("convert", "stage1", "--input", "in.jsonl", "--out", "out.jsonl"),
    2,
    ("in.jsonl:2", "field 'docs[0]'", "expected a string, found int"),
    {"in.jsonl": [_stage1(), _stage1(docs=[7])], **PREVIOUS},
  ),
  Case(
    "convert-empty-question",
    "`question` is blank",
    CONVERT,
    2,
    ("in.jsonl:1", "field 'question'", "is empty"),
    {"in.jsonl": [_nq(0, question="   "), _nq(1)], **PREVIOUS},
  ),
  Case(
    "convert-empty-answers",
    "`answers` is an empty list",
    CONVERT,
    2,
    ("in.jsonl:2", "field 'answers'", "is an empty list"),
    {"in.jsonl": [_nq(0), _nq(1, answers=[])], **PREVIOUS},
  ),
  Case(
    "convert-empty-docs",
    "`ctxs` (the documents) is an empty list",
    CONVERT,
    2,
    ("in.jsonl:1", "field 'ctxs'", "is an empty list"),
    {"in.jsonl": [_nq(0, ctxs=[]), _nq(1)], **PREVIOUS},
  ),
  Case(
    "convert-duplicate-ids",
    "two rows share an `id`",
    CONVERT,
    2,
    ("in.jsonl:2", "field 'id'", "duplicate 'n1'; first used at in.jsonl:1"),
    {"in.jsonl": [_nq(0, id="n1"), _nq(1, id="n1")], **PREVIOUS},
  ),
  Case(
    "convert-non-utf8",
    "a row holds a Latin-1 byte",
    CONVERT,
    2,
    ("in.jsonl:2", "not valid UTF-8"),
    {"in.jsonl": _non_utf8(_nq(0)), **PREVIOUS},
  ),
  Case(
    "convert-huge-line",
    "one 50 MB line",
    CONVERT,
    2,
    ("in.jsonl:1", "longer than the 16777216 allowed"),
    {"in.jsonl": _huge_nq_line, **PREVIOUS},
  ),
  Case(
    "convert-missing-input",
    "`--input` names no file",
    ("convert", "nq", "--input", "nothing.jsonl", "--out", "out.jsonl"),
    2,
    ("nothing.jsonl: no such file",),
    dict(PREVIOUS),
  ),
  Case(
    "convert-input-is-directory",
    "`--input` is a directory",
    ("convert", "nq", "--input", "data", "--out", "out.jsonl"),
    2,
    ("data: is a directory",),
    {"data": _directory, **PREVIOUS},
  ),
  Case(
    "convert-empty-file",
    "the input is empty",
    CONVERT,
    2,
    ("in.jsonl: no rows: the file is empty",),
    {"in.jsonl": "", **PREVIOUS},
  ),
  Case(
    "convert-blank-lines",
    "the input holds only blank lines",
    CONVERT,
    2,
    ("in.jsonl: no rows: the file is empty",),
    {"in.jsonl": "\n  \n\n", **PREVIOUS},
  ),
  Case(
    "convert-limit-0",
    "`--limit 0`",
    CONVERT + ("--limit", "0"),
    2,
    ("argument --limit: must be at least 1, got 0",),
    {"in.jsonl": GOOD_NQ, **PREVIOUS},
  ),
  Case(
    "convert-candidates-0",
    "`--candidates 0`",
    CONVERT[:-1] + ("0",),
    2,
    ("argument --candidates: must be at least 1, got 0",),
    {"in.jsonl": GOOD_NQ, **PREVIOUS},
  ),
  Case(
    "convert-k-negative",
    "`--k -1` for stage1_2 rows",
    CONVERT + ("--stage", "stage1_2", "--k", "-1"),
    2,
    ("argument --k: must be at least 1, got -1",),
    {"in.jsonl": GOOD_NQ, **PREVIOUS},
  ),
  Case(
    "convert-out-is-input",
    "`--out` is the `--input` file",
    ("convert", "nq", "--input", "in.jsonl", "--out", "in.jsonl", "--candidates", "2"),
    2,
    ("in.jsonl", "the output is also an input"),
    {"in.jsonl": GOOD_NQ},
  ),
  Case(
    "convert-out-is-directory",
    "`--out` is a directory",
    CONVERT[:5] + ("outdir", "--candidates", "2"),
    2,
    ("outdir: is a directory",),
    {"in.jsonl": GOOD_NQ, "outdir": _directory},
  ),
  Case(
    "convert-skip-counts",
    "`--on_error skip` with one bad row of two",
    CONVERT + ("--on_error", "skip"),
    0,
    ("skipped: in.jsonl:2: field 'question': expected a string, found int",),
    {"in.jsonl": [_nq(0), _nq(1, question=7)]},
    creates=("out.jsonl",),
    stdout=("2 rows in, 1 out, 1 skipped",),
  ),
  Case(
    "convert-skip-all",
    "`--on_error skip` when every row is bad",
    CONVERT + ("--on_error", "skip"),
    2,
    ("in.jsonl: no rows: all 2 rows were skipped", "field 'answers'"),
    {"in.jsonl": [_nq(0, answers=[]), _nq(1, answers=[])], **PREVIOUS},
  ),
  Case(
    "convert-read-only-dir",
    "the output directory is not writable (an unprivileged user; root ignores modes)",
    CONVERT[:5] + ("ro/out.jsonl", "--candidates", "2"),
    2,
    ("cannot write ro/out.jsonl", "Permission denied"),
    {"in.jsonl": GOOD_NQ, "ro/out.jsonl": '{"previous": "output"}\n'},
    runner=UNPRIVILEGED,
  ),
  Case(
    "convert-full-disk",
    "the disk fills up part-way through writing",
    CONVERT,
    1,
    ("failed: OSError", "No space left on device: writing out.jsonl"),
    {"in.jsonl": GOOD_NQ, **PREVIOUS},
    runner=FULL_DISK,
  ),
  # evaluate: rows are read and checked before the model loads; out.json must survive.
  _eval(
    "evaluate-truncated-json",
    "the file ends in the middle of a row",
    _truncated(GOOD),
    ("data.jsonl:2", "invalid JSON"),
  ),
  _eval(
    "evaluate-row-not-object",
    "a row is a JSON string",
    [GOOD[0], Raw('"just text"')],
    ("data.jsonl:2", "expected a JSON object, found str"),
  ),
  _eval(
    "evaluate-question-not-string",
    "`question` is a list",
    [_stage2(0, question=["a", "list"])],
    ("data.jsonl:1", "field 'question'", "expected a string, found list"),
  ),
  _eval(
    "evaluate-answers-not-list",
    "`answers` is a string and there is no `answer`",
    [GOOD[0], _stage2(1, answer=_DROP, answers="the marsh")],
    ("data.jsonl:2", "field 'answers'", "expected a list of strings, found str"),
  ),
  _eval(
    "evaluate-docs-not-strings",
    "`docs` holds a number",
    [_stage2(0, docs=["ok", 3])],
    ("data.jsonl:1", "field 'docs[1]'", "expected a string, found int"),
  ),
  _eval(
    "evaluate-pos-index-not-ints",
    "`pos_index` holds a string",
    [_stage2(0, pos_index=["0"])],
    ("data.jsonl:1", "field 'pos_index'", "expected a list of integers"),
  ),
  _eval(
    "evaluate-pos-index-beyond-docs",
    "`pos_index` points past the documents",
    [GOOD[0], _stage2(1, pos_index=[2])],
    ("data.jsonl:2", "field 'pos_index'", "2 is out of range for 2 documents"),
  ),
  _eval(
    "evaluate-pos-index-negative",
    "`pos_index` is negative",
    [_stage2(0, pos_index=[-1])],
    ("data.jsonl:1", "field 'pos_index'", "-1 is out of range"),
  ),
  _eval(
    "evaluate-empty-question",
    "`question` is empty",
    [_stage2(0, question="")],
    ("data.jsonl:1", "field 'question'", "is empty"),
  ),
  _eval(
    "evaluate-empty-docs",
    "`docs` is an empty list",
    [_stage2(0, docs=[], pos_index=[])],
    ("data.jsonl:1", "field 'docs'", "is an empty list"),
  ),
  _eval(
    "evaluate-empty-answers",
    "`answers` is an empty list and there is no `answer`",
    [_stage2(0, answer=_DROP, answers=[])],
    ("data.jsonl:1", "field 'answers'", "is an empty list"),
  ),
  _eval(
    "evaluate-unknown-key-ignored",
    "an unknown key on line 1 (ignored, as `read_eval_rows` documents), a bad row on line 2",
    [_stage2(0, colour="red"), _stage2(1, answer="")],
    ("data.jsonl:2", "field 'answer'", "is empty"),
  ),
  _eval(
    "evaluate-duplicate-ids",
    "two rows share an `id`",
    [GOOD[0], _stage2(1, id="q0")],
    ("data.jsonl:2", "field 'id'", "duplicate 'q0'; first used on line 1"),
  ),
  _eval(
    "evaluate-non-utf8",
    "a row holds a Latin-1 byte",
    _non_utf8(GOOD[0]),
    ("data.jsonl:2", "not valid UTF-8"),
  ),
  _eval(
    "evaluate-huge-line",
    "one 50 MB line after a good one",
    _huge_line,
    ("data.jsonl:2", "longer than the 16777216 allowed"),
  ),
  _eval(
    "evaluate-data-is-directory",
    "`--data` is a directory",
    _directory,
    ("data.jsonl: is a directory",),
  ),
  _eval(
    "evaluate-missing-data",
    "`--data` names no file",
    GOOD,
    ("nothing.jsonl: no such file",),
    argv=EVALUATE[:4] + ("nothing.jsonl",) + EVALUATE[5:],
  ),
  _eval(
    "evaluate-empty-file", "the file is empty", "", ("data.jsonl: no rows: the file is empty",)
  ),
  _eval(
    "evaluate-blank-lines",
    "the file holds only blank lines",
    "\n\n   \n",
    ("data.jsonl: no rows: the file is empty",),
  ),
  _eval(
    "evaluate-limit-0",
    "`--limit 0`",
    GOOD,
    ("argument --limit: must be at least 1, got 0",),
    argv=EVALUATE + ("--limit", "0"),
  ),
  _eval(
    "evaluate-k-0",
    "`--k 0`",
    GOOD,
    ("argument --k: must be at least 1, got 0",),
    argv=EVALUATE + ("--k", "0"),
  ),
  _eval(
    "evaluate-k-negative",
    "`--k -3`",
    GOOD,
    ("argument --k: must be at least 1, got -3",),
    argv=EVALUATE + ("--k", "-3"),
  ),
  _eval(
    "evaluate-bad-train-data",
    "`--train_data` has a bad row",
    GOOD,
    ("train.jsonl:1", "field 'docs'", "expected a list of strings, found str"),
    argv=EVALUATE + ("--train_data", "train.jsonl"),
    files={"train.jsonl": [_stage2(0, docs="one document")]},
  ),
  _eval(
    "evaluate-out-is-directory",
    "`--out` is a directory",
    GOOD,
    ("summary: is a directory",),
    argv=EVALUATE[:6] + ("summary",),
    files={"summary": _directory},
  ),
  _eval(
    "evaluate-workdir-is-file",
    "`--workdir` is a file",
    GOOD,
    ("wd: is a file; expected a trained stage's workdir",),
    files={"wd": "not a dir\n"},
  ),
  _eval(
    "evaluate-workdir-without-export",
    "`--workdir` has no export/",
    GOOD,
    ("wd/export: missing",),
    files={"wd": _directory},
  ),
  _eval(
    "evaluate-export-without-config",
    "the export has no config.json",
    GOOD,
    ("wd/export/config.json: missing",),
    files={"wd": _workdir_with(_remove_config)},
  ),
  _eval(
    "evaluate-export-corrupt-config",
    "the export's config.json is cut short",
    GOOD,
    ("wd/export/config.json: not a decoder config", "JSONDecodeError"),
    files={"wd": _workdir_with(_corrupt_config)},
  ),
  _eval(
    "evaluate-export-truncated-params",
    "a parameter file of the export is cut in half",
    GOOD,
    ("wd/export/params/", "but the export recorded", "truncated"),
    files={"wd": _workdir_with(_truncate_params)},
  ),
  _eval(
    "evaluate-export-nan-weights",
    "the export has a NaN weight",
    GOOD,
    ("wd/export/params: parameter layers_0/mlp/up_proj/kernel has 1 NaN and 0 infinite",),
    files={"wd": _export_of("nan_export_dir")},
  ),
  _eval(
    "evaluate-export-inf-weights",
    "the export has infinite weights",
    GOOD,
    ("wd/export/params: parameter final_norm/scale has 0 NaN and 2 infinite",),
    files={"wd": _export_of("inf_export_dir")},
  ),
  # lens: the same readers; the manifest and --compare are checked too.
  _eval(
    "lens-pos-index-not-list",
    "`pos_index` is a number",
    [_stage2(0, pos_index=0)],
    ("data.jsonl:1", "field 'pos_index'", "expected a list of integers"),
    argv=LENS,
  ),
  _eval(
    "lens-top-0",
    "`--top 0` (was silently the default)",
    GOOD,
    ("argument --top: must be at least 1, got 0",),
    argv=LENS + ("--top", "0"),
  ),
  _eval(
    "lens-limit-0",
    "`--limit 0`",
    GOOD,
    ("argument --limit: must be at least 1, got 0",),
    argv=LENS + ("--limit", "0"),
  ),
  _eval(
    "lens-missing-manifest",
    "`--manifest` names no file",
    GOOD,
    ("No such file or directory", "manifest.json"),
    argv=LENS + ("--manifest", "manifest.json"),
  ),
  _eval(
    "lens-corrupt-manifest",
    "`--manifest` is not a world's manifest",
    GOOD,
    ("manifest.json: not the manifest.json of a generated world",),
    argv=LENS + ("--manifest", "manifest.json"),
    files={"manifest.json": "[1, 2]\n"},
  ),
  _eval(
    "lens-compare-missing",
    "`--compare` names no workdir",
    GOOD,
    ("other: no such workdir",),
    argv=LENS + ("--compare", "other"),
  ),
  # index: the corpus is checked row by row before the model loads.
  Case(
    "index-row-not-object",
    "a corpus row is a number",
    INDEX,
    2,
    ("corpus.jsonl:2", "expected a JSON object, found int"),
    {"wd": _workdir, "corpus.jsonl": [{"id": "d0", "text": "red river"}, Raw("12")]},
  ),
  Case(
    "index-missing-text",
    "a corpus row has no `text`",
    INDEX,
    2,
    ("corpus.jsonl:2", "field 'text'", "missing"),
    {"wd": _workdir, "corpus.jsonl": [{"id": "d0", "text": "red river"}, {"id": "d1"}]},
  ),
  Case(
    "index-text-not-string",
    "`text` is a number (was indexed silently)",
    INDEX,
    2,
    ("corpus.jsonl:1", "field 'text'", "expected a string, found int"),
    {"wd": _workdir, "corpus.jsonl": [{"id": "d0", "text": 5}]},
  ),
  Case(
    "index-duplicate-ids",
    "two documents share an `id`",
    INDEX,
    2,
    ("corpus.jsonl:2", "field 'id'", "duplicate 'd0'; first used on line 1"),
    {"wd": _workdir, "corpus.jsonl": [{"id": "d0", "text": "red"}, {"id": "d0", "text": "blue"}]},
  ),
  Case(
    "index-empty-corpus",
    "the corpus is empty (was an index that cannot load)",
    INDEX,
    2,
    ("corpus.jsonl: no rows: the file is empty",),
    {"wd": _workdir, "corpus.jsonl": ""},
  ),
  Case(
    "index-shard-size-0",
    "`--shard_size 0`",
    INDEX + ("--shard_size", "0"),
    2,
    ("argument --shard_size: must be at least 1, got 0",),
    {"wd": _workdir, "corpus.jsonl": [{"id": "d0", "text": "red"}]},
  ),
  Case(
    "index-top-n-0",
    "`--top_n 0`",
    INDEX + ("--top_n", "0"),
    2,
    ("argument --top_n: must be at least 1, got 0",),
    {"wd": _workdir, "corpus.jsonl": [{"id": "d0", "text": "red"}]},
  ),
  Case(
    "index-out-is-file",
    "`--out` is a file, not a directory",
    INDEX,
    2,
    ("idx: is a file; expected a directory",),
    {"wd": _workdir, "corpus.jsonl": [{"id": "d0", "text": "red"}], "idx": "an old file\n"},
  ),
  # synth: the generated world.
  Case(
    "synth-candidates-0",
    "`--candidates 0`",
    ("synth", "--out", "world", "--candidates", "0"),
    2,
    ("argument --candidates: must be at least 1, got 0",),
  ),
  Case(
    "synth-k-negative",
    "`--k -2`",
    ("synth", "--out", "world", "--k", "-2"),
    2,
    ("argument --k: must be at least 1, got -2",),
  ),
  Case(
    "synth-max-facts-0",
    "`--max_facts 0` (was a row error naming no flag)",
    ("synth", "--out", "world", "--max_facts", "0"),
    2,
    ("argument --max_facts: must be at least 1, got 0",),
  ),
  Case(
    "synth-rows-negative",
    "`--rows -3` (was an empty file)",
    ("synth", "--out", "rows.jsonl", "--stream", "stage1", "--rows", "-3"),
    2,
    ("argument --rows: must be at least 0, got -3",),
  ),
  Case(
    "synth-stream-rows-0",
    "`--stream` with no `--rows` (was an empty file)",
    ("synth", "--out", "rows.jsonl", "--stream", "stage1"),
    2,
    ("--rows must be at least 1, got 0",),
  ),
  Case(
    "synth-out-is-file",
    "`--out` is a file, not a directory",
    ("synth", "--out", "world"),
    2,
    ("world: is a file; expected a directory",),
    {"world": "an old file\n"},
  ),
  Case(
    "synth-stream-out-is-directory",
    "`--stream --out` is a directory",
    ("synth", "--out", "rows", "--stream", "stage1", "--rows", "2"),
    2,
    ("rows: is a directory; expected a file",),
    {"rows": _directory},
  ),
  # train: failures before anything is compiled.
  Case(
    "train-missing-config",
    "`--config` names no file",
    ("train", "--config=nothing.py", "--workdir=run"),
    2,
    ("--config=nothing.py: no such config file",),
  ),
  Case(
    "train-config-is-directory",
    "`--config` is a directory",
    ("train", "--config=configs", "--workdir=run"),
    2,
    ("--config=configs: is a directory",),
    {"configs": _directory},
  ),
  Case(
    "train-unknown-override",
    "an override of a field that does not exist",
    TRAIN + ("--config.train.no_such_field=1",),
    2,
    ("--config.train.no_such_field: no such config field",),
  ),
  Case(
    "train-unknown-variant",
    "an unknown `:variant` of the config file",
    ("train", "--config={repo}/configs/lm.py:colour=red", "--workdir=run"),
    2,
    ("unknown config variant(s) ['colour']",),
  ),
  Case(
    "train-steps-0",
    "`train.num_steps = 0`",
    TRAIN + ("--config.train.num_steps=0",),
    2,
    ("config: train.num_steps must be a positive integer, got 0",),
  ),
  Case(
    "train-negative-lr",
    "a negative learning rate",
    TRAIN + ("--config.optimizer.lr=-1",),
    2,
    ("config: optimizer.lr must be a number in (0, inf), got -1.0",),
  ),
  Case(
    "train-lr-not-a-number",
    "a learning rate that is not a number",
    TRAIN + ("--config.optimizer.lr=fast",),
    2,
    ("--config.optimizer.lr=fast", "could not convert string to float"),
  ),
  Case(
    "train-k-over-candidates",
    "stage2 `clara.k` larger than `data.candidates`",
    ("train", "--config={repo}/configs/stage2.py", "--workdir=run", "--config.clara.k=50"),
    2,
    ("config: clara.k = 50 exceeds data.candidates = 20",),
  ),
  Case(
    "train-unknown-memory-scale",
    "an unknown `clara.memory_scale`",
    TRAIN + ("--config.clara.memory_scale=layer_norm",),
    2,
    ("config: clara.memory_scale must be one of ('none', 'embedding'), got 'layer_norm'",),
  ),
  Case(
    "train-workdir-is-file",
    "`--workdir` is a file",
    TRAIN,
    2,
    ("run: --workdir is a file; expected a run directory",),
    {"run": "not a directory\n"},
  ),
  Case(
    "train-no-workdir", "no `--workdir`", TRAIN[:2], 2, ("--config and --workdir are required",)
  ),
  # import-hf: a local HF checkpoint; nothing may be written to --out.
  Case(
    "import-hf-missing-config",
    "the checkpoint has no config.json",
    IMPORT_HF,
    2,
    ("hf/config.json: missing",),
    {"hf": _hf_with(_remove_config)},
  ),
  Case(
    "import-hf-corrupt-config",
    "config.json is cut short",
    IMPORT_HF,
    2,
    ("hf/config.json: not valid JSON",),
    {"hf": _hf_with(_hf_corrupt_config)},
  ),
  Case(
    "import-hf-dir-is-file",
    "`--hf_dir` is a file",
    IMPORT_HF,
    2,
    ("hf: is a file; expected a checkpoint directory",),
    {"hf": "not a directory\n"},
  ),
  Case(
    "import-hf-truncated",
    "model.safetensors is cut short",
    IMPORT_HF,
    2,
    ("hf/model.safetensors", "truncated"),
    {"hf": _hf_with(_hf_truncate)},
  ),
  Case(
    "import-hf-nan-weights",
    "a NaN in one tensor (was imported silently)",
    IMPORT_HF,
    2,
    ("hf/model.safetensors: parameter 'model.layers.0.mlp.up_proj.weight' has 1 NaN",),
    {"hf": _hf_with(_hf_tensor("model.layers.0.mlp.up_proj.weight", float("nan")))},
  ),
  Case(
    "import-hf-inf-weights",
    "an infinite value in one tensor (was imported silently)",
    IMPORT_HF,
    2,
    ("hf/model.safetensors: parameter 'model.norm.weight' has 0 NaN and 1 infinite",),
    {"hf": _hf_with(_hf_tensor("model.norm.weight", float("-inf"), 3))},
  ),
  Case(
    "import-hf-negative-extra-tokens",
    "`--num_extra_tokens -1`",
    IMPORT_HF[:-1] + ("-1",),
    2,
    ("argument --num_extra_tokens: must be at least 0",),
    {"hf": _hf_checkpoint},
  ),
  Case(
    "import-hf-out-is-file",
    "`--out` is a file (checked before importing)",
    IMPORT_HF,
    2,
    ("imported: is a file; expected a directory",),
    {"hf": _hf_checkpoint, "imported": "an old file\n"},
  ),
  # import-gguf: a llama.cpp / Ollama file; nothing may be written to --out.
  Case(
    "import-gguf-not-gguf",
    "a text file named .gguf",
    IMPORT_GGUF,
    2,
    ("model.gguf: not a readable GGUF file",),
    {"model.gguf": "not a model\n"},
  ),
  Case(
    "import-gguf-cut-header",
    "a GGUF header cut after its first bytes",
    IMPORT_GGUF,
    2,
    ("model.gguf: not a readable GGUF file",),
    {"model.gguf": b"GGUF\x03\x00\x00"},
  ),
  Case(
    "import-gguf-missing",
    "`--gguf` names no file",
    IMPORT_GGUF,
    2,
    ("model.gguf: no such GGUF file",),
  ),
  Case(
    "import-gguf-directory",
    "`--gguf` is a directory",
    IMPORT_GGUF,
    2,
    ("model.gguf: is a directory; expected a .gguf file",),
    {"model.gguf": _directory},
  ),
  Case(
    "import-gguf-negative-extra-tokens",
    "`--num_extra_tokens -1`",
    IMPORT_GGUF[:-1] + ("-1",),
    2,
    ("argument --num_extra_tokens: must be at least 0",),
  ),
  # import-clara: the official PyTorch format on top of the HF base.
  Case(
    "import-clara-missing-config",
    "the CLaRa directory has no config.json",
    IMPORT_CLARA,
    2,
    ("clara/config.json: missing",),
    {"clara": _directory, "hf": _hf_checkpoint},
  ),
  Case(
    "import-clara-zero-compr-rate",
    "`compr_rate: 0` in config.json (was a division by zero)",
    IMPORT_CLARA,
    2,
    ("clara/config.json: field 'compr_rate': expected a positive integer, found 0",),
    {"clara": _clara_checkpoint(dict(CLARA_CONFIG, compr_rate=0)), "hf": _hf_checkpoint},
  ),
  Case(
    "import-clara-not-torch",
    "decoder_first_last_layers.pth is not a PyTorch file",
    IMPORT_CLARA,
    2,
    ("decoder_first_last_layers.pth: not a PyTorch weights file",),
    {"clara": _clara_checkpoint(CLARA_CONFIG, "garbage"), "hf": _hf_checkpoint},
    needs=("torch",),
  ),
  Case(
    "import-clara-nan-embedding",
    "a NaN in the resized embedding (was imported silently)",
    IMPORT_CLARA,
    2,
    ("decoder_first_last_layers.pth: parameter 'model.embed_tokens.weight' has 1 NaN",),
    {"clara": _clara_checkpoint(CLARA_CONFIG, "nan"), "hf": _hf_checkpoint},
    needs=("torch",),
  ),
  # info and bench: flags.
  Case(
    "info-unknown-model",
    "an unknown model size",
    ("info", "--model", "huge"),
    2,
    ("unknown model size 'huge'",),
  ),
  Case(
    "info-negative-extra-tokens",
    "`--num_extra_tokens -1` (was accepted)",
    ("info", "--num_extra_tokens", "-1"),
    2,
    ("argument --num_extra_tokens: must be at least 0, got -1",),
  ),
  Case(
    "bench-unknown-model",
    "an unknown model size",
    ("bench", "forward", "--model", "huge"),
    2,
    ("unknown model size 'huge'",),
  ),
  Case(
    "bench-iters-0",
    "`--iters 0` (was an IndexError after compiling)",
    ("bench", "forward", "--model", "tiny", "--iters", "0"),
    2,
    ("argument --iters: must be at least 1, got 0",),
  ),
  Case(
    "bench-batch-0",
    "`--batch 0` (was silently the default)",
    ("bench", "forward", "--model", "tiny", "--batch", "0"),
    2,
    ("argument --batch: must be at least 1, got 0",),
  ),
  Case(
    "bench-length-0",
    "`--length 0`",
    ("bench", "forward", "--length", "0"),
    2,
    ("argument --length: must be at least 1, got 0",),
  ),
  Case(
    "bench-doc-len-0",
    "`--doc_len 0`",
    ("bench", "step", "--doc_len", "0"),
    2,
    ("argument --doc_len: must be at least 1, got 0",),
  ),
  Case(
    "bench-compr-rate-0",
    "`--compr_rate 0`",
    ("bench", "step", "--compr_rate", "0"),
    2,
    ("argument --compr_rate: must be at least 1, got 0",),
  ),
  Case(
    "bench-candidates-0",
    "`--candidates 0`",
    ("bench", "stage2", "--candidates", "0"),
    2,
    ("argument --candidates: must be at least 1, got 0",),
  ),
  Case(
    "bench-unknown-what",
    "an unknown benchmark",
    ("bench", "everything"),
    2,
    ("argument what: invalid choice: 'everything'",),
  ),
]


# ------------------------------------------------------------------------- materialise


def write_inputs(case: Case, directory: str, fixtures) -> None:
  """Writes `case.files` into `directory`."""
  for name, content in case.files.items():
    path = os.path.join(directory, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if callable(content):
      content(path, fixtures)
    elif isinstance(content, list):
      with open(path, "w", encoding="utf-8") as f:
        for row in content:
          f.write((row.text if isinstance(row, Raw) else json.dumps(row)) + "\n")
    else:
      with open(path, "wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)


def argv_of(case: Case, repo: str) -> list:
  return [a.replace("{repo}", repo) for a in case.argv]


# -------------------------------------------------------------------------------- docs


def _shell(argv) -> str:
  import shlex

  return "clara-jax " + " ".join(shlex.quote(a.replace("{repo}/", "")) for a in argv)


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def markdown() -> str:
  """docs/faults.md: the table above, one row per case."""
  by_code = {code: sum(c.code == code for c in CASES) for code in (0, 1, 2)}
  lines = [
    "# Bad-input faults",
    "",
    f"What `clara-jax` does with bad input, generated from the case table in "
    f"`tests/faults/bad_input_cases.py` and checked by `tests/faults/test_bad_inputs.py`: "
    f"{len(CASES)} cases tried, {by_code[2] + by_code[1]} clear one-line errors "
    f"({by_code[2]} exit 2, {by_code[1]} exit 1) and {by_code[0]} counted skip, files "
    f"changed: 0 (every file present before a case is byte-identical after it, and no "
    f"temporary file is left).",
    "",
    "Exit 2: bad input or usage, one line `clara-jax CMD: message` on stderr. Exit 1: "
    "an environmental failure, one line `clara-jax CMD: failed: Type: message (run again "
    "with --debug for the traceback)`. Exit 0: `--on_error skip` skipped a bad row and "
    "said so. Never a traceback. The message holds each quoted fragment below (paths "
    "are relative to the directory the command runs in).",
    "",
    f"Regenerate with `{REGENERATE}`.",
    "",
    "| Case | Command | What is tried | Exit | The message says |",
    "|---|---|---|---|---|",
  ]
  for case in CASES:
    said = " … ".join(f"`{e}`" for e in case.expect)
    lines.append(
      f"| {case.id} | `{_cell(_shell(case.argv))}` | {_cell(case.tried)} | "
      f"{case.code} | {_cell(said)} |"
    )
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  import sys

  sys.stdout.write(markdown())
