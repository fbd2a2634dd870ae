"""The recipe of `clara-jax demo`: the overrides every stage shares, each stage's own,
and the pipeline's evaluation settings; docs/results.md records what was measured.

What makes reading learnable at this size (docs/results.md, "Single-token names vs syllable names"): names drawn from a
fixed pool of single tokens (`data.synth_names=pool`; a name is one piece to copy, not
a string of syllables), documents of two facts, compression rate 2, fresh worlds in
stage1 and stage1_2 (only reading lowers the loss), and the base weights training with
the adapters there (`clara.train_base`): the copy skill appears after ~700 stage1 steps
and the `tiny` model takes ~5 steps/s, so it gets thousands of steps in the budget.

`clara_jax.demo.default_recipe` reads these dicts; `recipe_config(stage, arg)` builds one
stage's config from them, as the stage files beside this one do for `clara-jax train`.
"""

import copy
import importlib
from typing import Any, Dict

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

VARIANTS = ("quick", "seed=N")


def with_variant(shared, stage_overrides, quick, quick_shared, quick_steps, quick_stage=None):
  """(shared, per-stage) override dicts of a recipe, or of its `quick` variant
  (`quick_shared` on top of `shared`, each stage's steps from `quick_steps` and the
  values `quick_stage` in every stage); fresh copies, so a caller may change them."""
  shared = copy.deepcopy(shared)
  stages = copy.deepcopy(stage_overrides)
  if quick:
    shared.update(quick_shared)
    for stage, steps in quick_steps.items():
      stages[stage].update({"train.num_steps": steps, **(quick_stage or {})})
  return shared, stages


def overrides(quick=False):
  """(shared, per-stage) override dicts of the recipe or its `quick` variant; fresh
  copies, so a caller may change them."""
  return with_variant(SHARED, STAGE_OVERRIDES, quick, QUICK_SHARED, QUICK_STEPS)


def build_config(stage, model, values, seed=0):
  """`configs/<stage's module>.py` for `model`, seeded, with `values` (dotted keys)
  applied in order."""
  module = importlib.import_module(f"configs.{CONFIG_OF.get(stage, stage)}")
  config = module.get_config(f"model={model}")
  # One seed for the parameters and the generated world: a pipeline's stages share it.
  config.seed = seed
  config.data.synth_seed = seed
  for key, value in values.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def parse_variant(arg):
  """'quick,seed=1' -> (True, 1). The recipe's own words: the stage config underneath
  always gets `model=tiny`, so its variants (configs/base.py) do not apply here."""
  quick, seed = False, 0
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.strip().partition("=")
    if key == "quick" and not value:
      quick = True
    elif key == "seed" and value.strip().isdigit():
      seed = int(value)
    else:
      raise ValueError(f"unknown recipe variant {part!r}; known: {', '.join(VARIANTS)}")
  return quick, seed


def recipe_config(stage, arg=None):
  """The demo's config of `stage` (one of STAGES): its configs/ file with the shared and
  the stage's overrides; `arg` is the variant string, e.g. 'quick,seed=1'. Run-time
  values (paths in the workdir, the edit's text) stay as the pipeline's defaults."""
  if stage not in STAGE_OVERRIDES:
    raise ValueError(f"unknown demo stage {stage!r}; known: {', '.join(STAGES)}")
  quick, seed = parse_variant(arg)
  shared, stages = overrides(quick)
  return build_config(stage, MODEL, {**shared, **stages[stage]}, seed)
