"""The training job of any stage: config in, checkpoints, metrics and an export out.

    train(config, workdir)

Layout of a workdir: `checkpoints/` (orbax, resumable), `metrics.jsonl`,
`tensorboard/`, `tfds/` (prepared data), `export/` (config.json + params + the tokenizer
model: what the next stage's `init.from_workdir` loads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import posixpath
import signal
import tempfile
import time
from typing import (
  TYPE_CHECKING,
  Any,
  BinaryIO,
  Callable,
  Dict,
  Iterator,
  List,
  Mapping,
  Optional,
  Sequence,
  Tuple,
  cast,
)

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions

from clara_jax import paths
from clara_jax.data import formats, packing, tfds_builders
from clara_jax.data import tokenizer as tokenizer_lib
from clara_jax.data.features import FeatureConfig, Featurizer, ReplayFeaturizer
from clara_jax.data.pipeline import InputPipeline, to_global_arrays
from clara_jax.data.tokenizer import ClaraTokenizer, Tokenizer
from clara_jax.model import layout, lora
from clara_jax.model.clara import ClaraConfig
from clara_jax.model.config import config_from_dict
from clara_jax.model.decoder import init_params
from clara_jax.train import run_config
from clara_jax.train.checkpoint import Checkpointer, abstract_with_shardings, newest_parameters
from clara_jax.train.metrics import MetricsWriter, parameter_overview
from clara_jax.train.nonfinite import NonFiniteError, NonFiniteStreak
from clara_jax.train.peak import matmul_peak_flops
from clara_jax.train.setup import clara_config, setup_train_step, step_flops
from clara_jax.train.state import create_state
from clara_jax.train.step import pmap_train_step, replicate, unreplicate
from clara_jax.train.workdir_lock import WorkdirLock
from clara_jax.weights.export import load_params, save_params

if TYPE_CHECKING:
  import types

  import ml_collections

  from clara_jax.model.config import DecoderConfig
  from clara_jax.train.memory_cache import MemoryCache
  from clara_jax.train.setup import TrainStepSetup
  from clara_jax.train.state import TrainState

TOKENIZER_FILE = "tokenizer.model"
CLARA_FILE = "clara.json"  # the CLaRa lengths an export was trained with


class Preempted(RuntimeError):
  """SIGTERM (how a TPU VM is preempted) or SIGINT stopped the run after a checkpoint
  of `step` was saved; the same command resumes it. `exit_code`: 128 + the signal."""

  def __init__(self, step: int, signum: int, workdir: str) -> None:
    name = signal.Signals(signum).name
    super().__init__(
      f"{name} at step {step}: checkpoint saved in {workdir}/checkpoints; "
      f"run the same command again to resume"
    )
    self.step, self.signum, self.exit_code = step, signum, 128 + signum


class _Preemption:
  """When to stop for a preemption: the loop asks `reached(step)` after each step, and
  on True saves a checkpoint of that step and exits (the step in flight finishes, so the
  checkpoint is a consistent one).

  One process: SIGTERM and SIGINT set a flag. Several processes: every host must save
  the same step, and a signal reaches one host at a time (or only one), so the decision
  goes through JAX's preemption sync service. Its SIGTERM notifier tells the
  coordinator, which picks the step after the furthest host's; `reached` is True on
  every host at that step. It is a local check: no per-step collective. SIGINT is turned
  into a SIGTERM for the notifier, so Ctrl-C on one host stops all of them at one step.
  """

  def __init__(self) -> None:
    self.signum: Optional[int] = None
    self._previous: Dict[int, Any] = {}  # the handlers signal.signal replaced
    self._synced = _preemption_service_running()

  def reached(self, step: int) -> bool:
    if not self._synced:
      return self.signum is not None
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
      self.signum = self.signum or signal.SIGTERM  # a host that saw no signal itself
      return True
    return False

  def __enter__(self) -> _Preemption:
    # With the sync service, SIGTERM stays with its notifier (a Python handler would
    # replace the notifier's and the other hosts would never hear of it).
    signals = (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: no handler, nothing to restore
        pass
    return self

  def _handle(self, signum: int, frame: Optional[types.FrameType]) -> None:
    del frame
    logging.warning("%s received: saving a checkpoint before exiting", signal.Signals(signum).name)
    self.signum = signum
    if self._synced:
      os.kill(os.getpid(), signal.SIGTERM)

  def __exit__(self, *exc: object) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def _preemption_service_running() -> bool:
  """Whether this is a multi-process job with JAX's preemption sync service (on unless
  `jax_enable_preemption_service` is off)."""
  if jax.process_count() == 1:
    return False
  from jax._src import distributed

  if distributed.global_state.preemption_sync_manager is None:
    logging.warning(
      "multi-process run without the JAX preemption service "
      "(jax_enable_preemption_service): a signal stops only the host it "
      "reaches"
    )
    return False
  return True


def _previous_export(config: ml_collections.ConfigDict, workdir: str) -> Optional[str]:
  if not config.init.from_workdir:
    return None
  prev = paths.resolve(workdir, config.init.from_workdir, "export")
  if not paths.exists(paths.join(prev, "config.json")):
    raise FileNotFoundError(
      f"{prev}: the previous stage's export is missing "
      f"(config init.from_workdir={config.init.from_workdir!r})"
    )
  return prev


def synth_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the generated world lives: beside the workdir, shared by the stages of one
  pipeline that ask for the same world (its name holds every generation setting)."""
  d = config.data
  name = f"synth_{d.synth_size}_seed{d.synth_seed}_c{d.candidates}_k{config.clara.k}"
  if d.synth_max_facts:
    name += f"_f{d.synth_max_facts}"
  if d.synth_names != "syllables":
    name += f"_{d.synth_names}"
  if d.synth_world != "classic":
    name += f"_{d.synth_world}"
  return paths.resolve(workdir, "..", "data", name)


