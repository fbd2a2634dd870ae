"""`clara-jax bench reference`: the harness is run as a subprocess and its last JSON line
read; ratios, goals and the judged dtype follow the CPU; a missed goal exits 1."""

import json
import sys

import pytest

from clara_jax import cli
from clara_jax.bench import reference

FAKE_HARNESS = """
import argparse, json
ap = argparse.ArgumentParser()
for flag in ("--dtype", "--benches", "--warmup", "--runs", "--threads", "--repo"):
  ap.add_argument(flag)
a = ap.parse_args()
seconds = {"bf16": 40.0, "fp32": 4.0}[a.dtype]
print("progress lines come first")
print(json.dumps({"env": {"torch": "fake"}, "benchmarks": {
    name: {"median_s": seconds} for name in a.benches.split(",")}}))
"""


def _cpuinfo(tmp_path, flags):
  path = tmp_path / "cpuinfo"
  path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {' '.join(flags)}\n")
  return str(path)


def test_cpu_info_reads_the_bf16_instructions(tmp_path):
  plain = reference.cpu_info(_cpuinfo(tmp_path, ["fpu", "avx2"]))
  assert plain["model"] == "Test CPU" and plain["avx2"] and not plain["avx512f"]
  assert reference.judged_dtype(plain) == "fp32"
  bf16 = reference.cpu_info(_cpuinfo(tmp_path, ["avx2", "avx512f", "avx512_bf16"]))
  assert bf16["bf16_matmul_instructions"] == ["avx512_bf16"]
  assert reference.judged_dtype(bf16) == "bf16"


def test_the_harness_last_line_is_read_and_its_failure_named(tmp_path):
  harness = tmp_path / "bench_ref.py"
  harness.write_text(FAKE_HARNESS)
  out = reference.run_reference(
    str(harness), sys.executable, "fp32", ["stage2"], 1, 1, 2, log=lambda _: None
  )
  assert out["benchmarks"] == {"stage2": {"median_s": 4.0}}
  harness.write_text("import sys; print('boom'); sys.exit(3)")
  with pytest.raises(RuntimeError, match="exited 3:\nboom"):
    reference.run_reference(
      str(harness), sys.executable, "fp32", ["stage2"], 1, 1, 2, log=lambda _: None
    )


def test_ratios_are_judged_on_one_dtype_only():
  ref = {
    d: {"benchmarks": {"stage2": {"median_s": s}, "generate": {"median_s": s}}}
    for d, s in (("bf16", 40.0), ("fp32", 4.0))
  }
  ours = {
    d: {
      "stage2": {"seconds": 0.5, "mfu": 0.25},
      "generate": {"seconds": 0.5},
      "stage2_q32": {"seconds": 0.1, "mfu": 0.5},
    }
    for d in ("bf16", "fp32")
  }
  rows = {(r["benchmark"], r["dtype"]): r for r in reference.ratio_rows(ref, ours, "fp32")}
  assert rows["stage2", "bf16"]["ratio"] == 80.0 and rows["stage2", "bf16"]["met"] is None
  assert rows["stage2", "fp32"]["ratio"] == 8.0 and rows["stage2", "fp32"]["met"] is False
  assert rows["generate", "fp32"]["met"] is True  # 8x against a 5x goal
  # At 100% MFU the step would take 0.25 * 0.5 s: 4 / 0.125 = 32x at most.
  assert rows["stage2", "fp32"]["bound"] == 32.0 and rows["generate", "fp32"]["bound"] is None
  # The unjudged rows have no goal, whatever their ratio.
  assert rows["stage2_q32", "fp32"]["goal"] is None and rows["stage2_q32", "fp32"]["met"] is None
  table = reference.format_table(list(rows.values()))
  assert "| stage2 | fp32 | 4.000 | 0.500 | 8.0x | 0.25 | 32.0x | 10x | MISS |" in table
  assert "| generate | fp32 | 4.000 | 0.500 | 8.0x | - | - | 5x | yes |" in table
  assert "| stage2_q32 | fp32 | 4.000 | 0.100 | 40.0x | 0.50 | 80.0x | - | - |" in table


def test_the_command_prints_the_table_and_exits_1_on_a_miss(tmp_path, monkeypatch, capsys):
  harness = tmp_path / "bench_ref.py"
  harness.write_text(FAKE_HARNESS)
  timed = []

  def fake_ours(dtype, iters, names, model="ref_tiny", log=print):
    timed.append((dtype, tuple(names)))
    return {name: {"seconds": 0.2} for name in names}  # fp32 ratio 20x: stage2_cached misses

  monkeypatch.setattr(reference, "run_ours", fake_ours)
  monkeypatch.setattr(
    reference,
    "cpu_info",
    lambda: {
      "model": "Test CPU",
      "cores": 2,
      "avx512f": False,
      "avx2": True,
      "bf16_matmul_instructions": [],
    },
  )
  out = tmp_path / "result.json"
  code = cli.main(
    [
      "bench",
      "reference",
      f"--harness={harness}",
      f"--python={sys.executable}",
      "--iters=1",
      "--ref_runs=1",
      f"--out={out}",
    ]
  )
  printed = capsys.readouterr().out
  assert code == 1
  assert "bf16 matrix instructions: none; goals judged on fp32" in printed
  assert "| stage2_cached | fp32 | 4.000 | 0.200 | 20.0x | - | - | 25x | MISS |" in printed
  assert "| stage2 | fp32 | 4.000 | 0.200 | 20.0x | - | - | 10x | yes |" in printed
  assert "| stage2_cached_q32 | fp32 | 4.000 | 0.200 | 20.0x | - | - | - | - |" in printed
  assert timed == [("bf16", reference.ROWS), ("fp32", reference.ROWS)]
  saved = json.loads(out.read_text())
  assert saved["passed"] is False and saved["judged_dtype"] == "fp32"
  assert json.loads(printed.strip().splitlines()[-1])["passed"] is False
