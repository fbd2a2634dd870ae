"""The shared base of every stage config; stage files change only what differs.

`get_config(arg)` in each stage file takes a comma-separated variant string, e.g.
`model=tiny,data=synth,runlocal` (big_vision style): `model=` picks a named size (a bare
size name, as in `configs/stage2.py:tiny`, means the same), `data=` is `synth` (the
generated world) or a directory of `{split}.jsonl` files in the stage's format,
`runlocal` shrinks steps and batch for a quick CPU run.
"""

import ml_collections

from clara_jax import partitioning
from clara_jax.model.config import MODEL_SIZES
from configs.common import model_config_dict

STAGE_FORMATS = {
  "lm": "text",
  "stage1": "stage1",
  "stage1_2": "stage1_2",
  "stage2": "stage2",
  "stage2_retrieval": "stage2",
}


def parse_arg(arg):
  """'model=tiny,runlocal' -> {'model': 'tiny', 'runlocal': True}; a bare model size
  name stands for `model=NAME`: 'tiny,runlocal' is the same."""
  out = {}
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    key = key.strip()
    if not value and key in MODEL_SIZES:
      key, value = "model", key
    out[key] = value.strip() if value else True
  unknown = set(out) - {"model", "data", "runlocal", "synth_size"}
  if unknown:
    raise ValueError(
      f"unknown config variant(s) {sorted(unknown)}; known: model=, data=, synth_size=, "
      "runlocal, or a model size name"
    )
  return out