def _fresh_rows_needed(config: ml_collections.ConfigDict) -> int:
  return config.train.num_steps * config.train.global_batch


def data_files(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, str]:
  """{split: file} of this stage's rows (the generated world is written on first use)."""
  fmt = config.data.format
  d = config.data
  if d.source == "synth":
    from clara_jax.data import synth

    directory = synth_dir(config, workdir)
    max_facts = d.synth_max_facts or None
    if not paths.exists(paths.join(directory, "manifest.json")):
      if jax.process_index() == 0:
        synth.write_world(
          directory,
          seed=d.synth_seed,
          size=d.synth_size,
          candidates=d.candidates,
          k=config.clara.k,
          max_facts=max_facts,
          names=d.synth_names,
          world=d.synth_world,
        )
      _barrier("synth world written")
    if d.synth_fresh and fmt not in ("stage1", "stage1_2", "stage2"):
      raise ValueError(
        f"config: data.synth_fresh trains on fresh worlds, which only "
        f"stage1, stage1_2 and stage2 do (this stage reads {fmt!r} rows)"
      )
    if fmt == "text":
      return {
        "train": paths.join(directory, synth.LM_WORLD_FILE if d.lm_text == "world" else "lm.txt")
      }
    files = {split: paths.join(directory, f"{fmt}_{split}.jsonl") for split in ("train", "test")}
    if d.synth_fresh:
      rows = _fresh_rows_needed(config)
      path = paths.join(directory, f"{fmt}_fresh{rows}.jsonl")
      if not paths.exists(path) and jax.process_index() == 0:
        synth.write_fresh(
          path,
          d.synth_seed,
          rows,
          fmt,
          d.synth_size,
          config.clara.k,
          max_facts,
          d.synth_names,
          candidates=d.candidates,
          world=d.synth_world,
        )
      _barrier("fresh rows written")
      files["train"] = path
    return _with_shuffled_answers(config, files)
  source = d.source
  if fmt == "text":
    return {"train": source}
  return _with_shuffled_answers(config, tfds_builders.split_files(source))


