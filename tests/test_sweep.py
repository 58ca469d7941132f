"""The sweep flow on the smoke grid: real cells, one MLflow experiment, a summary over seeds."""
import csv

import pytest
import yaml
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.sweep import CellFolderInUse, cells, mixmerge_sweep


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp, prefect_test_harness(server_startup_timeout=120):
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        first = mixmerge_sweep(grid="smoke", workers=2, out_dir=str(out))
        mtimes = {p: p.stat().st_mtime_ns for p in (out / "smoke").glob("*/results/metrics.json")}
        second = mixmerge_sweep(grid="smoke", workers=2, out_dir=str(out))
    return out / "smoke", uri, first, second, mtimes


def test_every_cell_ran_and_the_summary_averages_over_seeds(swept):
    root, _, first, _, _ = swept
    names = [n for n, _, _ in cells("smoke")]
    assert first["ran"] == len(names) == 4
    for n in names:
        params = yaml.safe_load((root / n / "params.yaml").read_text())
        assert params["mix_train"]["mixer"] in n and f"seed-{params['base']['seed']}" in n
    rows = list(csv.DictReader(open(root / "summary.csv")))
    assert {r["mixer"] for r in rows} == {"none", "mixup"} and all(r["seeds"] == "2" for r in rows)
    import json
    import statistics
    for r in rows:
        accs = [json.loads((root / f"mixer-{r['mixer']}_partition-iid_seed-{s}" / "results/metrics.json")
                           .read_text())["test"]["fedavg"]["accuracy"] for s in (0, 1)]
        assert float(r["fedavg mean"]) == pytest.approx(statistics.fmean(accs), abs=1e-4)
        assert float(r["fedavg std"]) == pytest.approx(statistics.stdev(accs), abs=1e-4)
    assert "± " in (root / "summary.md").read_text()
    assert (root / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_cells_share_one_dvc_cache_and_restore_what_another_cell_computed(swept):
    """The mixer does not touch prepare, pretrain or federate: the mixup cells (run after the
    none cells of the same seeds) restore those from the sweep's run cache and train only."""
    import json

    root, _, _, _, _ = swept
    for seed in (0, 1):
        none = json.loads((root / f"mixer-none_partition-iid_seed-{seed}" / "stages.json").read_text())
        mixup = json.loads((root / f"mixer-mixup_partition-iid_seed-{seed}" / "stages.json").read_text())
        assert none["restored"] == [] and "pretrain" in none["ran"]
        assert sorted(mixup["restored"]) == ["federate", "prepare", "pretrain"]
        assert mixup["ran"] == ["mix_train@0", "mix_train@1", "merge", "evaluate"]
        for stage_output in ("data/pretrain/model.safetensors", "data/federated/fedavg.safetensors"):
            assert ((root / f"mixer-none_partition-iid_seed-{seed}" / stage_output).read_bytes()
                    == (root / f"mixer-mixup_partition-iid_seed-{seed}" / stage_output).read_bytes())
    assert (root.parent / ".dvc-cache" / "runs").is_dir()


def test_all_cells_are_in_one_mlflow_experiment(swept):
    _, uri, _, _, _ = swept
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mixmerge-sweep-smoke")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    pipelines = [r for r in runs if r.data.tags.get("mixmerge.pipeline_key")]
    # stage runs hang under their cell's pipeline run; per-model runs under their stage's run
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") and not r.data.tags.get("mixmerge.role")]
    seeds = {r.data.params.get("base.seed") for r in stage_runs if r.data.params.get("base.seed")}
    assert seeds == {"0", "1"}
    assert len({r.data.tags["mlflow.parentRunId"] for r in stage_runs}) == 4, "one parent per cell"
    assert any(r.info.run_name == "sweep-smoke-summary" for r in runs)
    assert len(pipelines) == 4


def test_a_second_sweep_resumes_and_leaves_results_alone(swept, tmp_path):
    root, _, _, second, mtimes = swept
    assert second["ran"] == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    cell = next(root.glob("mixer-none*"))
    from flows.sweep import prepare_cell
    params = yaml.safe_load((cell / "params.yaml").read_text())
    params["mix_train"]["epochs"] = 99
    with pytest.raises(CellFolderInUse, match="other params"):
        prepare_cell(cell, params)


def test_a_cell_runs_the_stages_dvc_yaml_declares_in_its_order(tmp_path):
    """A stage added to dvc.yaml is run by the sweep without touching the sweep's code."""
    from flows.sweep_cell import plan

    from tests.conftest import REPO

    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc_yaml["stages"]["card"] = {"cmd": "python -m pipeline.report", "deps": ["results/metrics.json"]}
    source = tmp_path / "dvc.yaml"
    source.write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    cell = tmp_path / "cell"
    cell.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["shards"] = [0, 1, 2, 3, 4]
    (cell / "params.yaml").write_text(yaml.safe_dump(params))
    assert plan(cell, source) == [
        ("pipeline.prepare", []), ("pipeline.pretrain", []), ("pipeline.federate", []),
        ("pipeline.mix_train", ["--shard", "0", "1", "2", "3", "4"]),  # the cell's K, one stacked call
        ("pipeline.merge", []), ("pipeline.evaluate", []), ("pipeline.report", []),
    ]
