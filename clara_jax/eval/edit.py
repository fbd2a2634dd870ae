"""The causal test of hidden reasoning: change what the base knows, keep every adapter.

If the stage2 reasoner finds T's document for "In which city is the team of X based?"
because the base knows that X plays for T, then teaching the base that X plays for T'
instead must move the question's top-1 to T''s document. A mapping learned from the
question's words to a document would not move: the question and every adapter stay as
they were; only the base's knowledge of one link changes.

The experiment, on the held-out (unseen) one-link questions of a generated world:

* `plan_edits`: the questions' links (person, link) are split in two, seeded: one half
  is edited, the other half is the locality control. Each edited link gets a new target
  of the old one's kind, drawn from the candidates that every question on the link
  shares, so the new document is always a candidate.
* `edited_lines`: the world's own LM text (`synth.world_lm_lines`) with each edited
  link's sentences naming the new target, every other line unchanged.
* Two short `lm` fine-tunes of the stage2 export's base, same steps, rate and seed: one
  on the edited text ("edit") and one on the unchanged text ("sham": what the
  fine-tune alone does to retrieval). Adapters stay as stage2 trained them.
* `records`: per question and model (stage2 as trained, sham, edit), whether the
  reasoner's top-1 is the new target's document or the old one's, the score margin
  between them, and the lens's rank AUC of the new target's name pieces against the old
  one's; `probe`: whether the base ranks the new target first for the edited link.

`summarize` gives every share with a bootstrap interval that resamples edited links
(questions on one link share one cause) and the paired edit-minus-sham differences;
`claims` is the demo's row: at least half of the edited questions' top-1 on the new
document, and above the sham; beside it, whether the edit also pulls the control
questions toward the new targets (a change of the documents, not of the knowledge).
"""

from __future__ import annotations

import dataclasses
import random
import types
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from clara_jax.eval import stats
from clara_jax.eval.probe import Link, chain_links, probe_links
from clara_jax.eval.stats import (
  ClaimRow,
  above_zero,
  format_ci,
  format_difference,
  format_value,
  reported,
)

if TYPE_CHECKING:
  from clara_jax.data import synth
  from clara_jax.data.tokenizer import ClaraTokenizer
  from clara_jax.infer.api import ClaraModel
  from clara_jax.model.decoder import Decoder

EDIT_SHARE = 0.5  # share of the held-out links edited; the rest is the locality control
MODELS = ("stage2", "sham", "edit")  # stage2 as trained, then the two fine-tunes
TARGET_MOVED = 0.5  # the issue's target: half of the edited questions' top-1 moves


@dataclasses.dataclass(frozen=True)
class Edit:
  """One edited link: `person`'s `link` goes from entity `old` to entity `new`;
  `questions`: the ids of the evaluated questions that ask through it."""

  person: str
  link: str
  old: str
  new: str
  questions: Tuple[str, ...]


def _link_of(manifest: Mapping, row: Mapping) -> Optional[Link]:
  links = chain_links(manifest["questions"].get(row["id"], {}))
  return links[0] if len(links) == 1 else None


def plan_edits(
  manifest: Mapping, rows: Sequence[Mapping], seed: int = 0, share: float = EDIT_SHARE
) -> Tuple[List[Edit], List[str]]:
  """(edits, control question ids) over the unseen one-link `rows` (stage2 rows of the
  generated world, with `id`, `kind`, `seen`, `doc_ids`, `pos_index`).

  A link is edited or kept whole (all its questions on one side). An edited link's new
  target is drawn from the non-gold candidates of its kind common to all its questions;
  when they share none, from its first question's, and the questions lacking that
  document are left out of both sides."""
  by_link: Dict[Link, List[Mapping]] = {}
  for row in rows:
    if row.get("kind") != "one_link" or row.get("seen"):
      continue
    link = _link_of(manifest, row)
    if link is not None:
      by_link.setdefault(link, []).append(row)
  rng = random.Random(f"clara-edit:{seed}")
  links = sorted(by_link)
  rng.shuffle(links)
  n_edit = int(round(share * len(links)))
  docs = manifest["documents"]
  edits: List[Edit] = []
  control: List[str] = []
  for i, link in enumerate(links):
    group = by_link[link]
    if i >= n_edit:
      control.extend(r["id"] for r in group)
      continue
    person, name, old = link
    options = [
      set(d for d in r["doc_ids"] if d != old and docs[d]["kind"] == docs[old]["kind"])
      for r in group
    ]
    common = sorted(set.intersection(*options)) or sorted(options[0])
    if not common:
      continue
    new = rng.choice(common)
    asked = tuple(r["id"] for r in group if new in r["doc_ids"])
    edits.append(Edit(person, name, old, new, asked))
  return edits, control


