"""dvc.yaml and pipeline/layout.py must name the same artifact paths."""
import ast

import yaml

from pipeline import layout
from tests.conftest import REPO


def declared_outputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    paths = set()
    for stage in stages.values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind, []):
                paths.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def test_every_stage_output_is_declared_in_dvc_yaml():
    expected = {layout.DATASET, layout.MANIFEST, layout.PARTITION_PNG, layout.PRETRAINED, layout.PRETRAIN_HISTORY,
                layout.PRETRAIN_METRICS, layout.MERGED, layout.METRICS, layout.MODELS_CSV, layout.SHARDS_CSV,
                layout.RELIABILITY_CSV, layout.PER_CLASS_CSV, layout.COMPARISON_PNG, layout.RELIABILITY_PNG,
                layout.PARTITION_CARD, layout.MERGE_GAP_CSV, layout.PAIRS_CSV, layout.INTERPOLATION_CSV,
                layout.INTERPOLATION_PNG}
    expected = {str(p) for p in expected} | {"data/experts/shard_${item}.safetensors", "data/history/shard_${item}.csv"}
    assert declared_outputs() == expected
    assert str(layout.expert(3)) == "data/experts/shard_3.safetensors"
    assert str(layout.expert_history(3)) == "data/history/shard_3.csv"


def pipeline_imports(module: str) -> set[str]:
    """Modules of pipeline/ that `module` imports, directly or not (read from the source)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or not (REPO / "pipeline" / f"{name}.py").exists():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((REPO / "pipeline" / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")]
    return seen


def test_stage_deps_list_every_source_file_the_stage_imports():
    """DVC cannot see Python imports: a stage's deps must name every module it runs."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        deps = set(stage.get("do", stage)["deps"])
        needed = {f"pipeline/{m}.py" for m in pipeline_imports(name)}
        assert needed - deps == set(), f"{name} imports but does not depend on {sorted(needed - deps)}"
