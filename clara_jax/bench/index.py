"""The corpus-scale memory index, measured (`clara-jax bench index`), and the memory a
large index needs per chip (`index_plan`, `clara-jax plan --index_docs`).

The benchmark builds an index of N synthetic documents through `build_index` (a cheap
synthetic compressor: the build path measured is quantize + write + load) in each
storage dtype, on simulated CPU devices, and reports per dtype: bytes per document,
build documents/s, load time, search latency per batch (exact and approximate), and
Recall@k of queries whose gold document is known, with int8 compared with float32 on
the same queries (the paired difference and a 95% interval, the top-k overlap).

Synthetic memories have the shape the project's default pipeline produces (the demo
recipe's model and lengths: `default_shape`). Each memory vector is a shared mean plus
per-channel noise whose scales follow a log-normal (`memory_model`, fixed), with
OUTLIER_CHANNELS channels OUTLIER_SCALE times the median, as transformer hidden states
have; the outliers set int8's per-vector scale, the hard case for it. A query is its gold document's memories plus
noise of NOISE times the channel scales: NOISE was picked on the development seed
(DEV_SEED, 100 k documents, 1024 queries: float32 Recall@5 0.95 at noise 1.4, 0.90 at
1.5, 0.83 at 1.6) so the recall has room to drop, and is frozen here; the benchmark runs
on another seed (EVAL_SEED).

Goals (`_judge`): int8's Recall@k may fall below float32's by at most 1% of float32's
(the lower end of the interval decides); int8 stores 4x fewer bytes per document than
float32, less the allowance its per-vector float32 scales take (4 bytes per H values,
so 4H / (H + 4) times fewer, 3.76x at H = 64); int8's exact search of a batch takes
under MAX_SEARCH_MS.

Shapes: N documents, Q queries, B batch, M = n_mem, H hidden, K top-k.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
  from clara_jax.infer.index import MemoryIndex

MODEL_SEED = 0  # the memory distribution's mean; documents and queries draw from `seed`
DEV_SEED, EVAL_SEED = 0, 1
NOISE = 1.5  # frozen: see the module docstring
OUTLIER_CHANNELS, OUTLIER_SCALE = 2, 10.0
DTYPES = ("float32", "float16", "bfloat16", "int8")
# The index's goals: int8 loses at most 1% of float32's Recall@5, stores 4x fewer bytes,
# and a batch of 32 questions searches 100 k documents in under 50 ms.
MAX_RELATIVE_RECALL_LOSS = 0.01
MAX_SEARCH_MS = 50.0

# The plan's defaults: a Mistral-7B CLaRa over a 33 M-document corpus on a v5e-256.
PLAN_DOCS, PLAN_HIDDEN, PLAN_DOC_MAX_LENGTH = 33e6, 4096, 256
PLAN_RATES, PLAN_TOPOLOGY = (16, 128), "v5e-256"


def default_shape() -> Tuple[int, int]:
  """(M, H) of the default pipeline (`clara-jax demo`'s recipe): the memories its
  compressor writes per document."""
  from clara_jax.model.clara import num_memory_tokens
  from clara_jax.model.config import model_config
  from clara_jax.pipeline.recipe import load

  recipe = load("demo")
  n_mem = num_memory_tokens(
    recipe.shared["clara.doc_max_length"], recipe.shared["clara.compr_rate"]
  )
  return n_mem, model_config(recipe.model).hidden_size


def ensure_cpu_devices(count: int) -> None:
  """Makes jax start with `count` simulated CPU devices; an error if it already started
  with another number."""
  import jax

  try:
    from jax._src.xla_bridge import backends_are_initialized
  except ImportError:  # a jax without it: take the devices as they are
    backends_are_initialized = lambda: True
  flag = f"--xla_force_host_platform_device_count={count}"
  if not backends_are_initialized():
    flags = [
      f
      for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count=")
    ]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    jax.config.update("jax_platforms", "cpu")
  devices = jax.devices()
  if len(devices) != count or devices[0].platform != "cpu":
    raise ValueError(
      f"bench index runs on {count} simulated CPU devices, but jax started "
      f"with {len(devices)} {devices[0].platform} devices; run it in a new "
      f"process with XLA_FLAGS={flag} JAX_PLATFORMS=cpu"
    )


# ------------------------------------------------------------------------ synthetic data


def memory_model(n_mem: int, hidden: int) -> Tuple[np.ndarray, np.ndarray]:
  """The distribution every seed draws from: (channel scales [D], mean [n_mem, D]). The
  scales are the quantiles of a log-normal (sigma 0.5, median 1), the last
  OUTLIER_CHANNELS set to OUTLIER_SCALE; fixed, since a random draw of them changes how
  hard retrieval is from seed to seed (it sets how much of the energy the outliers
  hold)."""
  normal = statistics.NormalDist()
  channel = np.exp([0.5 * normal.inv_cdf((i + 0.5) / hidden) for i in range(hidden)])
  channel[hidden - OUTLIER_CHANNELS :] = OUTLIER_SCALE
  mean = np.random.default_rng(MODEL_SEED).normal(0.0, 1.0, (n_mem, hidden))
  return channel.astype(np.float32), mean.astype(np.float32)


def synthetic_corpus(
  num_docs: int, n_mem: int, hidden: int, num_queries: int, seed: int, noise: float = NOISE
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(memories [N, n_mem, D] float32, queries [queries, n_mem, D] float32, gold doc per
  query [queries])."""
  channel, mean = memory_model(n_mem, hidden)
  rng = np.random.default_rng(seed)
  memories = np.empty((num_docs, n_mem, hidden), np.float32)
  for start in range(0, num_docs, 8192):  # in pieces: no float64 temporaries of N rows
    part = rng.standard_normal((min(8192, num_docs - start), n_mem, hidden), np.float32)
    memories[start : start + len(part)] = mean + part * channel
  gold = rng.choice(num_docs, num_queries, replace=num_queries > num_docs)
  queries = memories[gold] + noise * channel * rng.standard_normal(
    (num_queries, n_mem, hidden), np.float32
  )
  return memories, queries, gold


# ------------------------------------------------------------------------------ statistics


def wilson(successes: int, n: int, z: float = 1.959964) -> Tuple[float, float]:
  """Wilson score interval of a proportion."""
  if n == 0:
    return 0.0, 1.0
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(
  hits_a: np.ndarray, hits_b: np.ndarray, z: float = 1.959964
) -> Dict[str, float]:
  """Difference of two paired proportions (a - b, the same queries) with Newcombe's
  score interval (his method 10: Wilson intervals of each, combined with the pairs'
  correlation), which stays informative when no or few pairs disagree."""
  a, b = np.asarray(hits_a, bool), np.asarray(hits_b, bool)
  n = len(a)
  both, only_a = int(np.sum(a & b)), int(np.sum(a & ~b))
  only_b, neither = int(np.sum(~a & b)), int(np.sum(~a & ~b))
  p1, p2 = (both + only_a) / n, (both + only_b) / n
  l1, u1 = wilson(both + only_a, n, z)
  l2, u2 = wilson(both + only_b, n, z)
  margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
  phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
  d1, e1, d2, e2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
  lower = p1 - p2 - math.sqrt(max(d1 * d1 - 2 * phi * d1 * e2 + e2 * e2, 0.0))
  upper = p1 - p2 + math.sqrt(max(e1 * e1 - 2 * phi * e1 * d2 + d2 * d2, 0.0))
  return {
    "difference": (only_a - only_b) / n,
    "lower": lower,
    "upper": upper,
    "n": n,
    "only_a": only_a,
    "only_b": only_b,
  }


# ------------------------------------------------------------------------------ the plan


def index_plan(
  num_docs: float = PLAN_DOCS,
  hidden: int = PLAN_HIDDEN,
  doc_max_length: int = PLAN_DOC_MAX_LENGTH,
  rates: Sequence[int] = PLAN_RATES,
  topology: str = PLAN_TOPOLOGY,
  dtypes: Sequence[str] = DTYPES,
) -> List[Dict]:
  """Per chip bytes of an index of `num_docs` documents of n_mem = doc_max_length /
  rate memory vectors of `hidden` values, sharded by documents over the slice's chips,
  one row per (rate, dtype); against the chip's HBM (`clara_jax.bench.tpu`)."""
  from clara_jax.bench import tpu
  from clara_jax.infer.index import bytes_per_doc
  from clara_jax.model.clara import num_memory_tokens

  slice_ = tpu.parse_slice(topology)
  docs = int(num_docs)
  if docs < 1:
    raise ValueError(f"index documents must be at least 1, got {num_docs}")
  rows = []
  for rate in rates:
    n_mem = num_memory_tokens(doc_max_length, rate)
    for dtype in dtypes:
      per_doc = bytes_per_doc(n_mem, hidden, dtype)
      per_chip = -(-docs // slice_.chips) * per_doc
      rows.append(
        {
          "docs": docs,
          "rate": rate,
          "n_mem": n_mem,
          "hidden": hidden,
          "dtype": dtype,
          "bytes_per_doc": per_doc,
          "total_gib": docs * per_doc / 2**30,
          "topology": slice_.name,
          "chips": slice_.chips,
          "gib_per_chip": per_chip / 2**30,
          "hbm_gib_per_chip": slice_.chip.hbm_bytes / 2**30,
          "hbm_fraction": per_chip / slice_.chip.hbm_bytes,
        }
      )
  return rows


def plan_table(rows: List[Dict]) -> str:
  head = rows[0]
  lines = [
    f"index of {head['docs']:,} documents, hidden {head['hidden']}, on "
    f"{head['topology']} ({head['chips']} chips of {head['hbm_gib_per_chip']:.0f} "
    "GiB HBM), sharded by documents:",
    "| rate | n_mem | dtype | bytes/doc | total GiB | GiB per chip | of HBM |",
    "|---:|---:|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['rate']} | {r['n_mem']} | {r['dtype']} | {r['bytes_per_doc']:,} | "
      f"{r['total_gib']:,.0f} | {r['gib_per_chip']:.2f} | "
      f"{100 * r['hbm_fraction']:.0f}% |"
    )
  return "\n".join(lines)


# ------------------------------------------------------------------------- the benchmark


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _top_k(index: MemoryIndex, queries: np.ndarray, k: int, batch: int) -> np.ndarray:
  return np.concatenate(
    [index.search(queries[s : s + batch], k)[0] for s in range(0, len(queries), batch)]
  )


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def run(
  num_docs: int = 100_000,
  num_queries: int = 4096,
  batch: int = 32,
  k: int = 5,
  dtypes: Sequence[str] = DTYPES,
  repeats: int = 20,
  shard_size: int = 1024,
  seed: int = EVAL_SEED,
  noise: float = NOISE,
  shape: Optional[Tuple[int, int]] = None,
  log: Callable[[str], None] = print,
) -> Dict:
  """Builds, loads and searches the index in each dtype; the result with `passed`.

  The latency goal is judged on int8's exact search, the storage the other two goals
  are about; every dtype's is reported."""
  import jax

  from clara_jax.infer.index import check_dtype

  for dtype in dtypes:
    check_dtype(dtype)
  n_mem, hidden = shape or default_shape()
  log(
    f"{num_docs:,} documents of {n_mem} x {hidden} memories ({n_mem * hidden} values), "
    f"{num_queries:,} queries, batch {batch}, Recall@{k}, {len(jax.devices())} "
    f"{jax.devices()[0].platform} devices, seed {seed}, noise {noise}"
  )
  memories, queries, gold = synthetic_corpus(num_docs, n_mem, hidden, num_queries, seed, noise)
  results, found = _measure_dtypes(
    dtypes, memories, queries, gold, k, batch, repeats, shard_size, log
  )
  result: Dict[str, Any] = {
    "benchmark": "index",
    "docs": num_docs,
    "queries": num_queries,
    "batch": batch,
    "k": k,
    "n_mem": n_mem,
    "hidden": hidden,
    "seed": seed,
    "noise": noise,
    "devices": len(jax.devices()),
    "dtypes": results,
    "goals": {},
  }
  if "int8" in results and "float32" in results:
    _judge(result, found, gold, k)
  result["plan"] = index_plan()
  result["passed"] = all(g["passed"] for g in result["goals"].values()) if result["goals"] else None
  return result


def _measure_dtypes(
  dtypes: Sequence[str],
  memories: np.ndarray,
  queries: np.ndarray,
  gold: np.ndarray,
  k: int,
  batch: int,
  repeats: int,
  shard_size: int,
  log: Callable[[str], None],
) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, np.ndarray]]:
  """({dtype: its row of figures}, {dtype: its top-k ids of every query}), each index
  built from the documents' `memories` in a temporary directory."""
  docs = [{"id": str(i), "text": str(i)} for i in range(len(memories))]
  compress = lambda texts: memories[[int(t) for t in texts]]
  results, found = {}, {}
  root = tempfile.mkdtemp(prefix="clara_bench_index_")
  try:
    for dtype in dtypes:
      out = os.path.join(root, dtype)
      results[dtype], found[dtype] = _measure(
        out, dtype, compress, docs, queries, gold, k, batch, repeats, shard_size
      )
      log(_summary_line(results[dtype], k))
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return results, found


