"""`train`, `plan` and `bench` compile one step: each goes through
`train.setup.setup_train_step`, and the programs they lower are the same text."""

import jax

from clara_jax.bench import plan
from clara_jax.bench.stage_step import build_stage_step, stage_config
from clara_jax.train import loop
from clara_jax.train import setup as setup_lib
from tests.train_cli import write_text_file

VOCAB = 300  # what a SentencePiece model trained on the small text file reaches


def _config(stage, workdir_text=None):
  config = stage_config(
    stage,
    batch=8,
    candidates=4,
    doc_len=32,
    compr_rate=16,
    k=2,
    question_len=8,
    prompt_len=24,
    answer_len=8,
  )
  config.mesh.shape = (-1, 1, 1)  # all 8 test devices, as train lays them out
  config.model.base_vocab_size = VOCAB
  config.tokenizer.vocab_size = VOCAB
  config.train.num_steps, config.train.log_every = 1, 1
  config.train.tensorboard, config.train.peak_flops = False, 1e11
  config.init.from_workdir = ""
  if workdir_text:
    config.data.source = workdir_text
  return config


def _train_lowered(config, workdir, monkeypatch):
  """The text of the step `train` runs (recorded at its first call)."""
  seen = []
  jit = setup_lib.TrainStepSetup.jit

  def recording(self, state_sh, batch_sh):
    step = jit(self, state_sh, batch_sh)

    def run(state, batch):
      seen.append(step.lower(state, batch).as_text())
      return step(state, batch)

    return run

  monkeypatch.setattr(setup_lib.TrainStepSetup, "jit", recording)
  loop.train(config, str(workdir))
  monkeypatch.undo()
  assert len(seen) == 1
  return seen[0]


def _plan_and_bench_lowered(config):
  planned = plan.lower_step(config, jax.devices())[3].as_text()
  setup, step, state, batch = build_stage_step(config)
  with setup.context():
    return planned, step.lower(state, batch).as_text()


def test_train_plan_and_bench_lower_the_same_step(tmp_path, monkeypatch):
  """The lm stage on a text file, then stage1 (a CLaRa stage: compressor, generator,
  the MSE term) on a generated world from the lm run's export."""
  config = _config("lm", write_text_file(tmp_path / "text.txt"))
  config.data.lm_length = 32
  trained = _train_lowered(config, tmp_path / "lm", monkeypatch)
  planned, benched = _plan_and_bench_lowered(config)
  assert trained == planned == benched
  # The comparison sees a change: another learning-rate schedule is another program.
  config.optimizer.schedule = "cosine"
  assert plan.lower_step(config, jax.devices())[3].as_text() != planned

  config = _config("stage1")
  config.data.prompt_style, config.data.prompt_length = "short", 64
  config.init.from_workdir = str(tmp_path / "lm")
  trained = _train_lowered(config, tmp_path / "stage1", monkeypatch)
  planned, benched = _plan_and_bench_lowered(config)
  assert trained == planned == benched
