"""The recipe of `clara-jax real-data` from scratch (the default base): the static
overrides every stage shares, each stage's own, and the evaluation settings.

The demo's lessons (see `configs/recipes/demo/recipe.py`) on real text: the `tiny` model
(it affords thousands of steps), the base weights training with the adapters in stage1
and stage1_2, documents of 128 tokens (64 quick) compressed 4x, short prompts, the stage1
generator kept into stage1_2, and in stage2 the generator frozen and one selected
document. stage1_2 prompts hold `plan.k` documents. The generator prompt lengths are set
after the `lm` stage (`clara_jax.pipeline.real_data.fit_recipe`).

Run-time values are not here (README.md in this directory): the pipeline
(`clara_jax.pipeline.real_data.with_run_values`) adds the data paths and the data plan's `clara.k` and `data.candidates` to these dicts;
`recipe_config(stage, arg)` builds one stage's config from the static ones alone, as the
stage files beside this one do for `clara-jax train`.
"""

import sys
from typing import Any, Dict

from configs.recipes import common
from configs.recipes.common import with_variant

MODEL = "tiny"
# The pipeline's stages in the order they train (README.md in this directory).
STAGES = ("lm", "stage1", "stage1_2", "stage2")

# The pipeline (configs/recipes/common.py): the real QA files, the base trained by `lm`
# on their passages, the paper's stages, then stage2 against its initial reasoner.
DATA = "real"
BASE = "lm"
TRAIN = STAGES
EVALUATION = "checkpoints"
MEMORY_CACHE = False

# What is converted and held out (`clara_jax.pipeline.real_data.DataPlan`): every row
# of each source, 100 HotpotQA and 200 NQ questions held out, 2 documents per stage1_2
# row. Quick: the first rows of each source and 8 held-out questions per set.
DATA_PLAN = {
  "limits": {"hotpotqa": None, "nq": None, "pretrain": None},
  "test": {"hotpotqa": 100, "nq": 200},
  "k": 2,
}
QUICK_DATA_PLAN = {
  "limits": {"hotpotqa": 40, "nq": 60, "pretrain": 60},
  "test": {"hotpotqa": 8, "nq": 8},
  "k": 2,
}

DOC_LENGTH = 128
COMPR_RATE = 4

SHARED = {
  "tokenizer.vocab_size": 4096,
  "data.prompt_style": "short",
  "clara.doc_max_length": DOC_LENGTH,
  "clara.compr_rate": COMPR_RATE,
  "tokenizer.num_mem_tokens": DOC_LENGTH // COMPR_RATE,
  "data.question_max_length": 32,
  "data.answer_length": 16,
  "data.lm_length": DOC_LENGTH,
  "train.global_batch": 16,
  "train.log_every": 50,
  "train.checkpoint_every": 250,
  "mesh.shape": (-1, 1, 1),
}

STAGE_OVERRIDES: Dict[str, Dict[str, Any]] = {
  "lm": {
    "train.num_steps": 1500,
    "optimizer.lr": 3e-3,
    "train.global_batch": 32,
  },
  "stage1": {
    "train.num_steps": 1500,
    "optimizer.lr": 3e-3,
    "data.answer_length": 64,
    "clara.train_base": True,
  },
  "stage1_2": {
    "train.num_steps": 400,
    "optimizer.lr": 1e-3,
    "clara.train_base": True,
    "init.reset_adapters": (),
  },
  "stage2": {
    "train.num_steps": 400,
    "train.global_batch": 8,
    "optimizer.lr": 1e-3,
    "optimizer.schedule": "cosine",
    "optimizer.warmup_ratio": 0.03,
    "clara.train_generator": False,
    "clara.k": 1,
  },
}

EVAL_QUESTIONS = 200  # held-out questions evaluated, each kind sampled evenly
MIN_MEMORY_GAIN = 1.0  # claim (a) threshold, nats per answer token

# `quick` (`clara-jax real-data --quick`): shorter documents, a smaller tokenizer and a
# few steps of 8 rows per stage, enough to run every stage and the evaluation, too few
# for any claim (rows get no verdict).
QUICK_DOC_LENGTH = 64
QUICK_SHARED = {
  "tokenizer.vocab_size": 1024,
  "clara.doc_max_length": QUICK_DOC_LENGTH,
  "tokenizer.num_mem_tokens": QUICK_DOC_LENGTH // COMPR_RATE,
  "data.lm_length": QUICK_DOC_LENGTH,
  "train.global_batch": 8,
  "train.log_every": 10,
  "train.checkpoint_every": 20,
}
QUICK_STEPS = dict(zip(STAGES, (40, 20, 20, 20)))
QUICK_BATCH = 8  # every stage's, `lm` and stage2 included
QUICK_EVAL_QUESTIONS = 16


def overrides(quick=False):
  """(shared, per-stage) static override dicts of the recipe or its `quick` variant;
  fresh copies, so a caller may change them."""
  return with_variant(
    SHARED, STAGE_OVERRIDES, quick, QUICK_SHARED, QUICK_STEPS, {"train.global_batch": QUICK_BATCH}
  )


def recipe_config(stage, arg=None):
  """The config of `stage` (one of STAGES) from the static overrides alone; `arg` is the
  variant string, e.g. 'quick,seed=1' (`configs.recipes.common.recipe_config`)."""
  return common.recipe_config(sys.modules[__name__], stage, arg)