def _with_replay_text(
  config: ml_collections.ConfigDict, workdir: str, files: Dict[str, str]
) -> Dict[str, str]:
  """`data.replay_text`: "world" (the generated world's own LM text) or a text file,
  added as `files["replay"]` for the stage's replay loss."""
  replay = config.data.replay_text
  if not replay:
    return files
  if config.stage not in ("stage1", "stage1_2"):
    raise ValueError(
      f"config: data.replay_text keeps a base that stage1 / stage1_2 update; "
      f"stage {config.stage!r} does not update it"
    )
  if replay == "world":
    if config.data.source != "synth":
      raise ValueError("config: data.replay_text='world' needs data.source='synth'")
    from clara_jax.data import synth

    replay = paths.join(synth_dir(config, workdir), synth.LM_WORLD_FILE)
  if not paths.isfile(replay):
    raise FileNotFoundError(f"{replay}: no such replay text file (config data.replay_text)")
  return dict(files, replay=replay)


def _with_shuffled_answers(
  config: ml_collections.ConfigDict, files: Dict[str, str]
) -> Dict[str, str]:
  """`data.shuffle_answers`: the training file with every answer taken from another
  question of the same template (the ablation whose gradient carries no
  question-document signal), written once beside the original."""
  if not config.data.shuffle_answers:
    return files
  from clara_jax.data import synth

  source = files[config.data.train_split]
  # posixpath: string surgery on the name only, right for local paths and URIs alike
  path = posixpath.splitext(source)[0] + f"_shuffled_answers_seed{config.seed}.jsonl"
  if not paths.exists(path) and jax.process_index() == 0:
    synth.write_shuffled_answers(source, path, seed=config.seed)
  _barrier("shuffled answers written")
  return dict(files, **{config.data.train_split: path})


def load_tokenizer(
  config: ml_collections.ConfigDict, workdir: str, files: Dict[str, str], prev: Optional[str]
) -> ClaraTokenizer:
  """The tokenizer: configured path (a SentencePiece model, a tokenizer.json or a
  directory with one), else the previous stage's, else trained on the text of the
  training data (and saved in the export)."""
  n = config.tokenizer.num_mem_tokens
  if config.tokenizer.path:
    return tokenizer_lib.load_tokenizer(config.tokenizer.path, n)
  if prev is not None:
    return tokenizer_lib.load_tokenizer(prev, n)
  export = paths.join(workdir, "export")
  if any(
    paths.exists(paths.join(export, backend.FILENAME))
    for backend in (Tokenizer, tokenizer_lib.BPETokenizer)
  ):
    return tokenizer_lib.load_tokenizer(export, n)
  own = paths.join(export, TOKENIZER_FILE)
  texts = list(_training_texts(files["train"], config.data.format))
  symbols: Sequence[str] = ()
  if config.data.synth_names == "pool":  # the generated names stay single pieces
    from clara_jax.data import synth

    symbols = synth.pool_symbols()
  tok = Tokenizer.train(
    texts, config.tokenizer.vocab_size, n, seed=config.seed, user_symbols=symbols
  )
  if jax.process_index() == 0:  # training is deterministic: every process has the same
    paths.makedirs(paths.parent(own))
    tok.save(own)
  return tok


def _open_text(path: str) -> io.TextIOWrapper:
  """A text file (local or a URI; `.gz` decompressed) read line by line."""
  # cast: typeshed's TextIOWrapper wants a buffer with `name`, which BufferedIOBase lacks
  return io.TextIOWrapper(cast(BinaryIO, paths.open_binary(path)), encoding="utf-8")


def _training_texts(path: str, fmt: str) -> Iterator[str]:
  if fmt == "text":
    with _open_text(path) as f:
      yield from (line.rstrip("\n") for line in f if line.strip())
    return
  for row in formats.read_rows(path, fmt, on_error="skip"):
    yield from row["docs"]
    yield from (row["question"] if isinstance(row["question"], list) else [row["question"]])
    yield from row["answers"]


def _text_source(path: str) -> List[Dict[str, str]]:
  with _open_text(path) as f:
    return [{"text": line.rstrip("\n")} for line in f if line.strip()]


