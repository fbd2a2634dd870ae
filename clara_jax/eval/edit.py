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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from clara_jax.eval import stats
from clara_jax.eval.probe import Link, chain_links, probe_links

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


def rebuild_world(manifest: Mapping):
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


def _name_pieces(tok, manifest: Mapping, entity: str) -> set:
  from clara_jax.eval.lens import word_pieces

  return word_pieces(tok, manifest["documents"][entity]["name"].split())


def records(
  model,
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
  from clara_jax.eval.lens import lens_decode, rank_auc
  from clara_jax.model.decoder import Decoder

  new_of = {q: e for e in edits for q in e.questions}
  new_targets = {e.new for e in edits}
  wanted = set(new_of) | set(control)
  picked = [r for r in rows if r["id"] in wanted]
  decoder = Decoder(model.cfg)
  out = []
  for start in range(0, len(picked), batch):
    chunk = picked[start : start + batch]
    doc_mem = model.compress_documents([d for r in chunk for d in r["docs"]])
    doc_mem = doc_mem.reshape(len(chunk), -1, model.n_mem, doc_mem.shape[-1])
    order, scores = model.retrieve([r["question"] for r in chunk], doc_mem, 1)
    _, lens_scores = lens_decode(
      model.params, decoder, model.reason([r["question"] for r in chunk]), top_t=1
    )
    for i, row in enumerate(chunk):
      ids = row["doc_ids"]
      old = ids[row["pos_index"][0]]
      top = ids[int(order[i, 0])]
      edit = new_of.get(row["id"])
      link = _link_of(manifest, row)
      assert link is not None  # picked rows are planned ones: one link each (`plan_edits`)
      rec: Dict[str, Any] = {
        "id": row["id"],
        "group": "edited" if edit else "control",
        "link": "/".join(link),
        "top1": top,
        "old": old,
        "new": edit.new if edit else None,
        "top1_old": float(top == old),
      }
      if edit is None:
        # Specificity: does the edit pull questions that are not about X toward the new
        # targets too (their documents' memories changed, or the names grew frequent)?
        offered = new_targets & set(ids)
        rec["top1_new_elsewhere"] = float(top in offered) if offered else None
      else:
        new_pieces = _name_pieces(model.tok, manifest, edit.new)
        old_pieces = _name_pieces(model.tok, manifest, old)
        rec.update(
          top1_new=float(top == edit.new),
          margin=float(scores[i, ids.index(edit.new)] - scores[i, ids.index(old)]),
          lens_auc=rank_auc(lens_scores[i], new_pieces - old_pieces, old_pieces - new_pieces),
        )
      out.append(rec)
  return out


PROBED_ADAPTERS = ("reasoner", "generator")  # beside the base (no adapter)


def probe(base, manifest: Mapping, edits: Sequence[Edit]) -> Dict[str, Any]:
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


def claims(summary: Mapping[str, Any]) -> List[Tuple[str, str, str, Optional[bool]]]:
  """The causal rows of the claims table: the moved share (target), its difference from
  the sham, the lens, the old document kept, the locality control and the probe."""
  fmt, sfmt = stats.format_ci, (lambda ci: stats.format_ci(ci, signed=True))
  edited, diff = summary["edited"], summary.get("edit-sham", {})
  if "edit" not in edited or not summary["questions"]:
    return [("e. causal edit", "no edited questions", "(reported)", None)]
  moved, vs_sham = edited["edit"]["top1_new"], diff.get("top1_new")
  n = f"n={summary['questions']} on {summary['links']} links"
  rows = [
    (
      "e. edit: top-1 on the new target's document",
      f"{fmt(moved)} (sham {fmt(edited['sham']['top1_new'])}, stage2 "
      f"{fmt(edited['stage2']['top1_new'])}), {n}",
      f">= {TARGET_MOVED:g}, > sham",
      moved["mean"] >= TARGET_MOVED and vs_sham is not None and vs_sham["lo"] > 0,
    ),
    (
      "e. edit - sham: top-1 on the new document",
      sfmt(vs_sham),
      "diff > 0",
      None if vs_sham is None else vs_sham["lo"] > 0,
    ),
    ("e. edit - sham: top-1 on the old document", sfmt(diff.get("top1_old")), "(reported)", None),
    ("e. edit - sham: score margin new - old", sfmt(diff.get("margin")), "(reported)", None),
    ("e. edit - sham: lens AUC new vs old name", sfmt(diff.get("lens_auc")), "(reported)", None),
  ]
  control, cdiff = summary["control"], summary.get("control:edit-sham", {})
  if "edit" in control and control["edit"]["top1_old"] is not None:
    rows.append(
      (
        "e. unedited links, edit - sham: top-1 on their gold",
        f"{sfmt(cdiff.get('top1_old'))} (edit {fmt(control['edit']['top1_old'])})"
        f", n={summary['control_questions']}",
        "(reported)",
        None,
      )
    )
    elsewhere = cdiff.get("top1_new_elsewhere")
    if elsewhere is not None:
      rows.append(
        (
          "e. unedited links, edit - sham: top-1 on an edit's new target",
          f"{sfmt(elsewhere)} (edit "
          f"{fmt(control['edit']['top1_new_elsewhere'])}), n={elsewhere['n']}",
          "(reported)",
          None,
        )
      )
  probes = summary.get("probe", {})
  known = lambda model, key: (
    f"{probes[model][key]:.2f}" if probes.get(model, {}).get(key) is not None else "n/a"
  )
  if probes:
    for adapter in ("",) + PROBED_ADAPTERS:
      prefix, who = (f"{adapter}_", f"with the {adapter}") if adapter else ("", "base")
      if not any(f"{prefix}new_known" in p for p in probes.values()):
        continue
      rows.append(
        (
          f"e. closed book, {who}: new link / old link known",
          f"edit {known('edit', prefix + 'new_known')} / "
          f"{known('edit', prefix + 'old_known')}, sham "
          f"{known('sham', prefix + 'new_known')} / "
          f"{known('sham', prefix + 'old_known')}",
          "(reported)",
          None,
        )
      )
  return rows