def rebuild_world(manifest: Mapping) -> synth.World:
  """The `synth.World` a manifest was written from (generation is deterministic);
  raises if the rebuilt documents differ from the manifest's."""
  from clara_jax.data import synth

  world = synth.make_world(
    manifest["seed"],
    manifest["size"],
    max_facts=manifest["max_facts"],
    names=manifest["names"],
    world=synth.WorldOptions(**manifest["world"]),
  )
  rebuilt = {e.id: {"kind": e.kind, "name": e.name} for e in world.docs()}
  if rebuilt != manifest["documents"]:
    raise ValueError(
      "the manifest's world does not rebuild from its settings (written by "
      "another version of clara_jax.data.synth?)"
    )
  return world


def edited_lines(
  manifest: Mapping, edits: Sequence[Edit], wordings: int = 3
) -> Tuple[List[str], List[str]]:
  """(unchanged, edited) LM lines of the world: `synth.world_lm_lines` before and after
  pointing each edit's link at its new target. Rendering draws the same random numbers
  either way, so the lines differ only where an edited person states an edited link."""
  from clara_jax.data import synth

  world = rebuild_world(manifest)
  before = synth.world_lm_lines(world, wordings)
  for e in edits:
    person = world.entities[e.person]
    if person.links.get(e.link) != e.old:
      raise ValueError(
        f"edit {e}: {e.person}'s {e.link} is {person.links.get(e.link)!r}, not {e.old!r}"
      )
    person.links[e.link] = e.new
    person.facts[e.link] = world.entities[e.new].name
  after = synth.world_lm_lines(world, wordings)
  if len(before) != len(after):
    raise AssertionError("edited rendering changed the number of LM lines")
  return before, after


def _name_pieces(tok: ClaraTokenizer, manifest: Mapping, entity: str) -> set:
  from clara_jax.eval.lens import word_pieces

  return word_pieces(tok, manifest["documents"][entity]["name"].split())


def records(
  model: ClaraModel,
  rows: Sequence[Mapping],
  manifest: Mapping,
  edits: Sequence[Edit],
  control: Sequence[str],
  batch: int = 16,
) -> List[Dict[str, Any]]:
  """Per evaluated question (edited or control): `group`, `link` (the cluster),
  `top1_new` / `top1_old` (the reasoner's first choice is the new / old target's
  document; control questions have no new target of their own: `top1_old`, and
  `top1_new_elsewhere`, whether their top-1 is any edit's new target, None when none is
  among their candidates), `margin` (score of
  the new minus the old document) and `lens_auc` (rank AUC of the new target's name
  pieces over the old one's under the reasoner's lens; pieces both names share left
  out)."""
  from clara_jax.model.decoder import Decoder

  new_of = {q: e for e in edits for q in e.questions}
  new_targets = {e.new for e in edits}
  wanted = set(new_of) | set(control)
  picked = [r for r in rows if r["id"] in wanted]
  decoder = Decoder(model.cfg)
  out = []
  for start in range(0, len(picked), batch):
    chunk = picked[start : start + batch]
    order, scores, lens_scores = _retrieval_and_lens(model, decoder, chunk)
    for i, row in enumerate(chunk):
      top = row["doc_ids"][int(order[i, 0])]
      edit = new_of.get(row["id"])
      rec = _choice_record(manifest, row, top, edit)
      if edit is None:
        # Specificity: does the edit pull questions that are not about X toward the new
        # targets too (their documents' memories changed, or the names grew frequent)?
        offered = new_targets & set(row["doc_ids"])
        rec["top1_new_elsewhere"] = float(top in offered) if offered else None
      else:
        rec.update(
          _moved_measures(model.tok, manifest, rec, row["doc_ids"], scores[i], lens_scores[i])
        )
      out.append(rec)
  return out


