"""The recipe of `clara-jax demo`: the overrides every stage shares, each stage's own,
and the pipeline's evaluation settings; docs/results.md records what was measured.

What makes reading learnable at this size (docs/results.md, "Single-token names vs syllable names"): names drawn from a
fixed pool of single tokens (`data.synth_names=pool`; a name is one piece to copy, not
a string of syllables), documents of two facts, compression rate 2, fresh worlds in
stage1 and stage1_2 (only reading lowers the loss), and the base weights training with
the adapters there (`clara.train_base`): the copy skill appears after ~700 stage1 steps
and the `tiny` model takes ~5 steps/s, so it gets thousands of steps in the budget.

The pipeline runner (`clara_jax.pipeline`, `clara-jax demo`) reads this file: what it
does with a recipe is declared below (`DATA`, `BASE`, `TRAIN`, `EVALUATION`,
`MEMORY_CACHE`; configs/recipes/common.py says what each means); `recipe_config(stage,
arg)` builds one stage's config, as the stage files beside this one do for
`clara-jax train`.
"""

import sys
from typing import Any, Dict

from configs.recipes import common
from configs.recipes.common import with_variant

MODEL = "tiny"
# The pipeline's stages in the order they train (README.md in this directory).
STAGES = (
  "lm",
  "stage1",
  "stage1_2",
  "stage2",
  "stage2_shuffled",
  "stage2_retrieval",
  "lm_edit",
  "lm_sham",
)
# Stage (its workdir name) -> the configs/ module it starts from, where they differ.
CONFIG_OF = {"stage2_shuffled": "stage2", "lm_edit": "lm", "lm_sham": "lm"}

# The pipeline: the generated world, the base trained by `lm`, then the paper's stages
# and beside stage2 the shuffled-answer ablation (stage2 whose answers carry no
# question-document signal) and the supervised retriever (trained on the gold labels:
# the ceiling), all from the same stage1_2 export; then the hidden-reasoning evaluation
# and the causal edit, which trains `lm_edit` and `lm_sham` from the stage2 export's
# base (`clara_jax.pipeline.world`).
DATA = "world"
BASE = "lm"
TRAIN = ("lm", "stage1", "stage1_2", "stage2", "stage2_shuffled", "stage2_retrieval")
EVALUATION = "hidden_world"
MEMORY_CACHE = False

SHARED = {
  "data.synth_size": "small",
  "data.synth_max_facts": 2,
  "data.synth_names": "pool",
  "tokenizer.vocab_size": 1024,
  "data.prompt_style": "short",
  "clara.doc_max_length": 32,
  "clara.compr_rate": 2,
  "clara.k": 2,
  "data.candidates": 10,
  "data.question_max_length": 24,
  "data.prompt_length": 64,
  "data.answer_length": 16,
  "data.lm_length": 80,
  "train.global_batch": 32,
  "train.log_every": 100,
  "train.checkpoint_every": 500,
  "mesh.shape": (-1, 1, 1),
  # One table embeds tokens and decodes states, so the lens reads the memories with
  # the rows the generator reads them as: through an untied head, the gold
  # documents' own memories decoded to their words at rank AUC 0.58, tied 0.71-0.77
  # (docs/results.md, "Tied vs untied embeddings").
  "model.tie_embeddings": True,
}

