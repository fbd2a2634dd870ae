"""Closed-book knowledge probe: does the base LM know the links of the world's chains?

Hidden reasoning needs the model to know, without any document, that X plays for team
T: the reasoner can only retrieve T's document for "In which city is the team of X
based?" through that knowledge. The probe asks the base model (no adapter, no memories)
to complete each link's sentence of the LM text ("X plays for the ___.") and scores
every entity of the right kind as the completion by the sentence's log-likelihood; the
link is known when the true entity scores highest. Chance is 1 / (entities of the kind).

A chain's links: one-link [X, gold] has (X, link, gold); two-link [X, Y, gold] has (X,
sibling, Y) and (Y, link, gold). A question's chain is known when every link is.
"""

from __future__ import annotations

import types
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from clara_jax.model import clara
from clara_jax.model.decoder import Decoder, DecoderOutput

# The first LM-text wording of each person link ({n} the person, {v} the linked name).
LINK_SENTENCES = {
  "team": "{n} plays for the {v}.",
  "employer": "{n} works for {v}.",
  "birthplace": "{n} comes from {v}.",
  "sibling": "The sibling of {n} is {v}.",
}
Link = Tuple[str, str, str]  # (person id, link, linked entity id)


def chain_links(question: Mapping) -> List[Link]:
  """The links of a manifest question's chain (empty for a single-hop question)."""
  chain = question.get("chain") or []
  if len(chain) < 2:
    return []
  link_names = question["attribute"].split(".")[: len(chain) - 1]
  return [(chain[i], link_names[i], chain[i + 1]) for i in range(len(chain) - 1)]


def sentence_log_likelihoods(
  model: types.SimpleNamespace,
  sentences: Sequence[str],
  batch: int = 64,
  adapter: Optional[str] = None,
) -> np.ndarray:
  """Sum of next-token log-probabilities of each sentence [S] under the base model
  (`adapter` None) or the model with that LoRA adapter active, after BOS."""
  tok = model.tok
  ids = [tok.encode(s, add_bos=True, parse_special=False) for s in sentences]
  length = max(len(i) for i in ids)
  tokens = np.full((len(ids), length), tok.pad_id, np.int32)
  mask = np.zeros((len(ids), length), np.int32)
  for row, seq in enumerate(ids):
    tokens[row, : len(seq)], mask[row, : len(seq)] = seq, 1
  decoder = Decoder(model.cfg)

  @jax.jit
  def score(params: Any, t: jax.Array, m: jax.Array) -> jax.Array:
    hidden = cast(
      DecoderOutput,
      decoder.apply(
        {"params": params},
        t,
        attention_mask=m,
        positions=clara.positions_from_mask(m),
        adapter=adapter,
      ),
    ).hidden
    logits = cast(
      jax.Array, decoder.apply({"params": params}, hidden[:, :-1], method=Decoder.logits)
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, t[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(picked * (m[:, 1:] * m[:, :-1]), axis=-1)

  out = []
  for start in range(0, len(ids), batch):  # fixed-size chunks: one compiled program
    t, m = tokens[start : start + batch], mask[start : start + batch]
    pad = batch - len(t)
    if pad:
      t = np.concatenate([t, np.full((pad, length), tok.pad_id, np.int32)])
      m = np.concatenate([m, np.zeros((pad, length), np.int32)])
    out.append(np.asarray(score(model.params, t, m))[: batch - pad])
  return np.concatenate(out)


def probe_links(
  model: types.SimpleNamespace,
  manifest: Mapping,
  links: Sequence[Link],
  adapter: Optional[str] = None,
) -> Dict[Link, bool]:
  """{link: known} for each distinct link: the true entity's sentence outscores the
  sentence with every other entity of its kind (under the base, or with `adapter`)."""
  docs = manifest["documents"]
  links = list(dict.fromkeys(links))
  sentences: List[str] = []
  spans: List[Tuple[int, int, int]] = []
  for person, link, target in links:
    kind = docs[target]["kind"]
    options = [t for t in sorted(docs) if docs[t]["kind"] == kind and t != person]
    first = len(sentences)
    sentences += [
      LINK_SENTENCES[link].format(n=docs[person]["name"], v=docs[t]["name"]) for t in options
    ]
    spans.append((first, options.index(target), len(options)))
  scores = sentence_log_likelihoods(model, sentences, adapter=adapter) if sentences else np.zeros(0)
  known: Dict[Link, bool] = {}
  for triple, (first, true_at, n) in zip(links, spans):
    own = scores[first : first + n]
    known[triple] = bool(own[true_at] > np.delete(own, true_at).max()) if n > 1 else True
  return known


def knowledge_report(
  model: types.SimpleNamespace, manifest: Mapping, question_ids: Sequence[str]
) -> Dict:
  """Probe accuracy over the links of the given questions' chains, and per question
  whether its whole chain is known ({"links", "known_share", "chance", "questions"})."""
  questions = manifest["questions"]
  per_question = {qid: chain_links(questions[qid]) for qid in question_ids}
  all_links = [link for links in per_question.values() for link in links]
  known = probe_links(model, manifest, all_links)
  docs = manifest["documents"]
  kinds = [docs[target]["kind"] for _, _, target in known]
  chance = (
    float(np.mean([1.0 / sum(d["kind"] == k for d in docs.values()) for k in kinds]))
    if kinds
    else None
  )
  return {
    "links": len(known),
    "known_share": float(np.mean(list(known.values()))) if known else None,
    "chance": chance,
    "questions": {
      qid: all(known[link] for link in links) for qid, links in per_question.items() if links
    },
  }
