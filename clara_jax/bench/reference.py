"""Step and answering times against the official PyTorch CLaRa, from one run.

The reference side is the PyTorch harness `bench_ref.py` (it times apple/ml-clara's
`CLaRa` on a tiny random Mistral whose shapes equal the `ref_tiny` size: 4 questions of
20 candidates, k = 5, documents of 128 tokens, rate 16), run in its own Python with torch.
This side runs `stage_step_time` and `generation_latency` at the padded shapes the
reference's collate builds, so both sides compute the same tensors:

| benchmark | reference (harness name) | encoder rows | query rows | decoder rows |
|---|---|---|---|---|
| stage1   | stage1_k1 (the pretraining shape) | 4 x 139  | -        | 4 x 609 |
| stage1_2 | stage1_2                          | 20 x 139 | -        | 4 x 169 |
| stage2   | stage2                            | 80 x 139 | 4 x 1035 | 4 x 169 |
| generate | generate (16 new tokens)          | 80 x 139 | 4 x 139  | 4 x 130 prompt |

The reference's answering prompts share their first 49 tokens (`<s>[INST]`, the system
text and "Background:", up to the first memory slot); this side builds their keys and
values once, as `ClaraModel` does, and decodes each batch from the other 81.

`stage2_cached` is this side's stage2 step reading precomputed document memories,
against the reference's only stage2 step (which compresses every candidate, without
gradients). Goals are ratios reference seconds / these seconds.

The `*_q32` rows are not judged: they run this side's stage2 step with questions padded
to its data pipeline's default `question_max_length` (32 text tokens, 43 with the
specials and memory slots; the reference's questions here have 25-34 real tokens of
1035), against the same reference step: the same questions, each side padding them its
own way.

Each step row also gives this side's MFU (model FLOPs of the step over the measured
matmul peak) and `bound`: the ratio this side would reach at 100% MFU doing the work it
does, reference seconds / (FLOPs / peak). A goal above the bound cannot be met by running
the same work faster; only by doing less of it.

Both dtypes run. bf16 is what the reference does on a CPU; on a CPU without bf16 matrix
instructions (AVX512-BF16 or AMX) PyTorch runs bf16 matmuls through slow conversion
paths, which inflates every bf16 ratio, so there the goals are judged on float32.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Callable, Dict, List, Optional, Sequence, Set

# Our benchmark -> (the harness's benchmark, keyword arguments of our timing function).
# Decoder rows split as the reference's labels do (363 answer tokens of 609 in stage1;
# 20 of 169 in stage1_2 and stage2); stage2's questions are padded as its collate pads
# them (1024 + 3 + 8 memory slots = 1035).
SHAPES: Dict[str, tuple] = {
  "stage1": ("stage1_k1", dict(stage="stage1", prompt_len=246, answer_len=363)),
  "stage1_2": ("stage1_2", dict(stage="stage1_2", prompt_len=149, answer_len=20)),
  "stage2": ("stage2", dict(stage="stage2", question_len=1024, prompt_len=149, answer_len=20)),
  "stage2_cached": (
    "stage2",
    dict(stage="stage2", question_len=1024, prompt_len=149, answer_len=20, cached=True),
  ),
  "generate": ("generate", dict(question_len=128, prompt_len=130, head_len=49, new_tokens=16)),
}
SHAPES.update(
  {
    "stage2_q32": ("stage2", dict(SHAPES["stage2"][1], question_len=32)),
    "stage2_cached_q32": ("stage2", dict(SHAPES["stage2_cached"][1], question_len=32)),
  }
)
GOALS = {"generate": 5.0, "stage1_2": 3.0, "stage1": 5.0, "stage2": 10.0, "stage2_cached": 25.0}
UNJUDGED = ("stage2_q32", "stage2_cached_q32")  # rows printed without a goal
ROWS = tuple(GOALS) + UNJUDGED
COMMON = dict(batch=4, candidates=20, doc_len=128, compr_rate=16, k=5)
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict:
  """The CPU's model name and whether it has bf16 matrix instructions."""
  flags: Set[str] = set()
  model = platform.processor() or platform.machine()
  if os.path.exists(cpuinfo):
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
          flags = set(value.split())
        elif key.strip() == "model name":
          model = value.strip()
  return {
    "model": model,
    "cores": os.cpu_count(),
    "avx512f": "avx512f" in flags,
    "avx2": "avx2" in flags,
    "bf16_matmul_instructions": sorted(flags.intersection(BF16_FLAGS)),
  }


def judged_dtype(cpu: dict) -> str:
  return "bf16" if cpu["bf16_matmul_instructions"] else "fp32"