STAGE_OVERRIDES: Dict[str, Dict[str, Any]] = {
  "lm": {"train.num_steps": 1500, "optimizer.lr": 3e-3},
  # Fresh worlds: no fact repeats, so only reading the memories lowers the loss. The
  # base trains too, and keeps learning the world's own text beside it (replay): at
  # seed 0, stage1 without replay left the base knowing 0.04 of the held-out chains'
  # links (0.70 after `lm`, chance 0.06) and stage1_2 reading them at 0.12 nats; with
  # replay 0.84 and 1.78 nats (docs/results.md, "Does the base keep the world's knowledge through stage1? Refresh vs replay").
  "stage1": {
    "train.num_steps": 2500,
    "optimizer.lr": 3e-3,
    "data.synth_fresh": True,
    "clara.train_base": True,
    "data.prompt_length": 32,
    "data.answer_length": 40,
    "data.replay_text": "world",
  },
  # The answer format, still on fresh worlds (gold + a distractor), keeping the
  # stage1 generator (the reference starts a fresh one).
  "stage1_2": {
    "train.num_steps": 1000,
    "optimizer.lr": 1e-3,
    "data.synth_fresh": True,
    "clara.train_base": True,
    "init.reset_adapters": (),
    "data.replay_text": "world",
  },
  # Reasoner and generator train together, as in the paper. With the generator
  # frozen, stage2 beat its initial reasoner on both Recall@1 and Recall@5 in two whole
  # runs of six; training both did at each of the three seeds tried
  # (docs/results.md, "Frozen vs trainable generator in stage2"). One selected document (k = 1): the answer then depends on the
  # top-1 choice alone, which is what Recall@1 measures (with k = 2, Recall@2 rose and
  # Recall@1 stayed flat).
  # The reasoner at twice the generator's learning rate: at one rate it stayed at its
  # initial lens AUC at seed 1 and missed Recall@5 there; at 2x every recall and AUC
  # row passed at seeds 0-2, at 3x seed 0 lost Recall@5 (docs/results.md, "Reasoner learning rate in stage2").
  "stage2": {
    "train.num_steps": 1200,
    "train.global_batch": 16,
    "optimizer.lr": 1e-3,
    "optimizer.lr_multipliers": ((".*/lora_reasoner/.*", 2.0),),
    "optimizer.schedule": "cosine",
    "optimizer.warmup_ratio": 0.03,
    "clara.train_generator": True,
    "clara.k": 1,
  },
}
# The ablation is stage2 in every setting but its answers; the supervised retriever
# trains the reasoner alone for as many steps, at stage2's reasoner rate.
STAGE_OVERRIDES["stage2_shuffled"] = dict(
  STAGE_OVERRIDES["stage2"], **{"data.shuffle_answers": True}
)
STAGE_OVERRIDES["stage2_retrieval"] = {
  "train.num_steps": 1200,
  "train.global_batch": 16,
  "optimizer.lr": 2e-3,
  "optimizer.schedule": "cosine",
  "optimizer.warmup_ratio": 0.03,
  "clara.k": 1,
}
# The causal edit's fine-tunes (the text path is set at run time): the base only, from
# the stage2 export, adapters untouched; edit and sham differ in their text alone.
for _stage in ("lm_edit", "lm_sham"):
  STAGE_OVERRIDES[_stage] = {
    "train.num_steps": 100,
    "optimizer.lr": 1e-3,
    "init.from_workdir": "../stage2",
    "data.source": "",
  }

EVAL_QUESTIONS = None  # held-out questions evaluated (None: all)
MIN_MEMORY_GAIN = 1.0  # claim (a) threshold, nats per answer token

# `quick` (`clara-jax demo --quick`): a smaller world and a few steps per stage, enough
# to run every stage and the evaluation, too few for any claim (rows get no verdict).
QUICK_SHARED = {
  "data.synth_size": "tiny",
  "train.global_batch": 16,
  "train.log_every": 10,
  "train.checkpoint_every": 20,
}
QUICK_STEPS = dict(zip(STAGES, (60, 40, 30, 30, 30, 30, 10, 10)))
QUICK_EVAL_QUESTIONS = 24  # each kind sampled evenly


def overrides(quick=False):
  """(shared, per-stage) override dicts of the recipe or its `quick` variant; fresh
  copies, so a caller may change them."""
  return with_variant(SHARED, STAGE_OVERRIDES, quick, QUICK_SHARED, QUICK_STEPS)


def recipe_config(stage, arg=None):
  """The demo's config of `stage` (one of STAGES); `arg` is the variant string, e.g.
  'quick,seed=1' (`configs.recipes.common.recipe_config`)."""
  return common.recipe_config(sys.modules[__name__], stage, arg)