def get_base_config(stage, arg=None):
  args = parse_arg(arg)
  model = args.get("model", "tiny")
  c = ml_collections.ConfigDict()
  c.stage = stage  # which loss and trainable set (clara_jax.model.stages)
  c.seed = 0  # parameter init, dropout and data order

  c.model_size = model  # the named size the model fields came from
  c.model = model_config_dict(model)  # decoder fields, overridable one by one

  c.clara = ml_collections.ConfigDict()
  c.clara.doc_max_length = 64  # document tokens before compression (paper: 256)
  c.clara.compr_rate = 16  # n_mem = doc_max_length // compr_rate
  c.clara.k = 5  # documents selected per question (stage2) / per prompt (stage1_2)
  c.clara.temperature = 0.02  # straight-through top-k tau
  c.clara.mse_weight = 0.1  # compressor alignment MSE weight (stages 1, 1_2)
  c.clara.train_compressor = False  # stage2: also train the compressor (paper: no)
  c.clara.train_generator = True  # stage2: also train the generator (paper: yes)
  c.clara.train_base = False  # stages 1, 1_2: also train the base weights (paper: no)
  c.clara.retrieval_temperature = 0.02  # InfoNCE tau of stage2_retrieval
  # How memories enter the generator: 'none' (the compressor's final-normed states, as in
  # the reference) or 'embedding' (each vector rescaled to the token embeddings' RMS).
  c.clara.memory_scale = "none"
  # Weight of the memories' bag-of-tokens loss (stages 1, 1_2): the LM head reading a
  # document's memories should predict its tokens (0: off, as in the paper).
  c.clara.lexical_weight = 0.0
  c.clara.replay_weight = 1.0  # weight of the replay text's LM loss (data.replay_text)
  c.clara.check_nans = False
  # stage2: candidates per pass of the frozen compressor (a loop over chunks of this
  # many; ~10 keeps a CPU's working set in cache, a TPU may take all at once).
  c.clara.compress_chunk = 10  # checkify NaN checks on retrieval scores (debug)

  c.data = ml_collections.ConfigDict()
  c.data.source = args.get("data", "synth")  # 'synth' or a directory of {split}.jsonl
  c.data.synth_size = args.get("synth_size", "tiny")  # world size when source=synth
  c.data.synth_seed = 0  # the generated world's seed (shared by a pipeline's stages)
  c.data.synth_max_facts = 0  # facts per generated document; 0 keeps all (longer docs)
  c.data.synth_names = "syllables"  # 'syllables' or 'pool' (single-token names, see synth)
  c.data.synth_fresh = False  # stage1/1_2/2: train on fresh worlds (reading, not recall)
  c.data.synth_world = "hidden"  # a name of synth.WORLDS: 'hidden' (closed bridge, hard
  # negatives, held-out chains), 'hidden_shared_names' or 'classic'
  c.data.shuffle_answers = False  # ablation: each answer from another same-template row
  c.data.lm_text = "all"  # lm stage on synth: 'all' (with fresh worlds) or 'world' (its facts)
  # stage1 / stage1_2 with clara.train_base: LM text the base keeps learning beside the
  # stage's loss ('' none, 'world' the generated world's own text, or a text file).
  c.data.replay_text = ""
  c.data.format = STAGE_FORMATS[stage]  # row format read by this stage
  c.data.train_split = "train"  # split trained on
  c.data.on_error = "raise"  # bad rows: 'raise' (file:line:field) or 'skip' and count
  c.data.candidates = 20  # stage2 documents per question
  c.data.question_max_length = 32  # question tokens kept (reasoner input)
  c.data.prompt_length = 96  # generator prompt region (left-padded)
  c.data.answer_length = 32  # generator answer region incl. eos (right-padded)
  c.data.lm_length = 128  # sequence length of LM pretraining
  c.data.prompt_style = "reference"  # generator prompts: 'reference' or 'short' (tiny models)
  # stage2 / stage2_retrieval: a directory of the frozen compressor's memories of every
  # candidate (`clara_jax.train.memory_cache`), read instead of compressing them each step.
  c.data.memory_cache = ""

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""  # a SentencePiece .model; empty: previous stage's or trained
  c.tokenizer.vocab_size = 2048  # when training one from the data's text
  c.tokenizer.num_mem_tokens = 16  # <MEM*> tokens; must cover n_mem

  c.init = ml_collections.ConfigDict()
  c.init.from_workdir = ""  # the previous stage's workdir (its export/ is loaded)
  c.init.reset_adapters = ()  # adapters re-initialised at start (fresh generator)
  c.init.copy_adapters = ()  # (src, dst) pairs, e.g. (('compressor', 'reasoner'),)
  # A workdir whose newest checkpoint supplies every parameter of the same path and
  # shape (the rest keep their init): a changed model or stage started from a run that
  # its own workdir would refuse to resume. Optimizer state and step start afresh.
  c.init.from_checkpoint = ""

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-4  # peak learning rate
  c.optimizer.schedule = "cosine"  # 'cosine' (to final_ratio * lr) or 'constant'
  c.optimizer.warmup_ratio = 0.03  # share of steps warming up linearly
  c.optimizer.final_ratio = 0.1  # cosine floor as a share of lr
  c.optimizer.b1 = 0.9  # Adam beta1
  c.optimizer.b2 = 0.95  # Adam beta2
  c.optimizer.weight_decay = 0.0  # AdamW decay (paper: none)
  c.optimizer.clip_norm = 1.0  # global gradient-norm clip
  # (regex, factor) pairs: the lr of trainable parameters whose path fully matches the
  # regex is multiplied by the factor (first match wins), e.g.
  # (('.*/lora_reasoner/.*', 3.0),)
  c.optimizer.lr_multipliers = ()
  # Regexes of parameters kept frozen although the stage would train them, e.g.
  # ('.*/attn/.*',) for a base update that leaves attention as it was.
  c.optimizer.frozen = ()

  c.train = ml_collections.ConfigDict()
  c.train.global_batch = 8  # examples per step over all devices and micro-batches
  c.train.grad_accum_steps = 1  # micro-batches per step
  c.train.num_steps = 200  # optimizer steps
  c.train.log_every = 10  # steps between metric writes
  c.train.tensorboard = True  # also write TensorBoard event files (WORKDIR/tensorboard)
  c.train.checkpoint_every = 50  # steps between (async) checkpoints
  c.train.keep_checkpoints = 3  # checkpoints kept
  c.train.max_consecutive_nonfinite = 5  # stop after this many skipped updates in a row
  c.train.parallelism = "jit"  # 'jit' (sharded over the mesh) or 'pmap' (data parallel)
  c.train.profile_steps = ()  # (first, last) step of a profiler trace, or empty
  c.train.peak_flops = 0.0  # MFU denominator in FLOP/s; 0 measures a 2048^3 matmul

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
  c.mesh.rules = partitioning.DEFAULT_RULES  # logical axis -> mesh axes

  if args.get("runlocal"):
    c.train.num_steps = 20
    c.train.global_batch = 8
    c.train.log_every = 5
    c.train.checkpoint_every = 10
  return c