def run_reference(
  harness: str,
  python: str,
  dtype: str,
  benches: Sequence[str],
  warmup: int,
  runs: int,
  threads: int,
  repo: Optional[str] = None,
  log: Callable[[str], None] = print,
) -> dict:
  """The harness's final JSON line ({"benchmarks": {name: {"median_s": ...}}, ...})."""
  cmd = [
    python,
    harness,
    "--dtype",
    dtype,
    "--benches",
    ",".join(benches),
    "--warmup",
    str(warmup),
    "--runs",
    str(runs),
    "--threads",
    str(threads),
  ]
  if repo:
    cmd += ["--repo", repo]
  log(f"reference {dtype}: {' '.join(cmd)}")
  proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    raise RuntimeError(
      f"{harness} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
    )
  try:
    return json.loads(lines[-1])
  except json.JSONDecodeError as e:
    raise RuntimeError(f"{harness}: its last line is not JSON ({e}): {lines[-1][:200]}") from None


def run_ours(
  dtype: str,
  iters: int,
  names: Sequence[str],
  model: str = "ref_tiny",
  log: Callable[[str], None] = print,
) -> Dict[str, dict]:
  """This side's result dict of each benchmark, at the reference's shapes."""
  from clara_jax.bench.generation import generation_latency
  from clara_jax.bench.stage_step import stage_step_time

  out = {}
  for name in names:
    kwargs = dict(SHAPES[name][1], **COMMON)
    if name == "generate":
      result = generation_latency(model, dtype=DTYPES[dtype], iters=iters, **kwargs)
      result["seconds"] = result["total_ms_per_question"] * kwargs["batch"] / 1e3
    else:
      result = stage_step_time(model=model, dtype=DTYPES[dtype], iters=iters, **kwargs)
      result["seconds"] = result["step_s"]
    log(f"clara_jax {dtype} {name}: {result['seconds']:.4f} s")
    out[name] = result
  return out


def ratio_rows(reference: Dict[str, dict], ours: Dict[str, dict], judged: str) -> List[dict]:
  """One row per (benchmark, dtype): both sides' seconds, the ratio, the goal and whether
  it is met (None for the dtype not judged on this CPU)."""
  rows = []
  for dtype in ("bf16", "fp32"):
    if dtype not in reference or dtype not in ours:
      continue
    for name in ROWS:
      if name not in ours[dtype]:
        continue
      goal = GOALS.get(name)
      ref_s = reference[dtype]["benchmarks"][SHAPES[name][0]]["median_s"]
      result = ours[dtype][name]
      our_s = result["seconds"]
      ratio = ref_s / our_s
      mfu = result.get("mfu")
      rows.append(
        {
          "benchmark": name,
          "dtype": dtype,
          "reference_s": round(ref_s, 4),
          "clara_jax_s": round(our_s, 4),
          "ratio": round(ratio, 2),
          "mfu": mfu,
          # At 100% MFU the step would take FLOPs / peak = mfu * seconds.
          "bound": round(ref_s / (mfu * our_s), 2) if mfu else None,
          "goal": goal,
          "met": (ratio >= goal) if dtype == judged and goal else None,
        }
      )
  return rows


def format_table(rows: List[dict]) -> str:
  head = (
    "| benchmark | dtype | reference s | clara_jax s | ratio | clara_jax MFU | "
    "bound | goal | met |\n|---|---|---|---|---|---|---|---|---|"
  )
  optional = lambda value, fmt: "-" if value is None else format(value, fmt)
  body = [
    f"| {r['benchmark']} | {r['dtype']} | {r['reference_s']:.3f} | "
    f"{r['clara_jax_s']:.3f} | {r['ratio']:.1f}x | {optional(r.get('mfu'), '.2f')} | "
    f"{optional(r.get('bound'), '.1f')}{'x' if r.get('bound') else ''} | "
    f"{optional(r['goal'], '.0f')}{'x' if r['goal'] else ''} | "
    f"{'-' if r['met'] is None else ('yes' if r['met'] else 'MISS')} |"
    for r in rows
  ]
  return "\n".join([head, *body])


def compare(
  harness: str,
  python: str,
  dtypes: Sequence[str] = ("bf16", "fp32"),
  names: Sequence[str] = ROWS,
  iters: int = 5,
  warmup: int = 2,
  runs: int = 5,
  threads: int = 2,
  repo: Optional[str] = None,
  log: Callable[[str], None] = print,
) -> dict:
  """Both sides in both dtypes, then the table; `passed` is every judged goal met."""
  cpu = cpu_info()
  judged = judged_dtype(cpu)
  benches = sorted({SHAPES[name][0] for name in names})
  reference, ours = {}, {}
  for dtype in dtypes:
    reference[dtype] = run_reference(
      harness, python, dtype, benches, warmup, runs, threads, repo, log
    )
    ours[dtype] = run_ours(dtype, iters, names, log=log)
  rows = ratio_rows(reference, ours, judged)
  judged_rows = [r for r in rows if r["met"] is not None]
  return {
    "benchmark": "reference",
    "cpu": cpu,
    "judged_dtype": judged,
    "reference_env": {d: reference[d].get("env") for d in reference},
    "rows": rows,
    "passed": bool(judged_rows) and all(r["met"] for r in judged_rows),
    "table": format_table(rows),
    "reference": reference,
    "clara_jax": ours,
  }