def prepared_data_dir(workdir: str) -> Tuple[str, bool]:
  """Where the prepared (TFDS ArrayRecord) dataset lives, and whether all processes share
  it. ArrayRecord reads and writes local files only, so a workdir on an object store keeps
  its prepared data on each host's local disk, in the temporary directory under a name
  derived from the workdir (a resume on the same host finds it; elsewhere it is prepared
  again, identically); a local workdir keeps it in WORKDIR/tfds."""
  if not paths.is_remote(workdir):
    return paths.join(workdir, "tfds"), True
  key = hashlib.sha256(os.fspath(workdir).encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "clara_jax_tfds", key), False


def build_pipeline(
  config: ml_collections.ConfigDict,
  workdir: str,
  tok: ClaraTokenizer,
  files: Dict[str, str],
  cclara: ClaraConfig,
  cache: Optional[MemoryCache] = None,
) -> InputPipeline:
  """The stage's input pipeline; `cache` (a `memory_cache.MemoryCache`): stage2 examples
  carry the candidates' cached memories instead of their tokens."""
  fmt, d = config.data.format, config.data
  num_docs = {"stage1": 1, "stage1_2": cclara.k}.get(config.stage, d.candidates)
  feat_cfg = FeatureConfig(
    stage=config.stage,
    n_mem=cclara.n_mem,
    doc_max_length=cclara.doc_max_length,
    question_max_length=d.question_max_length,
    k=cclara.k,
    num_docs=num_docs,
    prompt_length=d.prompt_length,
    answer_length=d.answer_length,
    lm_length=d.lm_length,
    prompt_style=d.prompt_style,
  )
  if fmt == "text":
    source, decode = _text_source(files[d.train_split]), (lambda row: row)
  else:
    splits = {split: path for split, path in files.items() if split != "replay"}
    data_dir, shared = prepared_data_dir(workdir)
    prepare = lambda: tfds_builders.prepare(
      fmt,
      splits,
      data_dir,
      on_error=d.on_error,
      num_docs=num_docs if config.stage == "stage1_2" else None,
    )
    # On a shared directory process 0 writes the dataset and the others open it once it
    # is complete; on local copies every process prepares its own.
    if jax.process_index() == 0 or not shared:
      builder = prepare()
    _barrier("tfds prepared")
    if jax.process_index() != 0 and shared:
      builder = prepare()
    source, decode = builder.as_data_source(split=d.train_split), tfds_builders.decode_row
    for split, report in builder.reports.items():
      if report.rows_skipped:
        logging.warning("data %s: %s", split, report.summary())
  stage_featurize = Featurizer(
    tok, feat_cfg, seed=config.seed, doc_memories=None if cache is None else cache.lookup
  )
  featurize: Featurizer | ReplayFeaturizer = stage_featurize
  if "replay" in files:
    lm_cfg = dataclasses.replace(feat_cfg, stage="lm")
    lines = [row["text"] for row in _text_source(files["replay"])]
    featurize = ReplayFeaturizer(stage_featurize, lines, Featurizer(tok, lm_cfg, seed=config.seed))
  return InputPipeline(
    source, featurize, config.train.global_batch, seed=config.seed, decode=decode
  )


def initial_params(
  config: ml_collections.ConfigDict,
  tok: ClaraTokenizer,
  prev: Optional[str],
  overlay_from: Optional[str] = None,
) -> Tuple[DecoderConfig, Any]:
  """(DecoderConfig, params): the previous stage's export, or a fresh init; then the
  parameters of the checkpoint in `overlay_from` where path and shape match; then the
  configured adapter resets and copies (stage1_2: fresh generator; stage2: reasoner :=
  compressor)."""
  if prev is not None:
    cfg, params = load_params(prev)
    # How the blocks run is this stage's choice; the weights are the previous stage's.
    cfg = cfg.replace(scan_layers=config.model.scan_layers, remat_policy=config.model.remat_policy)
    params = layout.for_config(params, cfg)
  else:
    model = config.model.to_dict()
    model["num_extra_tokens"] = tok.num_special
    model["base_vocab_size"] = tok.base_vocab_size
    cfg = config_from_dict(model)
    params = init_params(cfg, jax.random.key(config.seed))
  if cfg.vocab_size != tok.vocab_size:
    raise ValueError(f"model vocabulary {cfg.vocab_size} != tokenizer vocabulary {tok.vocab_size}")
  if overlay_from:
    params = overlay_parameters(params, *newest_parameters(overlay_from))
  if config.init.reset_adapters:
    fresh = lora.split_adapters(init_params(cfg, jax.random.key(config.seed + 1)))[1]
    base, adapters = lora.split_adapters(params)
    for name in config.init.reset_adapters:
      adapters[name] = fresh[name]
    params = lora.merge_adapters(base, adapters)
  for src, dst in config.init.copy_adapters:
    params = lora.copy_adapter(params, src, dst)
  return cfg, params