def _retrieval_and_lens(
  model: ClaraModel, decoder: Decoder, chunk: Sequence[Mapping]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(the reasoner's top-1 [B, 1], its scores of every candidate [B, D], the lens's best
  log-probability of every vocabulary piece [B, vocab]) of a chunk of rows."""
  from clara_jax.eval.evaluate import candidate_memories
  from clara_jax.eval.lens import lens_decode

  questions = [r["question"] for r in chunk]
  order, scores = model.retrieve(questions, candidate_memories(model, chunk), 1)
  _, lens_scores = lens_decode(model.params, decoder, model.reason(questions), top_t=1)
  return order, scores, lens_scores


def _choice_record(
  manifest: Mapping, row: Mapping, top: str, edit: Optional[Edit]
) -> Dict[str, Any]:
  """The question's labels, its top-1 and its old and new targets (`top1_old`)."""
  old = row["doc_ids"][row["pos_index"][0]]
  link = _link_of(manifest, row)
  assert link is not None  # picked rows are planned ones: one link each (`plan_edits`)
  return {
    "id": row["id"],
    "group": "edited" if edit else "control",
    "link": "/".join(link),
    "top1": top,
    "old": old,
    "new": edit.new if edit else None,
    "top1_old": float(top == old),
  }


def _moved_measures(
  tok: ClaraTokenizer,
  manifest: Mapping,
  rec: Mapping,
  ids: Sequence[str],
  scores_d: np.ndarray,
  lens_v: np.ndarray,
) -> Dict[str, Any]:
  """An edited question's `top1_new`, `margin` (from the scores [D] of its candidates
  `ids`) and `lens_auc` (from the lens's scores [vocab]), given its `_choice_record`."""
  from clara_jax.eval.lens import rank_auc

  new, old = rec["new"], rec["old"]
  new_pieces = _name_pieces(tok, manifest, new)
  old_pieces = _name_pieces(tok, manifest, old)
  return {
    "top1_new": float(rec["top1"] == new),
    "margin": float(scores_d[ids.index(new)] - scores_d[ids.index(old)]),
    "lens_auc": rank_auc(lens_v, new_pieces - old_pieces, old_pieces - new_pieces),
  }


PROBED_ADAPTERS = ("reasoner", "generator")  # beside the base (no adapter)


def probe(base: types.SimpleNamespace, manifest: Mapping, edits: Sequence[Edit]) -> Dict[str, Any]:
  """Share of edited links for which the base (closed book) ranks the new target first
  (`new_known`) and still ranks the old one first (`old_known`); the same with each
  PROBED_ADAPTERS adapter active (`<adapter>_new_known`, `<adapter>_old_known`): where
  the adapted model still says the old link, the association lives in the adapters."""
  if not edits:
    return {"new_known": None, "old_known": None, "links": 0}
  out: Dict[str, Any] = {"links": len(edits)}
  for adapter in (None,) + PROBED_ADAPTERS:
    prefix = f"{adapter}_" if adapter else ""
    for side in ("new", "old"):
      known = probe_links(
        base, manifest, [(e.person, e.link, getattr(e, side)) for e in edits], adapter=adapter
      )
      out[f"{prefix}{side}_known"] = float(np.mean(list(known.values())))
  return out


MEASURES = ("top1_new", "top1_old", "margin", "lens_auc")


def summarize(
  per_model: Mapping[str, Sequence[Mapping]], probes: Optional[Mapping[str, Mapping]] = None
) -> Dict[str, Any]:
  """{"edited": {model: {measure: ci}}, "control": {model: {"top1_old",
  "top1_new_elsewhere": ci}}, "control:edit-sham": {those two: paired ci},
  "edit-sham" / "edit-stage2": {measure: paired ci}, "questions", "links", "probe"}.
  Intervals resample links (a link's questions share its edit). Records of every model
  come in the same question order."""
  out: Dict[str, Any] = {"probe": dict(probes or {})}
  for group, measures in (("edited", MEASURES), ("control", ("top1_old", "top1_new_elsewhere"))):
    out[group] = {}
    for name, recs in per_model.items():
      mine = [r for r in recs if r["group"] == group]
      links = [r["link"] for r in mine]
      out[group][name] = {
        m: stats.bootstrap_ci([r.get(m) for r in mine], clusters=links) for m in measures
      }
  edited = {name: [r for r in recs if r["group"] == "edited"] for name, recs in per_model.items()}
  any_recs = next(iter(edited.values()), [])
  out["questions"] = len(any_recs)
  out["links"] = len({r["link"] for r in any_recs})
  out["control_questions"] = len(
    [r for r in next(iter(per_model.values()), []) if r["group"] == "control"]
  )
  control = {name: [r for r in recs if r["group"] == "control"] for name, recs in per_model.items()}
  if "edit" in control and "sham" in control:
    clusters = [r["link"] for r in control["edit"]]
    out["control:edit-sham"] = {
      m: stats.paired_difference(
        [r.get(m) for r in control["edit"]], [r.get(m) for r in control["sham"]], clusters=clusters
      )
      for m in ("top1_old", "top1_new_elsewhere")
    }
  if "edit" in edited:
    clusters = [r["link"] for r in edited["edit"]]
    for other in ("sham", "stage2"):
      if other in edited:
        out[f"edit-{other}"] = {
          m: stats.paired_difference(
            [r.get(m) for r in edited["edit"]], [r.get(m) for r in edited[other]], clusters=clusters
          )
          for m in MEASURES
        }
  return out


def claims(summary: Mapping[str, Any]) -> List[ClaimRow]:
  """The causal rows of the claims table: the moved share (target), its difference from
  the sham, the lens, the old document kept, the locality control and the probe."""
  if "edit" not in summary["edited"] or not summary["questions"]:
    return [reported("e. causal edit", "no edited questions")]
  return (
    _moved_claims(summary) + _locality_claims(summary) + _probe_claims(summary.get("probe", {}))
  )


def _moved_claims(summary: Mapping[str, Any]) -> List[ClaimRow]:
  """The edited questions' rows: top-1 on the new document (the target: TARGET_MOVED,
  and above the sham), then edit minus sham on each measure."""
  edited, diff = summary["edited"], summary.get("edit-sham", {})
  moved, vs_sham = edited["edit"]["top1_new"], diff.get("top1_new")
  n = f"n={summary['questions']} on {summary['links']} links"
  return [
    (
      "e. edit: top-1 on the new target's document",
      f"{format_ci(moved)} (sham {format_ci(edited['sham']['top1_new'])}, stage2 "
      f"{format_ci(edited['stage2']['top1_new'])}), {n}",
      f">= {TARGET_MOVED:g}, > sham",
      moved["mean"] >= TARGET_MOVED and vs_sham is not None and vs_sham["lo"] > 0,
    ),
    (
      "e. edit - sham: top-1 on the new document",
      format_difference(vs_sham),
      "diff > 0",
      above_zero(vs_sham),
    ),
    reported("e. edit - sham: top-1 on the old document", format_difference(diff.get("top1_old"))),
    reported("e. edit - sham: score margin new - old", format_difference(diff.get("margin"))),
    reported("e. edit - sham: lens AUC new vs old name", format_difference(diff.get("lens_auc"))),
  ]


def _locality_claims(summary: Mapping[str, Any]) -> List[ClaimRow]:
  """The unedited links' rows (reported): edit minus sham on their gold and on any
  edit's new target; none without the edit's control records."""
  control, cdiff = summary["control"], summary.get("control:edit-sham", {})
  if "edit" not in control or control["edit"]["top1_old"] is None:
    return []
  rows: List[ClaimRow] = [
    reported(
      "e. unedited links, edit - sham: top-1 on their gold",
      f"{format_difference(cdiff.get('top1_old'))} (edit {format_ci(control['edit']['top1_old'])})"
      f", n={summary['control_questions']}",
    )
  ]
  elsewhere = cdiff.get("top1_new_elsewhere")
  if elsewhere is not None:
    rows.append(
      reported(
        "e. unedited links, edit - sham: top-1 on an edit's new target",
        f"{format_difference(elsewhere)} (edit "
        f"{format_ci(control['edit']['top1_new_elsewhere'])}), n={elsewhere['n']}",
      )
    )
  return rows


def _probe_claims(probes: Mapping[str, Mapping]) -> List[ClaimRow]:
  """Closed-book rows (reported): the share of edited links whose new / old target the
  edit and sham models know, for the base and each PROBED_ADAPTERS adapter probed."""
  known = lambda model, key: format_value(probes.get(model, {}).get(key))
  rows: List[ClaimRow] = []
  for adapter in ("",) + PROBED_ADAPTERS:
    prefix, who = (f"{adapter}_", f"with the {adapter}") if adapter else ("", "base")
    if not any(f"{prefix}new_known" in p for p in probes.values()):
      continue
    rows.append(
      reported(
        f"e. closed book, {who}: new link / old link known",
        f"edit {known('edit', prefix + 'new_known')} / "
        f"{known('edit', prefix + 'old_known')}, sham "
        f"{known('sham', prefix + 'new_known')} / "
        f"{known('sham', prefix + 'old_known')}",
      )
    )
  return rows
