"""Helpers over decoder parameters: split/merge adapters, copy one adapter into another,
fold a frozen adapter into the base, and trainable masks for optimizers.

Parameter paths are '/'-joined module names, e.g.
`layers_0/attn/q_proj/lora_compressor/a` or `embedder/extra_embedding`, so masks can
also be written as regular expressions (big_vision style).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from clara_jax.model.config import LoraConfig
from clara_jax.model.layers import lora_prefix

Params = Mapping
EXTRA_EMBEDDING_PATH = "embedder/extra_embedding"


def flatten(params: Params) -> Dict[str, jax.Array]:
  return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: Mapping[str, Any]) -> Dict:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def _adapter_of(path: str) -> str | None:
  for part in path.split("/"):
    if part.startswith("lora_"):
      return part[len("lora_") :]
  return None


def adapter_names(params: Params) -> Tuple[str, ...]:
  """Names of the adapters present in `params`, in first-seen order."""
  names = []
  for path in flatten(params):
    name = _adapter_of(path)
    if name is not None and name not in names:
      names.append(name)
  return tuple(names)


def split_adapters(params: Params) -> Tuple[Dict, Dict[str, Dict]]:
  """params -> (base params, {adapter name: that adapter's params, same nesting})."""
  base: Dict = {}
  adapters: Dict[str, Dict] = {}
  for path, leaf in flatten(params).items():
    name = _adapter_of(path)
    if name is None:
      base[path] = leaf
    else:
      adapters.setdefault(name, {})[path] = leaf
  return unflatten(base), {n: unflatten(t) for n, t in adapters.items()}


def merge_adapters(base: Params, adapters: Mapping[str, Params]) -> Dict:
  """Inverse of `split_adapters`."""
  flat = flatten(base)
  for name, tree in adapters.items():
    for path, leaf in flatten(tree).items():
      if _adapter_of(path) != name:
        raise ValueError(f"adapter {name!r} holds a parameter of another adapter: {path}")
      if path in flat:
        raise ValueError(f"parameter {path} given twice")
      flat[path] = leaf
  return unflatten(flat)


def copy_adapter(params: Params, src: str, dst: str) -> Dict:
  """Returns params where adapter `dst` holds a copy of adapter `src`'s weights.

  CLaRa's query reasoner starts stage 2 as a copy of the compressor.
  """
  flat = flatten(params)
  src_key, dst_key = f"/{lora_prefix(src)}/", f"/{lora_prefix(dst)}/"
  copied = 0
  for path in list(flat):
    if src_key in f"/{path}":
      target = f"/{path}".replace(src_key, dst_key, 1)[1:]
      if target not in flat:
        raise ValueError(f"adapter {dst!r} has no parameter {target} to copy {path} into")
      # A real copy: two leaves sharing one buffer cannot both be donated to a step.
      flat[target] = jnp.array(flat[path], copy=True)
      copied += 1
  if not copied:
    raise ValueError(f"no parameters of adapter {src!r}; present: {adapter_names(params)}")
  return unflatten(flat)


def fold_adapter(params: Params, adapter: str, lora: LoraConfig) -> Dict:
  """Adds `scale * A @ B` of `adapter` into every base kernel (for a frozen adapter).

  Running the result with adapter=None equals running `params` with `adapter` active (up
  to rounding; dropout aside), at the cost of the base model alone.
  """
  flat = flatten(params)
  prefix = lora_prefix(adapter)
  folded = 0
  for path in list(flat):
    if path.endswith(f"/{prefix}/a"):
      layer = path[: -len(f"/{prefix}/a")]
      a, b = flat[path], flat[f"{layer}/{prefix}/b"]
      kernel = flat[f"{layer}/kernel"]
      fold = lambda a, b: jnp.tensordot(a, b, axes=1)
      if path.startswith("layers/"):  # scanned blocks: one product per stacked layer
        fold = jax.vmap(fold)
      delta = fold(a.astype(jnp.float32), b.astype(jnp.float32))
      flat[f"{layer}/kernel"] = (kernel.astype(jnp.float32) + lora.scale * delta).astype(
        kernel.dtype
      )
      folded += 1
  if not folded:
    raise ValueError(f"no parameters of adapter {adapter!r}; present: {adapter_names(params)}")
  return unflatten(flat)


def regex_mask(params: Params, patterns: Iterable[str]) -> Dict:
  """Boolean tree: True where a parameter's path fully matches one of `patterns`."""
  compiled = [re.compile(p) for p in patterns]
  return unflatten({path: any(c.fullmatch(path) for c in compiled) for path in flatten(params)})


def trainable_patterns(
  adapters: Sequence[str] = (), extra_embedding: bool = False, base: bool = False
) -> Tuple[str, ...]:
  """Regexes of the trainable set: named adapters, the special-token embedding rows,
  or (for from-scratch LM pretraining) every non-adapter parameter."""
  patterns = [rf"(.*/)?{lora_prefix(name)}/.*" for name in adapters]
  if extra_embedding:
    patterns.append(re.escape(EXTRA_EMBEDDING_PATH))
  if base:
    patterns.append(r"(?!(.*/)?lora_)(.*)")
  return tuple(patterns)


def trainable_mask(
  params: Params, adapters: Sequence[str] = (), extra_embedding: bool = False, base: bool = False
) -> Dict:
  """Boolean tree for `optax.masked`/`multi_transform`; see `trainable_patterns`."""
  present = adapter_names(params)
  for name in adapters:
    if name not in present:
      raise ValueError(f"cannot train adapter {name!r}: the model has {present}")
  if extra_embedding and EXTRA_EMBEDDING_PATH not in flatten(params):
    raise ValueError("cannot train special-token rows: the model has no extra_embedding")
  return regex_mask(params, trainable_patterns(adapters, extra_embedding, base))


def count_params(params: Params) -> Dict[str, int]:
  """Parameter counts: 'base' and one entry per adapter."""
  base, adapters = split_adapters(params)
  size = lambda t: sum(int(x.size) for x in jax.tree_util.tree_leaves(t))
  return {"base": size(base), **{name: size(t) for name, t in adapters.items()}}
