"""The `clara-jax` entry points and saving/loading a decoder outside training."""

import json
import os

import jax
import numpy as np
import pytest

from clara_jax import cli, partitioning
from clara_jax.model.config import config_from_dict, config_to_dict, model_config
from clara_jax.model.decoder import abstract_params, init_params
from clara_jax.weights.export import load_params, save_params


def test_info_reports_parameter_counts(capsys):
  assert cli.main(["info", "--model", "mistral_7b", "--num_extra_tokens", "35"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["config"]["hidden_size"] == 4096
  assert out["num_params"] == model_config("mistral_7b", num_extra_tokens=35).num_params(False)


def test_demo_command_runs_the_demo_pipeline(monkeypatch, tmp_path):
  """The CLI hands its flags to the pipeline runner with the demo recipe
  (tests/test_demo.py runs it); the exit code follows the claims."""
  from clara_jax.pipeline import run

  calls, verdict = [], [None]
  monkeypatch.setattr(
    run,
    "run",
    lambda recipe, workdir, quick, seed, data_dir, base: calls.append(
      (recipe, workdir, quick, seed, data_dir, base)
    )
    or {"claims": [{"claim": "x", "passed": verdict[0]}]},
  )
  assert cli.main(["demo", "--quick", "--workdir", str(tmp_path), "--seed", "3"]) == 0
  assert calls == [("demo", str(tmp_path), True, 3, None, None)]
  verdict[0] = False
  assert cli.main(["pipeline", "--recipe", "demo", "--workdir", str(tmp_path)]) == 1


def test_bench_forward_prints_figures(capsys):
  assert (
    cli.main(
      ["bench", "forward", "--model", "tiny", "--batch", "2", "--length", "16", "--iters", "2"]
    )
    == 0
  )
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1.5
  assert result["peak_gflops_per_s"] > 0


def test_unknown_subcommand_is_an_error(capsys):
  assert cli.main(["fly"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("clara-jax fly: argument command: invalid choice: 'fly'")
  assert len(err.strip().splitlines()) == 1


def test_config_dict_round_trip():
  cfg = model_config("small", num_extra_tokens=11, sliding_window=64)
  assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
  with pytest.raises(ValueError, match="unknown DecoderConfig fields"):
    config_from_dict({**config_to_dict(cfg), "hiden_size": 3})


def test_save_and_load_params_onto_a_mesh(tmp_path):
  cfg = model_config("tiny", num_extra_tokens=3)
  params = init_params(cfg, jax.random.key(5))
  save_params(str(tmp_path / "ckpt"), cfg, params)
  loaded_cfg, loaded = load_params(str(tmp_path / "ckpt"))
  assert loaded_cfg == cfg
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  mesh = partitioning.make_mesh((1, 2, 4))
  shardings = partitioning.logical_shardings(abstract_params(cfg), mesh)
  _, sharded = load_params(str(tmp_path / "ckpt"), shardings=shardings)
  kernel = sharded["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding == shardings["layers_0"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_array_equal(kernel, params["layers_0"]["mlp"]["up_proj"]["kernel"])
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_params(str(tmp_path / "nothing"))


SHAPES = dict(batch=2, candidates=4, doc_len=16, compr_rate=4, k=2, iters=1)


def test_bench_generation_latency():
  """Every phase and the one-call total are timed, with and without a shared prompt head
  (whose rows then hold prompt_len - head_len tokens each)."""
  from clara_jax.bench.generation import generation_latency

  for head_len in (0, 9):
    result = generation_latency(
      "tiny", question_len=8, prompt_len=24, head_len=head_len, new_tokens=3, **SHAPES
    )
    phases = [result[f"{p}_ms_per_question"] for p in ("compress", "reason", "select", "decode")]
    assert all(ms > 0 for ms in phases) and result["total_ms_per_question"] > 0
    assert result["head_len"] == head_len and (result["head_ms"] > 0) == (head_len > 0)
  with pytest.raises(ValueError, match="cannot hold a head of 20 tokens"):
    generation_latency("tiny", question_len=8, prompt_len=24, head_len=20, new_tokens=3, **SHAPES)


# A benchmark run (compiles and times every stage's step): slow-marked. The default run
# keeps `bench` covered by test_bench_forward_prints_figures (the CLI's JSON line) and
# test_bench_generation_latency (the generation phases).
@pytest.mark.slow
def test_bench_cli_suite_prints_a_final_json_line(capsys):
  assert (
    cli.main(
      [
        "bench",
        "suite",
        "--model",
        "tiny",
        "--batch",
        "1",
        "--candidates",
        "3",
        "--doc_len",
        "16",
        "--compr_rate",
        "4",
        "--k",
        "2",
        "--iters",
        "1",
      ]
    )
    == 0
  )
  lines = capsys.readouterr().out.strip().splitlines()
  final = json.loads(lines[-1])
  names = [r["benchmark"] for r in final["results"]]
  assert names == [
    "lm_step",
    "stage1_step",
    "stage1_2_step",
    "stage2_step",
    "stage2_step",
    "generation",
  ]
  assert [json.loads(line) for line in lines[:-1]] == final["results"]
  steps = final["results"][:5]
  assert [r["documents_per_question"] for r in steps] == [3, 1, 2, 3, 3]
  assert [r["cached_memories"] for r in steps] == [False] * 4 + [True]
  assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5 for r in steps)


@pytest.mark.parametrize(
  "argv",
  [
    ["synth", "--out", "w", "--candidates", "0"],
    ["synth", "--out", "w", "--k", "-2"],
    ["evaluate", "--workdir", "w", "--data", "d.jsonl", "--limit", "0"],
    ["evaluate", "--workdir", "w", "--data", "d.jsonl", "--k", "0"],
    ["index", "--workdir", "w", "--corpus", "c.jsonl", "--out", "o", "--shard_size", "0"],
    ["convert", "hotpotqa_ircot", "--input", "i", "--out", "o", "--limit", "0"],
    ["convert", "hotpotqa_ircot", "--input", "i", "--out", "o", "--candidates", "x"],
  ],
)
def test_counts_below_one_are_usage_errors(argv, capsys, tmp_path, monkeypatch):
  from clara_jax import cli

  monkeypatch.chdir(tmp_path)
  assert cli.main(argv) == 2  # one line like any bad input, not argparse's usage block
  err = capsys.readouterr().err
  assert err.startswith(f"clara-jax {argv[0]}: argument --") and len(err.splitlines()) == 1
  assert "must be at least 1" in err or "is not an integer" in err
  assert "Traceback" not in err and not os.listdir(tmp_path)


def test_errors_are_one_line_with_the_exit_code(tmp_path, capsys):
  from clara_jax import cli

  missing = str(tmp_path / "nowhere.jsonl")
  # Bad input: one line naming the command, exit 2; --debug shows the exception itself.
  out = str(tmp_path / "out.json")
  assert cli.main(["evaluate", "--workdir", str(tmp_path), "--data", missing, "--out", out]) == 2
  err = capsys.readouterr().err
  assert err.startswith("clara-jax evaluate: ") and len(err.strip().splitlines()) == 1
  with pytest.raises((FileNotFoundError, ValueError)):
    cli.main(["evaluate", "--workdir", str(tmp_path), "--data", missing, "--out", out, "--debug"])
  assert cli.main(["train", "--workdir", str(tmp_path)]) == 2
  assert "--config=FILE[:variant] is required" in capsys.readouterr().err

  # An unknown config override is a usage error too (absl's flag error, one line).
  config = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "lm.py"
  )
  assert (
    cli.main(
      ["train", f"--config={config}", f"--workdir={tmp_path}", "--config.train.no_such_field=1"]
    )
    == 2
  )
  err = capsys.readouterr().err
  assert err.startswith("clara-jax train: ") and "no_such_field" in err
  assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
  "config", ["configs/stage2.py:tiny", "configs/recipes/demo/stage1.py:quick"]
)
def test_an_unknown_override_field_is_named(config, tmp_path, capsys, monkeypatch):
  """A misspelt `--config.*` field stops the run before anything is written, naming the
  override and the field ml_collections suggests; the variant `tiny` is `model=tiny`,
  and a recipe's stage file loads through the same flag."""
  from clara_jax import cli

  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  workdir = tmp_path / "run"
  argv = [
    "train",
    f"--config={config}",
    "--config.optimizer.lrr=1",
    f"--workdir={workdir}",
  ]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err == (
    'clara-jax train: --config.optimizer.lrr: no such config field (did you mean "lr"?)\n'
  )
  assert not workdir.exists()


def test_subcommand_parsers_are_registered_in_order():
  """Every group's subcommands, in `clara_jax.cli.COMMANDS` order (the help's order)."""
  from clara_jax import cli

  sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
  assert tuple(sub.choices) == cli.COMMANDS
  assert all(sub.choices[name].prog == f"clara-jax {name}" for name in cli.COMMANDS)
