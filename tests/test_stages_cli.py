"""Every stage trains from the CLI on the tiny config with 8 simulated devices, each from
the previous stage's export, and its loss goes down."""

import json
import os

import numpy as np
import pytest

from clara_jax import cli
from clara_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["Arlo", "Bea", "Cyrus", "Dina", "Ezra", "Fay", "Gus", "Hana", "Ivo", "Juno",
         "Kai", "Lena"]
CITIES = ["Oslo", "Lima", "Kyiv", "Pune", "Rome", "Baku"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return write_stage_data(tmp_path_factory.mktemp("data"))


def write_stage_data(root):
  """A small people-and-cities world in every stage's format (also used by benchmarks)."""
  rng = np.random.default_rng(0)
  facts = {n: CITIES[rng.integers(len(CITIES))] for n in NAMES}
  doc = lambda n: f"{n} lives in {facts[n]} and works as a baker."
  (root / "lm.txt").write_text("\n".join(doc(n) for n in NAMES * 5))

  def write(name, rows):
    (root / name).mkdir()
    (root / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  write("stage1", [{"data_type": "qa", "question": [f"Where does {n} live?"],
                    "answers": [facts[n]], "docs": [doc(n)]} for n in NAMES])
  rows12, rows2 = [], []
  for i, n in enumerate(NAMES):
    others = [m for m in NAMES if m != n]
    picks = list(rng.choice(others, 5, replace=False))
    rows12.append({"question": f"Where does {n} live?", "answer": facts[n],
                   "docs": [doc(n)] + [doc(m) for m in picks[:2]]})
    gold = int(rng.integers(6))
    cands = [doc(m) for m in picks]
    cands.insert(gold, doc(n))
    rows2.append({"question": f"Where does {n} live?", "answer": facts[n], "docs": cands,
                  "pos_index": [gold]})
  write("stage1_2", rows12)
  write("stage2", rows2)
  return root


STAGES = [
    ("lm", "lm.txt", []),
    ("stage1", "stage1", []),
    ("stage1_2", "stage1_2", ["--config.clara.k=3"]),
    ("stage2", "stage2", ["--config.clara.k=2", "--config.data.candidates=6",
                          "--config.optimizer.lr=3e-3"]),
    ("stage2_retrieval", "stage2", ["--config.clara.k=2", "--config.data.candidates=6",
                                    "--config.optimizer.lr=3e-3"]),
]


def test_all_stages_train_in_sequence(data, tmp_path, capsys):
  runs = tmp_path / "runs"
  for stage, source, extra in STAGES:
    workdir = runs / stage
    args = ["train", f"--config={ROOT}/configs/{stage}.py:model=tiny",
            f"--workdir={workdir}", f"--config.data.source={data / source}",
            "--config.tokenizer.vocab_size=300", "--config.train.num_steps=12",
            "--config.train.log_every=4", "--config.train.checkpoint_every=12",
            "--config.train.global_batch=8", "--config.train.peak_flops=1e11",
            "--config.clara.doc_max_length=16", "--config.clara.compr_rate=4",
            "--config.data.question_max_length=12", "--config.data.prompt_length=96",
            "--config.data.answer_length=12", "--config.data.lm_length=24", *extra]
    if stage == "stage2_retrieval":
      args.append(f"--config.init.from_workdir=../stage1_2")
    assert cli.main(args) == 0
    rows = read_metrics(str(workdir))
    assert len(rows) == 3, stage
    assert rows[-1]["loss"] < rows[0]["loss"], (stage, [r["loss"] for r in rows])
    assert os.path.exists(workdir / "export" / "config.json")
    if stage == "stage2":
      assert {"recall@1", "recall@2", "selection_entropy"} <= set(rows[-1])
    if stage in ("stage1", "stage1_2"):
      assert "mse" in rows[-1]
  out = capsys.readouterr().out
  assert out.count('"workdir"') == len(STAGES)

  # The trained stage2 checkpoint through the inference jobs.
  data2 = str(data / "stage2" / "train.jsonl")
  assert cli.main(["lens", f"--workdir={runs / 'stage2'}", f"--compare={runs / 'stage1_2'}",
                   f"--data={data2}", f"--out={tmp_path / 'lens.json'}", "--top=20"]) == 0
  lens = json.loads((tmp_path / "lens.json").read_text())
  assert set(lens["summary"]) == {"main", "compare"}
  assert os.path.exists(tmp_path / "lens.png")
  capsys.readouterr()
  assert cli.main(["evaluate", f"--workdir={runs / 'stage2'}", f"--data={data2}",
                   f"--out={tmp_path / 'results.json'}", "--k=2", "--limit=6",
                   "--max_new_tokens=6"]) == 0
  summary = json.loads((tmp_path / "results.json").read_text())
  assert summary["questions"] == 6 and summary["k"] == 2
  for key in ("em_normal", "f1_oracle", "cover_em_normal", "recall@1", "recall@5",
              "bm25_recall@1", "compress_ms_per_question", "decode_ms_per_question"):
    assert key in summary, key
  assert 0 <= summary["recall@5"] <= 1 and summary["decode_ms_per_question"] > 0
  per_q = (tmp_path / "results.jsonl").read_text().splitlines()
  assert len(per_q) == 6 and "prediction_oracle" in json.loads(per_q[0])
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": d}) + "\n"
                            for i, d in enumerate(json.loads(
                                (data / "stage2" / "train.jsonl").read_text().splitlines()[0])["docs"])))
  capsys.readouterr()
  assert cli.main(["index", f"--workdir={runs / 'stage2'}", f"--corpus={corpus}",
                   f"--out={tmp_path / 'index'}", "--shard_size=4", "--query=Where?",
                   "--top_n=3"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["num_docs"] == 6 and len(result["results"][0]) == 3
  assert len(result["answers"]) == 1 and isinstance(result["answers"][0], str)
