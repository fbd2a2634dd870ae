"""The CLaRa pipeline runner: a recipe directory in (`configs/recipes/<name>/`), its
stages trained in order, its evaluation, the claims table out.

    from clara_jax.pipeline import run
    summary = run.run("demo", "/tmp/demo", quick=True)

* `recipe`: a recipe directory read into a `Recipe`, and a stage's config from it;
* `stages`: one stage trained, resumable, skipped once finished;
* `real_data`: the real QA files converted, split and written for the stages; a
  pretrained base imported; the stage1_2 compressor's memory cache;
* `world`: the generated world's held-out questions and its causal edit;
* `evaluation`: the evaluations a recipe names, each with its claims;
* `report`: the claims table, `summary.json` and `losses.png`;
* `run`: the runner, one seed or several pooled.
"""
