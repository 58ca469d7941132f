"""The tree's contracts: dvc.yaml names the paths pipeline/io/layout.py writes and the sources
each stage imports; the import layers of pipeline/ hold (import-linter)."""
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.io import layout
from pipeline.runtime import stage_deps
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
                layout.INTERPOLATION_PNG, layout.FEDERATED, layout.ROUNDS_CSV, layout.TRAINING_CSV}
    expected = {str(p) for p in expected} | {"data/experts/shard_${item}.safetensors", "data/history/shard_${item}.csv"}
    assert declared_outputs() == expected
    assert str(layout.expert(3)) == "data/experts/shard_3.safetensors"
    assert str(layout.expert_history(3)) == "data/history/shard_3.csv"


def test_stage_deps_list_every_source_file_the_stage_imports(tmp_path):
    """DVC cannot see Python imports: a stage's deps must name every module it runs, and only
    those (pipeline.runtime.stage_deps reads the imports; `--write` fixes dvc.yaml)."""
    assert stage_deps.differences() == {}
    assert "pipeline/train/engine.py" in stage_deps.stage_sources("mix_train")
    assert "pipeline/methods/merge/task_vectors.py" not in stage_deps.stage_sources("mix_train")
    assert "pipeline/methods/__init__.py" in stage_deps.stage_sources("prepare"), "package __init__ files run too"
    stale = tmp_path / "dvc.yaml"
    stale.write_text((REPO / "dvc.yaml").read_text().replace("      - pipeline/nn/inference.py\n", "", 1))
    missing = stage_deps.differences(stale)
    assert missing and all(m == (["pipeline/nn/inference.py"], []) for m in missing.values())


def lint_imports(root):
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=root, capture_output=True, text=True)


def test_the_layer_contract_holds_and_fails_when_pure_code_does_io(tmp_path):
    ok = lint_imports(REPO)
    assert ok.returncode == 0, ok.stdout[-2000:]
    assert "2 kept, 0 broken" in ok.stdout
    shutil.copytree(REPO / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    merger = tmp_path / "pipeline" / "methods" / "merge" / "averaging.py"
    merger.write_text(merger.read_text() + "\nfrom pipeline.io import layout  # a merger that reads files\n")
    broken = lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "pipeline.methods.merge.averaging -> pipeline.io.layout" in broken.stdout
    assert "2 broken" in broken.stdout  # both the layers and the purity contract
