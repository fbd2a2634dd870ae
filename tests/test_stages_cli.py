"""Every stage trains from the CLI on the tiny config with 8 simulated devices, on the
generated world (the default data), each from the previous stage's export, and its loss
goes down; then the inference jobs run on the trained checkpoints."""

import json
import os

import pytest

from clara_jax import cli
from clara_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = [
  ("lm", []),
  ("stage1", ["--config.optimizer.lr=1e-2"]),
  ("stage1_2", ["--config.clara.k=3", "--config.optimizer.lr=1e-2"]),
  ("stage2", ["--config.clara.k=2", "--config.data.candidates=6", "--config.optimizer.lr=1e-2"]),
  (
    "stage2_retrieval",
    ["--config.clara.k=2", "--config.data.candidates=6", "--config.optimizer.lr=3e-3"],
  ),
]


def test_all_stages_train_in_sequence(tmp_path, capsys, monkeypatch):
  runs = tmp_path / "runs"
  for stage, extra in STAGES:
    workdir = runs / stage
    args = [
      "train",
      f"--config={ROOT}/configs/{stage}.py:model=tiny,data=synth",
      f"--workdir={workdir}",
      "--config.data.synth_max_facts=2",
      "--config.tokenizer.vocab_size=512",
      "--config.train.num_steps=9",
      "--config.train.log_every=3",
      "--config.train.checkpoint_every=9",
      "--config.train.global_batch=8",
      "--config.train.peak_flops=1e11",
      "--config.clara.doc_max_length=16",
      "--config.clara.compr_rate=4",
      "--config.data.question_max_length=12",
      "--config.data.prompt_length=96",
      "--config.data.answer_length=12",
      "--config.data.lm_length=24",
      *extra,
    ]
    if stage == "stage2_retrieval":
      args.append("--config.init.from_workdir=../stage1_2")
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

  world = runs / "data" / "synth_tiny_seed0_c6_k2_f2_hidden"
  assert sorted(os.listdir(runs / "data")) == [
    "synth_tiny_seed0_c20_k3_f2_hidden",
    "synth_tiny_seed0_c20_k5_f2_hidden",
    "synth_tiny_seed0_c6_k2_f2_hidden",
  ]

  # The trained stage2 checkpoint through the inference jobs, on held-out questions.
  data2 = str(world / "stage2_test.jsonl")
  monkeypatch.setenv("CLARA_PROGRESS", "1")  # the bars, as on a terminal
  capsys.readouterr()
  assert (
    cli.main(
      [
        "lens",
        f"--workdir={runs / 'stage2'}",
        f"--compare={runs / 'stage1_2'}",
        f"--data={data2}",
        f"--out={tmp_path / 'lens.json'}",
        "--top=20",
        f"--manifest={world / 'manifest.json'}",
        "--limit=16",
      ]
    )
    == 0
  )
  lens = json.loads((tmp_path / "lens.json").read_text())
  assert set(lens["summary"]) == {"main", "compare"}
  assert "clue_recall" in lens["summary"]["main"]
  for name in ("main", "compare"):  # lens v2 on the generated world's multi-hop rows
    assert lens["lens_v2"][name]["all"]["questions"] > 0
    assert {"clue_auc", "doc_auc", "clue_auc_vs_null"} <= set(lens["lens_v2"][name]["all"])
  assert os.path.exists(tmp_path / "lens.png")
  err = capsys.readouterr().err
  assert "lens main" in err and "lens compare" in err and "question" in err
  assert (
    cli.main(
      [
        "evaluate",
        f"--workdir={runs / 'stage2'}",
        f"--data={data2}",
        f"--out={tmp_path / 'results.json'}",
        "--k=2",
        "--limit=6",
        f"--train_data={world / 'stage2_train.jsonl'}",
        "--max_new_tokens=6",
      ]
    )
    == 0
  )
  summary = json.loads((tmp_path / "results.json").read_text())
  assert summary["questions"] == 6 and summary["k"] == 2
  for key in (
    "em_normal",
    "f1_oracle",
    "cover_em_normal",
    "recall@1",
    "recall@5",
    "bm25_recall@1",
    "kind_prior_recall@1",
    "bm25_two_hop_recall@1",
    "gold_prior_recall@1",
    "compress_ms_per_question",
    "decode_ms_per_question",
  ):
    assert key in summary, key
  assert 0 <= summary["recall@5"] <= 1 and summary["decode_ms_per_question"] > 0
  assert "evaluate" in capsys.readouterr().err
  per_q = (tmp_path / "results.jsonl").read_text().splitlines()
  assert len(per_q) == 6 and "prediction_oracle" in json.loads(per_q[0])
  corpus = world / "corpus.jsonl"
  capsys.readouterr()
  assert (
    cli.main(
      [
        "index",
        f"--workdir={runs / 'stage2'}",
        f"--corpus={corpus}",
        f"--out={tmp_path / 'index'}",
        "--shard_size=4",
        "--query=Where?",
        "--top_n=3",
      ]
    )
    == 0
  )
  captured = capsys.readouterr()
  assert "index" in captured.err and "11/11" in captured.err  # 42 documents, 4 a shard
  result = json.loads(captured.out.strip().splitlines()[-1])
  assert result["num_docs"] == 42 and len(result["results"][0]) == 3
  assert len(result["answers"]) == 1 and isinstance(result["answers"][0], str)


def test_fresh_worlds_replace_the_training_file(tmp_path):
  """`data.synth_fresh` trains stage1/stage1_2/stage2 on num_steps x batch rows of new
  worlds (stage2 rows with all their candidates); the text stage refuses it."""
  from clara_jax.data.formats import read_rows
  from clara_jax.train.loop import data_files
  from configs import lm, stage1, stage2

  def fresh_files(stage, num_steps):
    config = stage.get_config("model=tiny")
    config.data.synth_fresh = True
    config.train.num_steps, config.train.global_batch = num_steps, 4
    return config, data_files(config, str(tmp_path / "runs" / config.stage))

  _, files = fresh_files(stage1, 5)
  assert files["train"].endswith("stage1_fresh20.jsonl")
  fresh = list(read_rows(files["train"], "stage1"))
  fixed = list(read_rows(files["test"], "stage1"))
  assert len(fresh) == 20
  assert not {r["docs"][0] for r in fresh} & {r["docs"][0] for r in fixed}
  config, files = fresh_files(stage2, 3)
  assert files["train"].endswith("stage2_fresh12.jsonl")
  rows = list(read_rows(files["train"], "stage2"))
  assert len(rows) == 12 and all(len(r["docs"]) == config.data.candidates for r in rows)
  with pytest.raises(ValueError, match="synth_fresh"):
    fresh_files(lm, 3)