def overlay_parameters(
  params: Any, origin: str, saved: Mapping[str, np.ndarray | jax.Array]
) -> Any:
  """`params` with every parameter whose path and shape `saved` also has replaced by the
  saved value (cast to the model's dtype). What does not match keeps its value and is
  logged; no match at all is an error (the wrong workdir, most likely)."""
  flat = lora.flatten(params)
  # The checkpoint may hold the other block layout (scanned vs unrolled).
  saved = lora.flatten(layout.like(lora.unflatten(saved), params))
  taken, reshaped = [], []
  for path, value in flat.items():
    if path not in saved:
      continue
    if tuple(saved[path].shape) != tuple(value.shape):
      reshaped.append(f"{path} {tuple(saved[path].shape)} -> {tuple(value.shape)}")
      continue
    flat[path] = jnp.asarray(saved[path], value.dtype)
    taken.append(path)
  if not taken:
    raise ValueError(
      f"init.from_checkpoint: no parameter of {origin} matches this model's (path and shape)"
    )
  new = len(flat) - len(taken) - len(reshaped)
  logging.warning(
    "init.from_checkpoint: %d of %d parameters from %s; kept from the init: "
    "%d the checkpoint lacks, %d of another shape%s; %d checkpoint "
    "parameters unused",
    len(taken),
    len(flat),
    origin,
    new,
    len(reshaped),
    f" ({'; '.join(reshaped[:5])}{' ...' if len(reshaped) > 5 else ''})" if reshaped else "",
    len(set(saved) - set(flat)),
  )
  return lora.unflatten(flat)


def _memory_cache(
  config: ml_collections.ConfigDict, params: Any, cclara: ClaraConfig
) -> Optional[MemoryCache]:
  """The stage's `data.memory_cache`, loaded and checked against the initial parameters'
  compressor (None when not configured)."""
  if not config.data.memory_cache:
    return None
  from clara_jax.train import memory_cache

  cache = memory_cache.MemoryCache(config.data.memory_cache)
  cache.check(params, cclara.n_mem, cclara.doc_max_length, f"stage {config.stage}")
  return cache


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  progress: Optional[Callable[[int, int, Dict[str, float]], None]] = None,
) -> Dict[str, float]:
  """Runs (or resumes) a stage; returns the last logged metrics. `progress(step,
  num_steps, metrics)` is called at every logging step (e.g. a progress bar).

  Holds the workdir's lock (`WorkdirLocked` if another run has it). Raises `Preempted`
  after saving a checkpoint when SIGTERM or SIGINT arrives."""
  from configs.base import validate

  validate(config)
  workdir = os.fspath(paths.path(workdir))  # absolute when local; a URI as given
  if paths.exists(workdir) and not paths.isdir(workdir):
    raise NotADirectoryError(f"{workdir}: --workdir is a file; expected a run directory")
  paths.makedirs(workdir)
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _train(config, workdir, progress)


