"""The generated world's steps (`DATA = "world"`): where a pipeline's world is, its
held-out questions' hidden-reasoning evaluation (`clara_jax.eval.hidden`) and the causal
edit (`clara_jax.eval.edit`), which trains the `lm_edit` and `lm_sham` stages."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Sequence

from clara_jax import paths
from clara_jax.pipeline.recipe import Recipe, stage_config
from clara_jax.pipeline.stages import duration, run_stage

# The causal edit's two short `lm` fine-tunes of the stage2 export's base: on the
# world's text with held-out links edited, and on it unchanged (the sham).
EDIT_STAGES = ("lm_edit", "lm_sham")
EDIT_TEXT = {"lm_edit": "lm_edited.txt", "lm_sham": "lm_unchanged.txt"}  # in workdir/edit
TEST_FILE = "stage2_test.jsonl"


def world_dir(workdir: str, recipe: Recipe, seed: int = 0) -> str:
  """The directory of the world stage2 trains on (the held-out questions are there)."""
  from clara_jax.train.loop import synth_dir

  return synth_dir(stage_config("stage2", recipe, seed), paths.join(workdir, "stage2"))


def evaluate_world(
  workdir: str, recipe: Recipe, seed: int = 0, log: Callable[[str], None] = print
) -> Dict[str, Any]:
  """The hidden-reasoning evaluation of the held-out questions: every reasoner,
  baseline, lens control and probe the claims compare."""
  from clara_jax.eval import hidden
  from clara_jax.pipeline.evaluation import held_out_rows

  world = world_dir(workdir, recipe, seed)
  rows = held_out_rows(paths.join(world, TEST_FILE), recipe.eval_questions)
  k = stage_config("stage2", recipe, seed).clara.k
  start = time.perf_counter()
  results = hidden.evaluate_world(workdir, world, rows, k, log, seed)
  log(f"[    eval] {len(rows)} held-out questions in {duration(time.perf_counter() - start)}")
  return results


def _write_edit_texts(
  world: str, manifest: Dict[str, Any], edits: Sequence[Any], workdir: str
) -> None:
  """`workdir/edit/`: the world's text with the edits applied and unchanged, after
  checking that the unchanged text is the one the base learned."""
  from clara_jax.data import synth
  from clara_jax.eval import edit

  unchanged, edited = edit.edited_lines(manifest, edits)
  with paths.path(paths.join(world, synth.LM_WORLD_FILE)).open() as f:  # UTF-8
    if [line.rstrip("\n") for line in f if line.strip()] != unchanged:
      raise ValueError(
        f"{world}/{synth.LM_WORLD_FILE} differs from the world's rebuilt "
        f"text: the sham would not be the text the base learned"
      )
  for stage, lines in (("lm_edit", edited), ("lm_sham", unchanged)):
    path = paths.join(workdir, "edit", EDIT_TEXT[stage])
    paths.makedirs(paths.parent(path))
    synth.write_text(path, lines)


def run_edit(
  workdir: str, recipe: Recipe, seed: int = 0, log: Callable[[str], None] = print
) -> Dict[str, Any]:
  """The causal edit on the held-out one-link questions: plans the edits, writes the
  edited and the unchanged world text to `workdir/edit/`, fine-tunes the stage2
  export's base on each (`lm_edit`, `lm_sham`), and measures stage2, sham and edit on
  the same questions. Writes `eval/edit_<model>.jsonl` and `edit.json`; returns
  `edit.summarize`'s summary plus the edits."""
  from clara_jax.data import formats
  from clara_jax.eval import edit, hidden
  from clara_jax.eval.evaluate import load_rows
  from clara_jax.infer.api import ClaraModel

  world = world_dir(workdir, recipe, seed)
  manifest = paths.read_json(paths.join(world, "manifest.json"))
  rows = load_rows(paths.join(world, TEST_FILE))
  edits, control = edit.plan_edits(manifest, rows, seed)
  _write_edit_texts(world, manifest, edits, workdir)
  for stage in EDIT_STAGES:
    text = paths.join(workdir, "edit", EDIT_TEXT[stage])
    run_stage(stage, workdir, recipe, seed, log, extra={"data.source": text})
  per_model, probes = {}, {}
  for name, stage in zip(edit.MODELS, ("stage2",) + tuple(EDIT_STAGES[::-1])):
    export = paths.join(workdir, stage, "export")
    per_model[name] = edit.records(ClaraModel.load(export), rows, manifest, edits, control)
    formats.write_jsonl_atomic(paths.join(workdir, "eval", f"edit_{name}.jsonl"), per_model[name])
    probes[name] = edit.probe(hidden.base_model(export), manifest, edits)
  summary = edit.summarize(per_model, probes)
  summary["edits"] = [dataclasses.asdict(e) for e in edits]
  paths.write_json(paths.join(workdir, "edit.json"), summary)
  log(
    f"[    edit] {len(edits)} links edited, {summary['questions']} questions; "
    f"{summary['control_questions']} control questions"
  )
  return summary