def _measure(
  out: str,
  dtype: str,
  compress: Callable[[Sequence[str]], np.ndarray],
  docs: Sequence[Dict],
  queries: np.ndarray,
  gold: np.ndarray,
  k: int,
  batch: int,
  repeats: int,
  shard_size: int,
) -> Tuple[Dict[str, Any], np.ndarray]:
  """(the dtype's row of figures, its top-k ids of every query): builds the index in
  `out`, loads and searches it, then deletes it."""
  import jax

  from clara_jax.infer.index import MemoryIndex, build_index

  start = time.perf_counter()
  meta = build_index(compress, docs, out, shard_size=shard_size, dtype=dtype)
  build_s = time.perf_counter() - start
  start = time.perf_counter()
  index = MemoryIndex.load(out)
  jax.block_until_ready(index.inv_norms)
  load_s = time.perf_counter() - start
  disk = _directory_bytes(out)
  top = _top_k(index, queries, k, batch)
  one = queries[:batch]
  row: Dict[str, Any] = {
    "dtype": dtype,
    "bytes_per_doc": index.bytes_per_doc,
    "disk_bytes_per_doc": disk / len(docs),
    "build_s": build_s,
    "load_s": load_s,
    "build_docs_per_s": len(docs) / (build_s + load_s),
    "search_ms": _median_ms(functools.partial(index.search, one, k), repeats),
    "approx_search_ms": _median_ms(functools.partial(index.search, one, k, approx=True), repeats),
    f"recall@{k}": float(np.mean(np.any(top == gold[:, None], axis=1))),
  }
  assert meta["bytes_per_doc"] == row["bytes_per_doc"]
  del index
  shutil.rmtree(out)
  return row, top


