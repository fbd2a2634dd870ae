"""A run whose workdir, data, evaluation output and index live on `gs://` (a local GCS
emulator, tests/gcs_emulator.py): trained, killed with SIGKILL, resumed by the same
command, exported, evaluated and indexed, ending with the parameters of the same run on a
local workdir. Every path goes through clara_jax.paths (epath) and orbax's TensorStore."""

import json
import signal

import numpy as np
from gcs_emulator import BUCKET, client_env
from train_cli import ROOT, run_train, wait_for_step

from clara_jax import cli, paths
from clara_jax.infer.index import MemoryIndex
from clara_jax.train.metrics import read_metrics

STEPS = 12
WORLD = "synth_tiny_seed0_c6_k2_f2_hidden"


def _train_args(workdir):
  return [
    "train",
    f"--config={ROOT}/configs/stage2.py:model=tiny,data=synth",
    f"--workdir={workdir}",
    "--config.init.from_workdir=",
    "--config.init.copy_adapters=()",
    "--config.data.synth_max_facts=2",
    "--config.tokenizer.vocab_size=512",
    f"--config.train.num_steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=2",
    "--config.train.global_batch=8",
    "--config.train.peak_flops=1e11",
    "--config.train.tensorboard=False",  # TensorFlow's GCS client has no emulator
    "--config.clara.k=2",
    "--config.data.candidates=6",
    "--config.clara.doc_max_length=16",
    "--config.clara.compr_rate=4",
    "--config.data.question_max_length=12",
    "--config.data.prompt_length=96",
    "--config.data.answer_length=12",
  ]


def _train(args, log, gcs):
  proc = run_train(args, log=log, env=client_env(gcs))
  assert proc.wait(timeout=600) == 0, open(log).read()[-3000:]


def _params(workdir):
  from clara_jax.model import layout, lora
  from clara_jax.weights.export import load_params

  _, params = load_params(paths.join(workdir, "export"))
  return lora.flatten(layout.to_unrolled(params))


def test_a_gs_workdir_trains_resumes_exports_evaluates_and_indexes(gcs, tmp_path):
  root = f"gs://{BUCKET}/runs"
  workdir = f"{root}/stage2"

  # Killed mid-run (SIGKILL: no checkpoint on the way out, the lock left behind).
  log = str(tmp_path / "killed.log")
  proc = run_train(_train_args(workdir), log=log, env=client_env(gcs))
  try:
    wait_for_step(workdir, log, 5, [proc], timeout=400)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  assert not paths.exists(paths.join(workdir, "export", "config.json"))
  assert paths.exists(paths.join(workdir, "LOCK.json"))
  saved = [int(s) for s in paths.listdir(paths.join(workdir, "checkpoints")) if s.isdigit()]
  assert saved and max(saved) < STEPS

  # The same command resumes (the stale lock taken over) and finishes.
  _train(_train_args(workdir), str(tmp_path / "resumed.log"), gcs)
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert not paths.exists(paths.join(workdir, "LOCK.json"))

  # The same run on a local workdir, uninterrupted, ends with the same parameters, bit
  # for bit. (Every run is a subprocess: this process compiles without XLA's
  # optimisations, tests/conftest.py, which rounds differently.)
  local = str(tmp_path / "runs" / "stage2")
  _train(_train_args(local), str(tmp_path / "local.log"), gcs)
  assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(local)]
  want, got = _params(local), _params(workdir)
  assert set(want) == set(got)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  # Evaluation reads its rows from and writes its report to the bucket.
  world = f"{root}/data/{WORLD}"
  out = f"{root}/eval/results.json"
  assert (
    cli.main(
      [
        "evaluate",
        f"--workdir={workdir}",
        f"--data={world}/stage2_test.jsonl",
        f"--out={out}",
        "--k=2",
        "--limit=4",
        "--max_new_tokens=4",
      ]
    )
    == 0
  )
  summary = paths.read_json(out)
  assert summary["questions"] == 4 and summary["k"] == 2
  assert len(paths.read_text(f"{root}/eval/results.jsonl").splitlines()) == 4

  # The index: built from a corpus in the bucket, into the bucket, then searched.
  index_dir = f"{root}/index"
  assert (
    cli.main(
      [
        "index",
        f"--workdir={workdir}",
        f"--corpus={world}/corpus.jsonl",
        f"--out={index_dir}",
        "--shard_size=16",
        "--query=Where?",
        "--top_n=3",
      ]
    )
    == 0
  )
  index = MemoryIndex.load(index_dir)
  assert len(index.ids) == 42
  assert sum(name.startswith("shard_") for name in paths.listdir(index_dir)) == 3
  local_index = str(tmp_path / "index")
  assert (
    cli.main(
      [
        "index",
        f"--workdir={local}",
        f"--corpus={world}/corpus.jsonl",
        f"--out={local_index}",
        "--shard_size=16",
      ]
    )
    == 0
  )
  np.testing.assert_array_equal(
    np.asarray(index.matrix), np.asarray(MemoryIndex.load(local_index).matrix)
  )
  assert json.loads(json.dumps(index.ids)) == MemoryIndex.load(local_index).ids