def _train(
  config: ml_collections.ConfigDict,
  workdir: str,
  progress: Optional[Callable[[int, int, Dict[str, float]], None]],
) -> Dict[str, float]:
  ckpt_dir = paths.join(workdir, "checkpoints")
  saved_steps = sorted(int(d) for d in paths.listdir(ckpt_dir) if d.isdigit())
  run_config.check_or_record(workdir, config, bool(saved_steps), write=jax.process_index() == 0)
  cclara = clara_config(config)
  prev = _previous_export(config, workdir)
  files = _with_replay_text(config, workdir, data_files(config, workdir))
  tok = load_tokenizer(config, workdir, files, prev)
  # init.from_checkpoint seeds a first start only: a resume restores its own checkpoint.
  overlay_from = (
    paths.resolve(workdir, config.init.from_checkpoint)
    if config.init.from_checkpoint and not saved_steps
    else None
  )
  cfg, params = initial_params(config, tok, prev, overlay_from)
  pmap = config.train.parallelism == "pmap"
  setup = setup_train_step(
    config, cfg, params, replay="replay" in files, axis_name="batch" if pmap else None
  )
  cache = _memory_cache(config, params, cclara)
  state = create_state(params, setup.mask, setup.tx, config.seed)
  del params
  state_sh = setup.state_shardings(jax.eval_shape(lambda: state))
  state = jax.device_put(state, state_sh)

  pipeline = build_pipeline(config, workdir, tok, files, cclara, cache)
  checkpointer = Checkpointer(
    ckpt_dir, config.train.checkpoint_every, config.train.keep_checkpoints
  )
  step0, state = _restore(checkpointer, state, state_sh, pipeline, saved_steps)
  writer = _open_writer(config, workdir, step0)
  logging.info("%s", parameter_overview(state.trainable, state.frozen, setup.params_sh))
  window = _MetricsWindow(
    tokens_per_step=_tokens_per_step(config, cclara, cached=cache is not None),
    flops=step_flops(config, cfg, cclara, cached=cache is not None),
    peak=config.train.peak_flops or matmul_peak_flops(dtype=jnp.dtype(cfg.dtype)),
  )
  run = _Run(config, workdir, progress, pipeline, checkpointer, writer, window, pmap)
  state = run.loop(_StepRunner(setup, state_sh, pmap), state, step0)
  _write_export(config, workdir, cfg, state.params(), tok)
  return run.last


def _open_writer(config: ml_collections.ConfigDict, workdir: str, step0: int) -> MetricsWriter:
  """The run's metrics writer, resuming after `step0`; a first start records the
  hyperparameters."""
  # train.tensorboard False: metrics.jsonl only (for stores TensorFlow cannot reach).
  writer = MetricsWriter(workdir, tensorboard=config.train.tensorboard, resume_step=step0)
  logging.info("training steps %d to %d", step0 + 1, config.train.num_steps)
  if step0 == 0:
    writer.write_hparams(_flat_hparams(config))
  return writer


class _StepRunner:
  """One training step on a host batch: pmapped over the local devices (the state is
  replicated by `place`), or jitted over the mesh, compiled at the first batch with its
  shardings."""

  def __init__(self, setup: TrainStepSetup, state_sh: TrainState, pmap: bool) -> None:
    self.setup, self.state_sh, self.pmap = setup, state_sh, pmap
    self._step: Optional[Callable] = pmap_train_step(setup.step_fn) if pmap else None

  def place(self, state: TrainState) -> TrainState:
    return replicate(jax.device_get(state)) if self.pmap else state

  def context(self) -> contextlib.AbstractContextManager[Any]:
    """The context the loop runs in: the mesh's, for the jitted step."""
    return contextlib.nullcontext() if self.pmap else self.setup.context()

  def __call__(
    self, state: TrainState, local: Dict[str, Any]
  ) -> Tuple[TrainState, Dict[str, jax.Array]]:
    if self.pmap:
      n = jax.local_device_count()
      host_batch = {k: np.asarray(v).reshape((n, -1) + np.shape(v)[1:]) for k, v in local.items()}
      assert self._step is not None  # the pmapped step, set at construction
      state, metrics = self._step(state, host_batch)
      return state, unreplicate(metrics)
    batch = to_global_arrays(local, self.setup.mesh, self.setup.rules)
    if self._step is None:
      self._step = self.setup.jit(self.state_sh, {k: v.sharding for k, v in batch.items()})
    return self._step(state, batch)