def _summary_line(row: Dict[str, Any], k: int) -> str:
  return (
    f"{row['dtype']}: {row['bytes_per_doc']:,} B/doc, build {row['build_docs_per_s']:,.0f} "
    f"docs/s (load {row['load_s']:.2f} s), search {row['search_ms']:.1f} ms / batch "
    f"(approx {row['approx_search_ms']:.1f}), Recall@{k} {row[f'recall@{k}']:.4f}"
  )


def _judge(result: Dict, found: Dict[str, np.ndarray], gold: np.ndarray, k: int) -> None:
  """The index's three goals, int8 against float32 on the same queries."""
  rows = result["dtypes"]
  hits = {d: np.any(found[d] == gold[:, None], axis=1) for d in ("int8", "float32")}
  diff = paired_difference(hits["int8"], hits["float32"])
  recall32 = rows["float32"][f"recall@{k}"]
  overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(found["int8"], found["float32"])])
  result["int8_vs_float32"] = dict(diff, top_k_overlap=float(overlap))
  allowed = -MAX_RELATIVE_RECALL_LOSS * recall32
  n_mem = result["n_mem"]
  ratio = rows["float32"]["bytes_per_doc"] / rows["int8"]["bytes_per_doc"]
  # Judged as the goal is written (4x): the int8 values alone are 4x smaller, and the
  # per-vector float32 scales the format needs add 4 bytes per H values (3.76x at
  # H = 64, 3.996x at H = 4096), so this goal misses by the scales' share.
  search_ms = rows["int8"]["search_ms"]
  result["goals"] = {
    "int8_recall": {
      "passed": diff["lower"] >= allowed,
      "text": f"int8 - float32 Recall@{k} = {100 * diff['difference']:+.2f} points, 95% "
      f"interval [{100 * diff['lower']:+.2f}, {100 * diff['upper']:+.2f}] "
      f"(lower end >= {100 * allowed:+.2f}: 1% of float32's "
      f"{recall32:.4f})",
    },
    "int8_bytes": {
      "passed": ratio >= 4.0,
      "text": f"float32 / int8 bytes per doc = {rows['float32']['bytes_per_doc']:,} / "
      f"{rows['int8']['bytes_per_doc']:,} = {ratio:.3f}x (>= 4x; the values "
      f"are 4x, the {n_mem} per-vector float32 scales add {4 * n_mem} B)",
    },
    "search_latency": {
      "passed": search_ms < MAX_SEARCH_MS,
      "text": f"int8 exact search of {result['docs']:,} docs, batch {result['batch']}: "
      f"{search_ms:.1f} ms (< {MAX_SEARCH_MS:.0f} ms)",
    },
  }


def table(result: Dict) -> str:
  """The result as Markdown tables, goals last."""
  k = result["k"]
  lines = [
    f"| dtype | bytes/doc | on disk/doc | build docs/s | load s | search ms | "
    f"approx ms | Recall@{k} |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in result["dtypes"].values():
    lines.append(
      f"| {row['dtype']} | {row['bytes_per_doc']:,} | "
      f"{row['disk_bytes_per_doc']:,.0f} | {row['build_docs_per_s']:,.0f} | "
      f"{row['load_s']:.2f} | {row['search_ms']:.1f} | "
      f"{row['approx_search_ms']:.1f} | {row[f'recall@{k}']:.4f} |"
    )
  if "int8_vs_float32" in result:
    c = result["int8_vs_float32"]
    lines += [
      "",
      f"int8 vs float32 on {c['n']:,} queries: top-{k} overlap "
      f"{c['top_k_overlap']:.4f}; gold found only by int8 {c['only_a']}, only by "
      f"float32 {c['only_b']}",
    ]
  lines += ["", plan_table(result["plan"]), ""]
  for name, goal in result["goals"].items():
    lines.append(f"{'PASS' if goal['passed'] else 'MISS'} {name}: {goal['text']}")
  return "\n".join(lines)