# Fields that count something: each must be at least 1.
POSITIVE_INTS = (
  "clara.doc_max_length",
  "clara.compr_rate",
  "clara.k",
  "clara.compress_chunk",
  "data.candidates",
  "data.question_max_length",
  "data.prompt_length",
  "data.answer_length",
  "data.lm_length",
  "tokenizer.vocab_size",
  "tokenizer.num_mem_tokens",
  "train.global_batch",
  "train.grad_accum_steps",
  "train.num_steps",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.max_consecutive_nonfinite",
)
# (field, low, high, low included, high included)
FLOAT_RANGES = (
  ("optimizer.lr", 0.0, float("inf"), False, False),
  ("optimizer.warmup_ratio", 0.0, 1.0, True, False),
  ("optimizer.final_ratio", 0.0, 1.0, True, True),
  ("optimizer.b1", 0.0, 1.0, True, False),
  ("optimizer.b2", 0.0, 1.0, True, False),
  ("optimizer.weight_decay", 0.0, float("inf"), True, False),
  ("optimizer.clip_norm", 0.0, float("inf"), True, False),
  ("clara.temperature", 0.0, float("inf"), False, False),
  ("clara.retrieval_temperature", 0.0, float("inf"), False, False),
  ("clara.mse_weight", 0.0, float("inf"), True, False),
  ("clara.lexical_weight", 0.0, float("inf"), True, False),
  ("clara.replay_weight", 0.0, float("inf"), True, False),
)


def _get(c, dotted: str):
  node = c
  for part in dotted.split("."):
    node = node[part]
  return node


def _check_values(c) -> None:
  import math

  for field in POSITIVE_INTS:
    value = _get(c, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config: {field} must be a positive integer, got {value!r}")
  for field, lo, hi, lo_in, hi_in in FLOAT_RANGES:
    value = _get(c, field)
    ok = (
      isinstance(value, (int, float))
      and not isinstance(value, bool)
      and not math.isnan(value)
      and (lo <= value if lo_in else lo < value)
      and (value <= hi if hi_in else value < hi)
    )
    if not ok:
      interval = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
      raise ValueError(f"config: {field} must be a number in {interval}, got {value!r}")
  if c.optimizer.schedule not in ("cosine", "constant"):
    raise ValueError(
      f"config: optimizer.schedule must be 'cosine' or 'constant', got {c.optimizer.schedule!r}"
    )


def validate(c):
  """Clear errors, naming the field, for values out of range and settings that cannot
  work together; returns the config."""
  _check_values(c)
  from clara_jax.model.clara import num_memory_tokens

  n_mem = num_memory_tokens(c.clara.doc_max_length, c.clara.compr_rate)
  if n_mem > c.tokenizer.num_mem_tokens:
    raise ValueError(
      f"config: n_mem = doc_max_length // compr_rate = {n_mem} exceeds "
      f"tokenizer.num_mem_tokens = {c.tokenizer.num_mem_tokens}"
    )
  if c.stage in ("stage2", "stage2_retrieval") and c.clara.k > c.data.candidates:
    raise ValueError(f"config: clara.k = {c.clara.k} exceeds data.candidates = {c.data.candidates}")
  if c.train.global_batch % c.train.grad_accum_steps:
    raise ValueError(
      f"config: train.global_batch = {c.train.global_batch} is not divisible "
      f"by train.grad_accum_steps = {c.train.grad_accum_steps}"
    )
  if c.train.parallelism not in ("jit", "pmap"):
    raise ValueError(
      f"config: train.parallelism must be 'jit' or 'pmap', got {c.train.parallelism!r}"
    )
  if c.data.lm_text not in ("all", "world"):
    raise ValueError(f"config: data.lm_text must be 'all' or 'world', got {c.data.lm_text!r}")
  from clara_jax.data.synth import WORLDS

  if c.data.synth_world not in WORLDS:
    raise ValueError(
      f"config: data.synth_world must be one of {sorted(WORLDS)}, got {c.data.synth_world!r}"
    )
  if c.data.memory_cache and (
    c.stage not in ("stage2", "stage2_retrieval") or c.clara.train_compressor
  ):
    raise ValueError(
      "config: data.memory_cache holds a frozen compressor's memories: only "
      "stage2 and stage2_retrieval with clara.train_compressor=False read it"
    )
  from clara_jax.model.clara import MEMORY_SCALES

  if c.clara.memory_scale not in MEMORY_SCALES:
    raise ValueError(
      f"config: clara.memory_scale must be one of {MEMORY_SCALES}, got {c.clara.memory_scale!r}"
    )
  if c.data.on_error not in ("raise", "skip"):
    raise ValueError(f"config: data.on_error must be 'raise' or 'skip', got {c.data.on_error!r}")
  return c
