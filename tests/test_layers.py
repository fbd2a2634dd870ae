"""The package's floors: a module imports only from its own floor or the ones below
(function-level imports included), so no lower part depends on a higher one."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "clara_jax"
# Lowest first; a top-level module or subpackage of clara_jax (or one module in it,
# which then sits apart from its package) -> its floor. The stage1 study runs the
# real-data pipeline, so it sits with the pipeline runner.
FLOORS = (
  ("paths", "progress", "partitioning"),
  ("model", "ops", "data"),
  ("weights",),
  ("infer",),
  ("train",),
  ("eval",),
  ("pipeline", "eval.stage1_study"),
  ("bench",),
  ("cli",),
)
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def _part(module: str) -> str:
  """'clara_jax.model.decoder' -> 'model' (or 'eval.stage1_study' where placed apart)."""
  parts = module.split(".")
  return ".".join(parts[1:3]) if ".".join(parts[1:3]) in FLOOR else parts[1]


def _imports(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    else:
      continue
    for name in names:
      if name.startswith("clara_jax.") and _part(name) in FLOOR:
        yield node.lineno, name


def test_no_module_imports_from_a_higher_floor():
  upward = []
  for path in sorted(ROOT.rglob("*.py")):
    rel = path.relative_to(ROOT)
    if rel.name == "__init__.py" and len(rel.parts) == 1:
      continue
    part = _part("clara_jax." + ".".join(rel.with_suffix("").parts))
    assert part in FLOOR, f"clara_jax/{rel}: not placed on a floor in FLOORS"
    for line, name in _imports(path):
      if FLOOR[_part(name)] > FLOOR[part]:
        upward.append(f"clara_jax/{rel}:{line} imports {name}")
  assert upward == []
