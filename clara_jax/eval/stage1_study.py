"""Stage1 on a pretrained base, studied on training documents only: does the compressor
keep documents apart, and does the generator read what it wrote?

The rows are the real-data plan's stage1 pool (`clara_jax.pipeline.real_data.prepare_data`); `dev_rows` of
its documents, drawn with a seeded permutation, are set aside (no row of theirs is
trained on), so a recipe is chosen here without touching the held-out questions. Each
variant trains stage1 from the imported base with its overrides of
configs/recipes/real_pretrained, then on the dev rows:

* memory gain: the CE of the stage1 answer (the row's QA pairs) from the memories of
  another dev document minus that from the row's own document's memories, per row, with
  a bootstrap interval (nats per answer token); the same for a restatement of each dev
  document (`real_data.restatement_rows`: the target is the document's first tokens);
* memory cosine: the mean cosine between different documents' flattened memories (1
  when the compressor writes one memory for every document);
* the share of the memories' variance off their mean.

Usage:
  python -m clara_jax.eval.stage1_study --data_dir DIR --workdir DIR \\
      --variant scaled_lr3e-3 --steps 80
Writes `WORKDIR/study.json` (and trains in `WORKDIR/stage1`, resumable).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
  import jax
  import ml_collections

  from clara_jax.pipeline.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class Variant:
  """A stage1 variant: overrides of the pretrained recipe's stage1 config, and whether the
  training rows gain one restatement row per document (`real_data.restatement_rows`;
  None: as the recipe's data plan has it)."""

  overrides: Dict[str, Any]
  restate: Optional[bool] = False


# Every variant but `recipe` names all of its compression settings, so that it keeps its
# meaning when the recipe's own (configs/recipes/real_pretrained's `STAGE1_SETTINGS`) change; `paper` is the
# paper's: final states as memories, MSE alignment 0.1.
_PAPER = {
  "clara.memory_scale": "none",
  "clara.mse_weight": 0.1,
  "clara.lexical_weight": 0.0,
  "optimizer.lr": 1e-3,
}
_SCALED = {**_PAPER, "clara.memory_scale": "embedding", "clara.mse_weight": 0.0}
_LEXICAL = {**_SCALED, "optimizer.lr": 3e-3, "clara.lexical_weight": 1.0}
VARIANTS: Dict[str, Variant] = {
  "recipe": Variant({}, restate=None),
  "paper": Variant(_PAPER),
  "scaled": Variant(_SCALED),
  "scaled_lr3e-3": Variant({**_SCALED, "optimizer.lr": 3e-3}),
  "no_mse_lr3e-3": Variant({**_PAPER, "clara.mse_weight": 0.0, "optimizer.lr": 3e-3}),
  "restate": Variant({**_SCALED, "optimizer.lr": 3e-3}, restate=True),
  "lexical": Variant(_LEXICAL),
  "restate_lexical": Variant(_LEXICAL, restate=True),
}
DEV_ROWS = 96


def split_pool(docs: Sequence[str], dev_rows: int, seed: int = 0) -> Tuple[List[int], List[int]]:
  """(training row indices in file order, dev row indices) of rows whose documents are
  `docs` [R]: `dev_rows` distinct documents drawn with a seeded permutation, one row each
  (its first); no row of a dev document is trained on (a document may recur in rows with
  other questions)."""
  unique = list(dict.fromkeys(docs))
  if not 0 < dev_rows < len(unique):
    raise ValueError(
      f"dev_rows must be in [1, {len(unique) - 1}] for a pool of "
      f"{len(unique)} distinct documents, got {dev_rows}"
    )
  order = np.random.default_rng(seed).permutation(len(unique))
  held = [unique[i] for i in order[-dev_rows:]]
  first: Dict[str, int] = {}
  for i, doc in enumerate(docs):
    first.setdefault(doc, i)
  held_set = set(held)
  return [i for i, doc in enumerate(docs) if doc not in held_set], [first[d] for d in held]


def memory_spread(memories_rmd: np.ndarray) -> Dict[str, float]:
  """{"memory_cosine", "variance_off_mean"} of memories [R, n_mem, D], R >= 2."""
  flat = memories_rmd.reshape(len(memories_rmd), -1).astype(np.float64)
  unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
  m = len(flat)
  cosine = ((unit @ unit.T).sum() - m) / (m * (m - 1))
  off_mean = ((flat - flat.mean(0)) ** 2).sum() / (flat**2).sum()
  return {"memory_cosine": float(cosine), "variance_off_mean": float(off_mean)}


def dev_losses(
  export_dir: str, examples: Dict[str, np.ndarray], n_mem: int, memory_scale: str, batch: int = 8
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(CE per row from its own document's memories [R], from the next row's document's
  [R], the memories [R, n_mem, D]) of stage1 examples (`Featurizer` arrays, R rows)."""
  import jax
  import jax.numpy as jnp

  from clara_jax.model import clara
  from clara_jax.model.decoder import Decoder
  from clara_jax.weights.export import load_params

  cfg, params = load_params(export_dir)
  model = Decoder(cfg)
  compress = jax.jit(lambda p, t, m: clara.memories(model, p, t, m, n_mem, clara.COMPRESSOR))

  @jax.jit
  def per_row(
    p: Any,
    tokens: jax.Array,
    mask: jax.Array,
    slots: jax.Array,
    mem: jax.Array,
    answer_mask: jax.Array,
  ) -> jax.Array:
    one = lambda t, m, s, mm, a: clara.generator_loss(
      model, p, t[None], m[None], s[None], mm[None, None], a[None], memory_scale=memory_scale
    )[0]
    return jax.vmap(one)(tokens, mask, slots, mem, answer_mask)

  rows = len(examples["gen_tokens"])
  spans = [slice(i, min(i + batch, rows)) for i in range(0, rows, batch)]
  mem = np.concatenate(
    [
      np.asarray(compress(params, examples["doc_tokens"][s], examples["doc_mask"][s]))
      for s in spans
    ]
  )
  other = np.roll(mem, -1, axis=0)

  def losses(memories: np.ndarray) -> np.ndarray:
    return np.concatenate(
      [
        np.asarray(
          per_row(
            params,
            examples["gen_tokens"][s],
            examples["gen_mask"][s],
            examples["slot_positions"][s],
            jnp.asarray(memories[s]),
            examples["answer_mask"][s],
          )
        )
        for s in spans
      ]
    )

  return losses(mem), losses(other), mem


def summarize(
  own: np.ndarray, other: np.ndarray, memories: np.ndarray, is_qa: np.ndarray, seed: int = 0
) -> Dict[str, Any]:
  """The dev record of per-row CEs [R] from own / another document's memories and the
  memories [R, n_mem, D]: the QA rows' memory gain (the headline, with its bootstrap
  interval), the restatement rows' (`memory_gain_restate`), and the spread of the QA
  rows' memories (one row per dev document)."""
  from clara_jax.eval import stats

  gain = other - own
  out = {
    "rows": int(is_qa.sum()),
    "ce_own": float(own[is_qa].mean()),
    "ce_other": float(other[is_qa].mean()),
    "memory_gain": stats.bootstrap_ci(gain[is_qa].tolist(), seed=seed),
    **memory_spread(memories[is_qa]),
  }
  if (~is_qa).any():
    out["memory_gain_restate"] = stats.bootstrap_ci(gain[~is_qa].tolist(), seed=seed)
  return out


def run(
  data_dir: str,
  workdir: str,
  variant: str,
  steps: int,
  base: str = "smollm2",
  dev_rows: int = DEV_ROWS,
  seed: int = 0,
  quick: bool = False,
  log: Callable[[str], None] = print,
) -> Dict[str, Any]:
  """Prepares the data and base (as `real-data --base` does), trains the variant's stage1
  on the pool minus the dev rows, measures it on them; returns and writes the record."""
  from clara_jax import paths
  from clara_jax.pipeline import real_data
  from clara_jax.pipeline.stages import run_stage

  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
  workdir = str(paths.path(workdir))
  recipe, restate_stage1 = _prepared_recipe(data_dir, workdir, base, quick, seed, log)
  rows = real_data.read_jsonl(paths.join(real_data.data_dirs(workdir)["stage1"], "train.jsonl"))
  train_idx, dev_idx = split_pool([r["docs"][0] for r in rows], dev_rows, seed)
  spec = VARIANTS[variant]
  restate = restate_stage1 if spec.restate is None else spec.restate
  source = _training_source(workdir, [rows[i] for i in train_idx], restate)
  recipe = _variant_recipe(
    recipe, {"train.num_steps": steps, "data.source": source, **spec.overrides}
  )
  metrics = run_stage("stage1", workdir, recipe, seed, log)
  record: Dict[str, Any] = {
    "variant": variant,
    "overrides": spec.overrides,
    "restate": restate,
    "steps": steps,
    "seed": seed,
    "base": base,
    "train_rows": len(real_data.read_jsonl(paths.join(source, "train.jsonl"))),
    "dev": _dev_record(workdir, recipe, [rows[i] for i in dev_idx], seed),
    "last_train_metrics": metrics,
  }
  paths.write_json(paths.join(workdir, "study.json"), record)
  log(_summary_line(record, len(dev_idx)))
  return record


def _prepared_recipe(
  data_dir: str, workdir: str, base: str, quick: bool, seed: int, log: Callable[[str], None]
) -> Tuple[Recipe, bool]:
  """(the pretrained recipe fitted to the prepared data and imported base, whether the
  recipe's data plan restates stage1's documents): the pipeline's preparation of
  configs/recipes/real_pretrained, on the plan's stage1 rows without restatements (each
  variant says its own)."""
  from clara_jax.pipeline import real_data
  from clara_jax.pipeline import recipe as recipe_lib
  from clara_jax.pipeline.run import prepare

  recipe = recipe_lib.load("real_pretrained", quick)
  recipe_plan = real_data.data_plan(recipe, seed)
  plan = dataclasses.replace(recipe_plan, restate_stage1=False)
  prepared = prepare(recipe, workdir, seed, data_dir, base, log, plan=plan)
  return prepared.recipe, recipe_plan.restate_stage1


def _training_source(workdir: str, train_rows: List[Dict], restate: bool) -> str:
  """The folder of the variant's training rows (with a restatement per document when
  `restate`), written once and reused by every variant that reads the same."""
  from clara_jax import paths
  from clara_jax.data import formats
  from clara_jax.pipeline import real_data

  source = paths.join(workdir, "study_data_restate" if restate else "study_data")
  if not paths.exists(paths.join(source, "train.jsonl")):
    if restate:
      train_rows = train_rows + real_data.restatement_rows(train_rows)
    formats.write_jsonl_atomic(paths.join(source, "train.jsonl"), train_rows)
  return source


def _variant_recipe(recipe: Recipe, overrides: Dict[str, Any]) -> Recipe:
  """The recipe with stage1's config updated by `overrides`."""
  from clara_jax.pipeline import recipe as recipe_lib

  return recipe_lib.with_overrides(recipe, {}, {"stage1": overrides})


def _dev_record(workdir: str, recipe: Recipe, dev_rows: List[Dict], seed: int) -> Dict[str, Any]:
  """`summarize` of the trained stage1 export on the dev rows and their restatements."""
  from clara_jax import paths
  from clara_jax.pipeline import real_data
  from clara_jax.pipeline import recipe as recipe_lib

  config = recipe_lib.stage_config("stage1", recipe, seed)
  n_mem = config.clara.doc_max_length // config.clara.compr_rate
  export = paths.join(workdir, "stage1", "export")
  # Each dev document is read twice: its QA row, and a restatement of it (is the
  # document itself in the memories, whatever its questions ask?).
  dev_data = dev_rows + real_data.restatement_rows(dev_rows)
  arrays = _dev_arrays(config, export, n_mem, dev_data, seed)
  own, other, memories = dev_losses(export, arrays, n_mem, config.clara.memory_scale)
  is_qa = np.array([row["data_type"] == "qa" for row in dev_data])
  return summarize(own, other, memories, is_qa, seed)


def _dev_arrays(
  config: ml_collections.ConfigDict, export: str, n_mem: int, dev_data: List[Dict], seed: int
) -> Dict[str, np.ndarray]:
  """The stage1 features of the dev rows, stacked (`dev_losses`' input)."""
  from clara_jax.data.features import FeatureConfig, Featurizer
  from clara_jax.data.tokenizer import load_tokenizer

  tok = load_tokenizer(export, config.tokenizer.num_mem_tokens)
  featurize = Featurizer(
    tok,
    FeatureConfig(
      stage="stage1",
      n_mem=n_mem,
      doc_max_length=config.clara.doc_max_length,
      prompt_length=config.data.prompt_length,
      answer_length=config.data.answer_length,
      prompt_style=config.data.prompt_style,
    ),
    seed=seed,
  )
  examples = [featurize(row, i) for i, row in enumerate(dev_data)]
  arrays = {
    k: np.stack([e[k] for e in examples])
    for k in ("doc_tokens", "doc_mask", "gen_tokens", "gen_mask", "slot_positions", "answer_mask")
  }
  arrays["doc_tokens"], arrays["doc_mask"] = arrays["doc_tokens"][:, 0], arrays["doc_mask"][:, 0]
  return arrays


def _summary_line(record: Dict[str, Any], dev_documents: int) -> str:
  gain, restate = record["dev"]["memory_gain"], record["dev"]["memory_gain_restate"]
  return (
    f"[   study] {record['variant']} at {record['steps']} steps, {dev_documents} dev "
    f"documents: memory gain {gain['mean']:+.3f} [{gain['lo']:+.3f}, {gain['hi']:+.3f}] "
    f"nats/token on their QA rows, {restate['mean']:+.3f} [{restate['lo']:+.3f}, "
    f"{restate['hi']:+.3f}] on restating them; memory cosine {record['dev']['memory_cosine']:.4f}"
  )


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--variant", required=True, choices=sorted(VARIANTS))
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--base", default="smollm2")
  parser.add_argument("--dev_rows", type=int, default=DEV_ROWS)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  run(args.data_dir, args.workdir, args.variant, args.steps, args.base, args.dev_rows, args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
