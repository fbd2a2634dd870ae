"""CLaRa's losses and retrieval scores, as pure functions of arrays (shape letters as in
`clara_jax.model`)."""

from __future__ import annotations

from typing import Tuple, TypeAlias

import jax
import jax.numpy as jnp
import optax

Array: TypeAlias = jax.Array


def masked_cross_entropy(
  logits_btv: Array, targets_bt: Array, mask_bt: Array
) -> Tuple[Array, Array]:
  """Token cross-entropy averaged over supervised positions.

  Returns (mean loss over all positions with mask 1 in the batch, number of those
  positions). An all-zero mask gives loss 0 rather than NaN.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
    logits_btv.astype(jnp.float32), targets_bt
  )
  mask = mask_bt.astype(jnp.float32)
  count = jnp.sum(mask)
  return jnp.sum(losses * mask) / jnp.maximum(count, 1.0), count


def mse_alignment_loss(mem_states_rmd: Array, doc_states_rtd: Array, doc_mask_rt: Array) -> Array:
  """CLaRa's compressor alignment: MSE between the mean memory state and the mean of the
  document's attended (non-padding) states, averaged over hidden units and documents.

  Args:
    mem_states_rmd: [R, n_mem, D] final states at the memory positions of R documents.
    doc_states_rtd: [R, Ld, D] final states at the document positions.
    doc_mask_rt: [R, Ld] 1 on attended document tokens.
  """
  mask = doc_mask_rt.astype(jnp.float32)[..., None]
  doc_mean = jnp.sum(doc_states_rtd.astype(jnp.float32) * mask, axis=1) / jnp.maximum(
    jnp.sum(mask, axis=1), 1.0
  )
  mem_mean = jnp.mean(mem_states_rmd.astype(jnp.float32), axis=1)
  return jnp.mean((mem_mean - doc_mean) ** 2)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def cosine_scores(query_bmd: Array, docs_bnmd: Array) -> Array:
  """Cosine similarity [B, N] in float32 between the flattened (n_mem * D) memories of
  each question [B, n_mem, D] and its candidates [B, N, n_mem, D]."""
  b, n = docs_bnmd.shape[:2]
  q = l2_normalize(query_bmd.reshape(b, -1))
  d = l2_normalize(docs_bnmd.reshape(b, n, -1))
  return jnp.einsum("bf,bnf->bn", q, d)


def infonce_loss(scores_bn: Array, positives_bn: Array, temperature: float = 0.02) -> Array:
  """Supervised retrieval loss over labelled positives (the paper's "Sup-" baseline).

  For each question: -log( sum_{pos} exp(s/tau) / sum_all exp(s/tau) ), averaged over
  questions that have at least one positive. Questions without positives are ignored.

  Args:
    scores_bn: [batch, N] cosine scores.
    positives_bn: [batch, N] 1 where the candidate is a gold document.
  """
  logits = scores_bn.astype(jnp.float32) / temperature
  pos = positives_bn.astype(bool)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_pos = jax.nn.logsumexp(jnp.where(pos, logits, -jnp.inf), axis=-1)
  has_pos = jnp.any(pos, axis=-1)
  per_q = jnp.where(has_pos, log_z - jnp.where(has_pos, log_pos, 0.0), 0.0)
  return jnp.sum(per_q) / jnp.maximum(jnp.sum(has_pos), 1)
