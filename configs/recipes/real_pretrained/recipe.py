"""The recipe of `clara-jax real-data --base smollm2` (or a GGUF file): the static
overrides every stage shares, each stage's own, and the evaluation settings.

The paper's setting: the base stays frozen and only the LoRA adapters (and, in stage1,
the CLaRa tokens' embedding rows) train; documents of 128 tokens compressed 8x (16 memory
tokens), the reference's English prompts in the base's chat format; stage2 trains
reasoner and generator (the reasoner at twice the rate, as in the demo) and reads the
stage1_2 compressor's memories from the memory cache. No `lm` stage: the base is
imported (`clara_jax.pipeline.real_data.import_base`).

Stages 1 and 1_2 compress with `STAGE1_SETTINGS`, chosen with
`clara_jax.eval.stage1_study` on training documents set aside (the paper's settings
wrote one memory for every document on this base). Sized for about 1 h on two CPU
cores with SmolLM2-135M (steps of 8 rows: stage1 7.2 s, stage1_2 13.7 s, stage2 over
cached memories 5.5 s; the evaluation of 200 held-out questions 8 min).

Run-time values are not here (README.md in this directory):
the pipeline (`clara_jax.pipeline.real_data.with_run_values`) adds the model size of the base, the data paths,
the memory cache and the data plan's `clara.k` and `data.candidates` to these dicts;
`recipe_config(stage, arg)` builds one stage's config from the static ones alone (for
SmolLM2-135M's shapes), as the stage files beside this one do for `clara-jax train`.
"""

import sys
from typing import Any, Dict

from configs.recipes import common
from configs.recipes.common import with_variant

# The configs' size of the `--base smollm2` base (`clara_jax.pipeline.real_data.BASES`); the
# imported export's own config is what trains.
MODEL = "smollm2_135m"
# The pipeline's stages in the order they train (README.md in this directory).
STAGES = ("stage1", "stage1_2", "stage2")

# The pipeline (configs/recipes/common.py): the real QA files, the `--base` model
# imported as the `lm` stage's export, the paper's stages (stage2 over the stage1_2
# compressor's cached memories), then the real-question evaluation.
DATA = "real"
BASE = "import"
TRAIN = STAGES
EVALUATION = "real"
MEMORY_CACHE = True

# What is converted and held out (`clara_jax.pipeline.real_data.DataPlan`): fewer
# training questions than from scratch (a 135M-parameter step costs ~50x the `tiny`
# model's), stage1 also reading the NQ gold passages and a restatement of each of its
# documents (chosen with `clara_jax.eval.stage1_study`), 100 held-out questions per set.
DATA_PLAN = {
  "limits": {"hotpotqa": 300, "nq": 1200, "pretrain": None},
  "test": {"hotpotqa": 100, "nq": 100},
  "k": 2,
  "nq_stage1": True,
  "restate_stage1": True,
}
QUICK_DATA_PLAN = {
  "limits": {"hotpotqa": 40, "nq": 60, "pretrain": 60},
  "test": {"hotpotqa": 8, "nq": 8},
  "k": 2,
  "nq_stage1": True,
  "restate_stage1": True,
}

# How a pretrained base's compressor trains (stages 1 and 1_2; the memory scale holds in
# every stage, as the generator must read memories as they were trained): memories
# rescaled to the token embeddings' RMS, no MSE alignment, the memories' bag-of-tokens
# loss (`clara.lexical_loss`), stage1 at lr 3e-3. Chosen on the stage1 study's dev
# documents (docs/real_smollm2.md), not on held-out questions.
STAGE1_SETTINGS = {
  "clara.memory_scale": "embedding",
  "clara.mse_weight": 0.0,
  "clara.lexical_weight": 1.0,
  "optimizer.lr": 3e-3,
}

DOC_LENGTH = 128
COMPR_RATE = 8

SHARED = {
  "data.prompt_style": "reference",
  "clara.doc_max_length": DOC_LENGTH,
  "clara.compr_rate": COMPR_RATE,
  "tokenizer.num_mem_tokens": DOC_LENGTH // COMPR_RATE,
  "data.question_max_length": 32,
  "data.answer_length": 24,
  "train.global_batch": 8,
  "train.log_every": 10,
  "train.checkpoint_every": 20,
  "mesh.shape": (-1, 1, 1),
  **{key: value for key, value in STAGE1_SETTINGS.items() if key != "optimizer.lr"},
}

STAGE_OVERRIDES: Dict[str, Dict[str, Any]] = {
  "stage1": {
    "train.num_steps": 150,
    "optimizer.lr": STAGE1_SETTINGS["optimizer.lr"],
    "data.answer_length": 48,
  },
  "stage1_2": {
    "train.num_steps": 60,
    "optimizer.lr": 5e-4,
    "init.reset_adapters": (),
  },
  "stage2": {
    "train.num_steps": 100,
    "optimizer.lr": 5e-4,
    "optimizer.lr_multipliers": ((".*/lora_reasoner/.*", 2.0),),
    "clara.train_generator": True,
  },
}

EVAL_QUESTIONS = None  # held-out questions evaluated (None: all)
MIN_MEMORY_GAIN = 1.0  # claim (a) threshold, nats per answer token

# `quick` (`clara-jax real-data --base smollm2 --quick`): shorter documents and a few
# steps per stage, enough to run every stage and the evaluation, too few for any claim
# (rows get no verdict).
QUICK_DOC_LENGTH = 64
QUICK_SHARED = {
  "clara.doc_max_length": QUICK_DOC_LENGTH,
  "tokenizer.num_mem_tokens": QUICK_DOC_LENGTH // COMPR_RATE,
  "train.log_every": 2,
  "train.checkpoint_every": 4,
}
QUICK_STEPS = dict(zip(STAGES, (6, 4, 4)))
QUICK_EVAL_QUESTIONS = 8  # each kind sampled evenly


def overrides(quick=False):
  """(shared, per-stage) static override dicts of the recipe or its `quick` variant;
  fresh copies, so a caller may change them."""
  return with_variant(SHARED, STAGE_OVERRIDES, quick, QUICK_SHARED, QUICK_STEPS)


def recipe_config(stage, arg=None):
  """The config of `stage` (one of STAGES) from the static overrides alone; `arg` is the
  variant string, e.g. 'quick,seed=1' (`configs.recipes.common.recipe_config`)."""
  return common.recipe_config(sys.modules[__name__], stage, arg)
