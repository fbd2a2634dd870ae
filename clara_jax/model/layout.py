"""The two layouts of the decoder's block parameters, and conversion between them
(shape letters as in `clara_jax.model`).

* unrolled: one subtree per block, `layers_{i}/attn/q_proj/kernel` [D, H, hd];
* scanned (`DecoderConfig.scan_layers`): one subtree, every leaf stacked on a leading
  layers axis, `layers/attn/q_proj/kernel` [L, D, H, hd].

Files (exports, imports, memory-cache fingerprints) always hold the unrolled layout, so
a run of either kind reads what the other wrote; `for_config` converts to what a model
expects. Works on nested dicts of arrays (or ShapeDtypeStructs).
"""

from __future__ import annotations

import re
from typing import Dict, List

import jax
import jax.numpy as jnp

from clara_jax.model.config import DecoderConfig

SCANNED = "layers"
_UNROLLED = re.compile(r"layers_(\d+)$")


def is_scanned(params: Dict) -> bool:
  return SCANNED in params


def _unrolled_indices(params: Dict) -> List[int]:
  return sorted(int(m.group(1)) for m in map(_UNROLLED.match, params) if m)


def to_scanned(params: Dict) -> Dict:
  """Unrolled -> scanned (a no-op on scanned parameters)."""
  if is_scanned(params):
    return params
  indices = _unrolled_indices(params)
  if indices != list(range(len(indices))) or not indices:
    raise ValueError(f"block parameters layers_0 .. layers_N expected, found layers {indices}")
  blocks = [params[f"layers_{i}"] for i in indices]
  out = {k: v for k, v in params.items() if not _UNROLLED.match(k)}
  out[SCANNED] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)
  return out


def to_unrolled(params: Dict) -> Dict:
  """Scanned -> unrolled (a no-op on unrolled parameters)."""
  if not is_scanned(params):
    return params
  stacked = params[SCANNED]
  depth = {x.shape[0] for x in jax.tree_util.tree_leaves(stacked)}
  if len(depth) != 1:
    raise ValueError(f"scanned block parameters disagree on the number of layers: {depth}")
  out = {k: v for k, v in params.items() if k != SCANNED}
  for i in range(depth.pop()):
    out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
  return out


def for_config(params: Dict, cfg: DecoderConfig) -> Dict:
  """`params` in the layout `cfg` builds (scanned when `cfg.scan_layers`)."""
  return to_scanned(params) if cfg.scan_layers else to_unrolled(params)


def like(params: Dict, reference: Dict) -> Dict:
  """`params` in `reference`'s layout (unchanged when it holds no blocks)."""
  if not is_scanned(params) and not _unrolled_indices(params):
    return params
  return to_scanned(params) if is_scanned(reference) else to_unrolled(params)
