"""The source files each DVC stage runs, read from the imports, and dvc.yaml's deps kept equal.

DVC cannot see Python imports: a stage's deps must name every file of ``pipeline/`` its
process may import (package ``__init__.py`` files included), or a change to shared code would
not rerun it. This walks the import graph from ``pipeline/<stage>.py``, function-level imports
included, except those inside ``pipeline/runtime/config.py``'s validators: each imports the
registry of the section it validates, which the stage reading that section imports itself.

    python -m pipeline.runtime.stage_deps          # exit 1 and the differences if dvc.yaml is stale
    python -m pipeline.runtime.stage_deps --write  # rewrite the deps lists (comments kept)
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "pipeline.runtime.config"
# Files a stage runs without importing them: merge logs pipeline/io/serving.py to MLflow as
# the code of the model it registers.
RUNS_WITHOUT_IMPORT = {"merge": ["pipeline/io/serving.py"], "federate": ["pipeline/io/serving.py"]}


def module_file(module: str) -> Path | None:
    """The file of a ``pipeline`` module or package, or None if there is none."""
    base = ROOT / module.replace(".", "/")
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imported(module: str, tree: ast.Module) -> set[str]:
    """The pipeline modules one file imports (``from p import name`` counts p.name when that
    is a module)."""
    skip: set[int] = set()
    if module == CONFIG:  # registry look-ups of the validators (see the module docstring)
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                skip |= {id(n) for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)}
    for block in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "pipeline":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def stage_sources(stage: str) -> list[str]:
    """Every ``pipeline/`` file that ``python -m pipeline.<stage>`` may import, sorted."""
    seen: set[str] = set()
    todo = [f"pipeline.{stage}"]
    while todo:
        module = todo.pop()
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents' __init__ run first
        f = module_file(module)
        if module in seen or f is None:
            continue
        seen.add(module)
        todo += sorted(_imported(module, ast.parse(f.read_text())))
    files = {str(module_file(m).relative_to(ROOT)) for m in seen}
    return sorted(files | set(RUNS_WITHOUT_IMPORT.get(stage, [])))


def _stages(doc) -> dict:
    """dvc.yaml's stage bodies by stage name (a foreach stage's ``do`` body)."""
    return {name: (stage["do"] if "do" in stage else stage) for name, stage in doc["stages"].items()}


def differences(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (source files missing from its deps, listed source files it does not import)."""
    import yaml

    out = {}
    for name, body in _stages(yaml.safe_load(dvc_yaml.read_text())).items():
        listed = {d for d in body.get("deps", []) if d.startswith("pipeline/")}
        needed = set(stage_sources(name))
        if listed != needed:
            out[name] = (sorted(needed - listed), sorted(listed - needed))
    return out


def write(dvc_yaml: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each stage's source deps in place, keeping its data deps and every comment."""
    from ruamel.yaml import YAML  # DVC's own YAML library: it keeps comments and layout

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    doc = y.load(dvc_yaml.read_text())
    for name, body in _stages(doc).items():
        data = [d for d in body["deps"] if not d.startswith("pipeline/")]
        body["deps"].clear()
        body["deps"].extend(stage_sources(name) + data)
    with dvc_yaml.open("w") as f:
        y.dump(doc, f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.runtime.stage_deps", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite dvc.yaml's deps lists")
    args = p.parse_args(argv)
    if args.write:
        write()
        return 0
    diff = differences()
    for stage, (missing, extra) in diff.items():
        print(f"{stage}: missing {missing}; not imported {extra}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