@dataclasses.dataclass
class _MetricsWindow:
  """The metrics of the steps since the last logging step, summarized at the next one."""

  tokens_per_step: int
  flops: float
  peak: float
  rows: List[Dict[str, jax.Array]] = dataclasses.field(default_factory=list)
  start: float = dataclasses.field(default_factory=time.perf_counter)

  def summarize(self) -> Dict[str, float]:
    """The window's summary; a new window starts."""
    seconds = time.perf_counter() - self.start
    summary = _summarize(self.rows, seconds, self.tokens_per_step, self.flops, self.peak)
    self.rows, self.start = [], time.perf_counter()
    return summary


class _Run:
  """The training loop of a stage and what it does between the steps: progress
  reports, the non-finite check, metrics, checkpoints and the preemption exit."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    progress: Optional[Callable[[int, int, Dict[str, float]], None]],
    pipeline: InputPipeline,
    checkpointer: Checkpointer,
    writer: MetricsWriter,
    window: _MetricsWindow,
    pmap: bool,
  ) -> None:
    self.config, self.workdir, self.progress = config, workdir, progress
    self.pipeline, self.checkpointer, self.writer = pipeline, checkpointer, writer
    self.window, self.pmap = window, pmap
    self.num_steps = config.train.num_steps
    self.report = periodic_actions.ReportProgress(
      num_train_steps=self.num_steps, writer=None, every_steps=config.train.log_every
    )
    self.profile = _profiler(config, workdir)
    self.last: Dict[str, float] = {}

  def loop(self, run_step: _StepRunner, state: TrainState, step0: int) -> TrainState:
    """Trains from `step0` to the last step; returns the final (host) state."""
    state = run_step.place(state)
    with run_step.context():
      # the streak's counters live on the devices like the metrics it counts
      self.streak = NonFiniteStreak(self.config.train.max_consecutive_nonfinite)
      self.window.start = time.perf_counter()
      with _Preemption() as preemption:
        for step in range(step0, self.num_steps):
          state = self._step(run_step, state, step)
          self._after_step(step + 1, state, preemption)
    final = unreplicate(state) if self.pmap else state
    self.checkpointer.close()
    self.writer.close()
    return final

  def _step(self, run_step: _StepRunner, state: TrainState, step: int) -> TrainState:
    local = next(self.pipeline)
    # Between the steps where the host reads metrics, nothing comes back from the device
    # (a read would make the host wait for each step before dispatching the next); on an
    # accelerator, a read that creeps in here is logged.
    with jax.transfer_guard_device_to_host("log"):
      state, metrics = run_step(state, local)
      self.window.rows.append(metrics)
      self.streak.update(metrics["nonfinite"], step + 1)
    return state

  def _after_step(self, done: int, state: TrainState, preemption: _Preemption) -> None:
    self.report(done)
    if self.profile is not None:
      self.profile(done)
    last_step = done == self.num_steps
    logging_step = done % self.config.train.log_every == 0 or last_step
    if logging_step or self.checkpointer.should_save(done) or last_step:
      self._check_finite(done)
    if logging_step:
      self.last = self.window.summarize()
      self.writer.write_scalars(done, self.last)
      if self.progress is not None:
        self.progress(done, self.num_steps, self.last)
    self._save(done, state, preemption, last_step)

  def _check_finite(self, done: int) -> None:
    try:
      self.streak.check(done, self.checkpointer.directory)
    except NonFiniteError:
      self.checkpointer.close()
      self.writer.close()  # the rows up to the divergence, buffered ones included
      raise

  def _save(self, done: int, state: TrainState, preemption: _Preemption, last_step: bool) -> None:
    """The step's checkpoint when one is due; on a preemption a forced one, then
    `Preempted`."""
    preempted = preemption.reached(done)
    if not (preempted or last_step or self.checkpointer.should_save(done)):
      return  # nothing to save: the state stays on the devices, the pipeline unread
    self.writer.flush()  # rows stored before the checkpoint that covers them
    host_state = unreplicate(state) if self.pmap else state
    if preempted:
      self.checkpointer.save(done, host_state, self.pipeline.get_state(), force=True)
      self.checkpointer.close()
      self.writer.close()
      logging.warning("preempted at step %d: checkpoint saved", done)
      assert preemption.signum is not None  # reached() is True only once a signal is set
      raise Preempted(done, preemption.signum, self.workdir)
    self.checkpointer.save(done, host_state, self.pipeline.get_state(), force=last_step)


def _restore(
  checkpointer: Checkpointer,
  state: TrainState,
  state_sh: TrainState,
  pipeline: InputPipeline,
  saved_steps: List[int],
) -> Tuple[int, TrainState]:
  """(first step, state): the newest checkpoint's, with the pipeline's position, or (0,
  `state`) on a first start. Checkpoints that exist but none of which restores stop the
  run rather than train over them."""
  restored = checkpointer.restore(abstract_with_shardings(jax.eval_shape(lambda: state), state_sh))
  if restored is None and saved_steps:
    checkpointer.close()
    raise RuntimeError(
      f"{checkpointer.directory}: checkpoints of steps {saved_steps} exist but none "
      f"restores (see the warnings above); refusing to start over them"
    )
  if restored is None:
    return 0, state
  step0, state, data_state = restored
  pipeline.set_state(data_state)
  logging.info("resumed from step %d", step0)
  return step0, state


def _profiler(
  config: ml_collections.ConfigDict, workdir: str
) -> Optional[periodic_actions.Profile]:
  """The profiler trace of `train.profile_steps` (first, last), or None."""
  if not config.train.profile_steps:
    return None
  first, last = config.train.profile_steps
  return periodic_actions.Profile(
    first_profile=first,
    profile_duration_ms=None,
    num_profile_steps=last - first,
    logdir=paths.join(workdir, "profile"),
  )


def _write_export(
  config: ml_collections.ConfigDict,
  workdir: str,
  cfg: DecoderConfig,
  params: Any,
  tok: ClaraTokenizer,
) -> None:
  """`export/`: the parameters, and (process 0) the tokenizer and the CLaRa lengths and
  settings that `ClaraModel.load` reads."""
  cclara = clara_config(config)
  save_params(paths.join(workdir, "export"), cfg, params)
  if jax.process_index() != 0:
    return
  tok.save(paths.join(workdir, "export", tok.FILENAME))
  paths.write_json(
    paths.join(workdir, "export", CLARA_FILE),
    {
      "doc_max_length": cclara.doc_max_length,
      "compr_rate": cclara.compr_rate,
      "k": cclara.k,
      "question_max_length": config.data.question_max_length,
      "temperature": cclara.temperature,
      "stage": config.stage,
      "prompt_style": config.data.prompt_style,
      "memory_scale": cclara.memory_scale,
    },
    indent=2,
  )


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _flat_hparams(config: ml_collections.ConfigDict) -> Dict:
  out = {}

  def walk(prefix: str, node: Any) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if hasattr(value, "items"):
        walk(name + ".", value)
      elif isinstance(value, (int, float, str, bool)):
        out[name] = value

  walk("", config)
  return out


def _tokens_per_step(
  config: ml_collections.ConfigDict, cclara: ClaraConfig, cached: bool = False
) -> int:
  d, b = config.data, config.train.global_batch
  if config.stage == "lm":
    return b * d.lm_length
  doc = packing.encoder_length(cclara.doc_max_length, cclara.n_mem)
  docs = {"stage1": 1, "stage1_2": cclara.k}.get(config.stage, 0 if cached else d.candidates)
  q = (
    packing.encoder_length(d.question_max_length, cclara.n_mem)
    if config.stage.startswith("stage2")
    else 0
  )
  return b * (docs * doc + q + d.prompt_length + d.answer_length)


def _summarize(
  window: List[Dict[str, jax.Array]],
  seconds: float,
  tokens_per_step: int,
  flops: float,
  peak: float,
) -> Dict[str, float]:
  """Means of the window's metrics (sums for counters) plus throughput."""
  host = jax.device_get(window)
  out = {}
  for key in host[0]:
    values = np.asarray([m[key] for m in host], np.float64)
    out[key] = float(values.sum() if key.startswith(("truncated_", "nonfinite")) else values.mean())
  steps_per_s = len(window) / max(seconds, 1e-9)
  out["steps_per_s"] = steps_per_s
  out["tokens_per_s"] = steps_per_s * tokens_per_step
  out["mfu"] = steps_per_s * flops / peak
  return out
