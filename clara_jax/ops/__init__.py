"""Pure array operations of CLaRa that know no model: selection and losses.

Shape letters (B batch, N candidates, k selected, ...) as in `clara_jax.model`.
"""

from clara_jax.ops.losses import (
  cosine_scores,
  infonce_loss,
  masked_cross_entropy,
  mse_alignment_loss,
)
from clara_jax.ops.topk import checked, soft_topk, straight_through_topk

__all__ = [
  "straight_through_topk",
  "soft_topk",
  "checked",
  "cosine_scores",
  "infonce_loss",
  "masked_cross_entropy",
  "mse_alignment_loss",
]
