"""`dvc repro` in a copy of the repository, on real data, checked through DVC and MLflow."""
import json
import pickle
import sys

import numpy as np
import torch
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.io.checkpoints import md5
from tests.conftest import TINY, run

K = len(TINY["base.shards"])
MERGERS = ["fedavg", "task_arithmetic", "ties", "uniform"]
FEDERATED = ["fed_fedavg", "fed_fedprox", "fed_scaffold", "fed_fedntd", "fed_gossip_ring"]  # params.yaml's runs


def lock_md5s(root):
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    out = {}
    for stage in lock["stages"].values():
        for entry in stage.get("deps", []) + stage.get("outs", []):
            out[entry["path"]] = entry["md5"]
    return out


def test_metrics_cover_every_model(repro_project):
    metrics = json.loads((repro_project / "results/metrics.json").read_text())
    models = metrics["test"]
    expected = {"pretrained", "ensemble", *MERGERS, *FEDERATED, *(f"expert_{k}" for k in range(K))}
    assert set(models) == expected
    for name, m in models.items():
        assert 0 <= m["accuracy"] <= 1 and m["nll"] > 0 and 0 <= m["ece"] <= 1, name
        assert 0 <= m["brier"] <= 2 and m["temperature"] > 0 and m["nll_scaled"] > 0, name
        assert set(m["shard_accuracy"]) == {f"shard_{k}" for k in range(K)}
    assert models["pretrained"]["accuracy"] > 0.3, "well above chance (0.1) on digits"
    s = metrics["summary"]
    assert s["best_expert_accuracy"] == max(models[f"expert_{k}"]["accuracy"] for k in range(K))
    for m in MERGERS:
        gap = s["merge_gap"][m]["vs_best_expert"]
        assert abs(gap - (models[m]["accuracy"] - s["best_expert_accuracy"])) < 1e-6


def test_plots_and_manifest_are_written(repro_project):
    for png in ("results/comparison.png", "results/reliability.png", "data/prepared/partition.png"):
        assert (repro_project / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    rows = (repro_project / "results/models.csv").read_text().splitlines()
    assert rows[0] == "model,kind,accuracy,nll,ece,brier,temperature,nll_scaled,ece_scaled,probe_accuracy,knn_accuracy"
    assert len(rows) == 1 + 2 + K + len(MERGERS) + len(FEDERATED)
    per_class = (repro_project / "results/per_class.csv").read_text().splitlines()
    assert len(per_class) == 1 + 10 * (2 + K + len(MERGERS) + len(FEDERATED))
    manifest = json.loads((repro_project / "data/prepared/partition.json").read_text())
    assert manifest["num_shards"] == K
    assert sum(s["size"] for s in manifest["shards"]) == sum(sum(s["label_histogram"]) for s in manifest["shards"])
    proc = run([sys.executable, "-m", "dvc", "plots", "show", "-o", "plots_html"], repro_project)
    assert proc.returncode == 0, proc.stderr
    assert (repro_project / "plots_html" / "index.html").exists()


def test_representation_probes_pairs_and_merge_gap(repro_project):
    import csv

    read = lambda name: list(csv.DictReader(open(repro_project / "results" / name)))  # noqa: E731
    models = {r["model"]: r for r in read("models.csv")}
    for name, r in models.items():
        if name == "ensemble":
            assert r["probe_accuracy"] == "" and r["knn_accuracy"] == "", "no single feature space"
        else:
            assert 0.3 < float(r["probe_accuracy"]) <= 1 and 0.3 < float(r["knn_accuracy"]) <= 1, name
    pairs = read("pairs.csv")
    assert len(pairs) == K * (K - 1) // 2
    for p in pairs:
        assert -1 <= float(p["task_vector_cosine"]) <= 1 and 0 <= float(p["sign_conflicts"]) <= 1
        assert float(p["loss_barrier"]) >= 0 and float(p["accuracy_barrier"]) >= 0
    curve = read("interpolation.csv")
    points = yaml.safe_load((repro_project / "params.yaml").read_text())["evaluate"]["interpolation_points"]
    assert len(curve) == len(pairs) * points
    # the curve's endpoints are the experts themselves (BN recomputed on the same data)
    first = [r for r in curve if r["pair"] == "expert_0~expert_1"]
    assert float(first[0]["t"]) == 0 and float(first[-1]["t"]) == 1
    gap = read("merge_gap.csv")
    assert len(gap) == len(MERGERS) * (1 + K)
    metrics = json.loads((repro_project / "results/metrics.json").read_text())["test"]
    for r in gap:
        merged = metrics[r["merger"]]
        acc = merged["accuracy"] if r["split"] == "test" else merged["shard_accuracy"][r["split"]]
        assert abs(float(r["merged"]) - acc) < 1e-6
        assert abs(float(r["merged_minus_best_expert"]) - (acc - float(r["best_expert_accuracy"]))) < 1e-5
    card = (repro_project / "data/prepared/partition_card.md").read_text()
    manifest = json.loads((repro_project / "data/prepared/partition.json").read_text())
    assert f"K = {K}" in card and manifest["content_hash"] in card
    for shard in manifest["shards"]:
        assert f"| {shard['shard']} | {shard['size']} |" in card
    pre = json.loads((repro_project / "data/pretrain/metrics.json").read_text())
    assert 0.3 < pre["val_probe_accuracy"] <= 1 and 0.3 < pre["val_knn_accuracy"] <= 1


def test_up_to_date_pipeline_runs_nothing(repro_project):
    proc = run([sys.executable, "-m", "dvc", "repro"], repro_project)
    assert proc.returncode == 0
    assert "Running stage" not in proc.stdout
    assert "Data and pipelines are up to date" in proc.stdout


def stale_after(root, edit_file, edit):
    path = root / edit_file
    original = path.read_text()
    try:
        path.write_text(edit(original))
        proc = run([sys.executable, "-m", "dvc", "status", "--json"], root)
        return set(json.loads(proc.stdout))
    finally:
        path.write_text(original)


def test_a_stage_reruns_when_its_params_code_or_inputs_change_and_only_then(repro_project):
    mix = stale_after(repro_project, "params.yaml", lambda s: s.replace("mixer: mixup", "mixer: cutmix"))
    assert mix == {f"mix_train@{k}" for k in range(K)}
    merge_param = stale_after(repro_project, "params.yaml", lambda s: s.replace("density: 0.2", "density: 0.3"))
    assert merge_param == {"merge"}
    code = stale_after(repro_project, "pipeline/methods/merge/task_vectors.py", lambda s: s + "\n# touched\n")
    assert code == {"merge", "federate"}  # any merger may be federate's aggregator
    shared = stale_after(repro_project, "pipeline/nn/models.py", lambda s: s + "\n# touched\n")
    assert shared == {"pretrain", "merge", "federate", "evaluate", *(f"mix_train@{k}" for k in range(K))}
    client = stale_after(repro_project, "pipeline/methods/federated/clients.py", lambda s: s + "\n# touched\n")
    assert client == {"federate"}, "a client algorithm's change reruns federate alone (and evaluate after it)"


@pytest.fixture(scope="module")
def mlflow_client(repro_project):
    return MlflowClient(f"sqlite:///{repro_project / 'mlflow.db'}")


def runs_by_stage(client):
    exp = client.get_experiment_by_name("mixmerge")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by = {}
    for r in runs:  # nested runs (one per model) by their role, stage runs by their stage
        by.setdefault(r.data.tags.get("mixmerge.role", r.data.tags.get("mixmerge.stage")), []).append(r)
    return by


def test_mlflow_parent_and_child_runs(mlflow_client):
    by = runs_by_stage(mlflow_client)
    assert len(by["pipeline"]) == 1
    parent = by["pipeline"][0].info.run_id
    stages = ("prepare", "pretrain", "mix_train", "merge", "federate", "evaluate")
    counts = {stage: len(by.get(stage, [])) for stage in stages}
    assert counts == {"prepare": 1, "pretrain": 1, "mix_train": K, "merge": 1, "federate": len(FEDERATED), "evaluate": 1}
    stage_runs = {r.info.run_id for stage in stages for r in by.get(stage, [])}
    for stage, runs in by.items():
        for r in runs:
            if stage in stages:
                assert r.data.tags["mlflow.parentRunId"] == parent
            elif stage == "evaluation":  # a row of its own, tagged with its stage's and pipeline's runs
                assert "mlflow.parentRunId" not in r.data.tags
                assert r.data.tags["mixmerge.stage_run"] in stage_runs and r.data.tags["mixmerge.pipeline_run"] == parent
            elif stage != "pipeline":  # a model's run, under its stage's run
                assert r.data.tags["mlflow.parentRunId"] in stage_runs
                assert r.info.status == "FINISHED"
                assert len(r.data.tags["mixmerge.git_commit"]) == 40
    for stage in stages:  # each stage's computation, within its run's time (the rest is overhead)
        for r in by[stage]:
            run_seconds = (r.info.end_time - r.info.start_time) / 1000
            assert r.data.metrics["compute_seconds"] > 0, (stage, r.info.run_name)
            if stage != "prepare":  # prepare computes before it opens its run
                assert r.data.metrics["compute_seconds"] < run_seconds, (stage, r.info.run_name)
    shard_run = by["mix_train"][0]
    assert "mix_train.mixer" in shard_run.data.params and "base.seed" in shard_run.data.params
    history = mlflow_client.get_metric_history(shard_run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, TINY["mix_train.epochs"] + 1))
    prep = by["prepare"][0]
    assert prep.inputs.dataset_inputs and prep.inputs.dataset_inputs[0].dataset.name == "digits"
    val = mlflow_client.get_metric_history(shard_run.info.run_id, "val_accuracy")
    assert [m.step for m in val] == list(range(1, TINY["mix_train.epochs"] + 1)), "validated after every epoch"
    assert val[-1].value == shard_run.data.metrics["val_accuracy"]
    # each shard is a dataset of its own; evaluate names the test and validation splits
    digests = {r.inputs.dataset_inputs[0].dataset.digest for r in by["mix_train"]}
    assert len(digests) == K
    splits = {d.dataset.name: d.dataset.digest for d in by["evaluate"][0].inputs.dataset_inputs}
    assert set(splits) == {"test", "validation"} and len(set(splits.values())) == 2
    # system metrics, sampled while the stage ran (evaluate takes seconds even on the tiny project)
    assert "system/cpu_utilization_percentage" in by["evaluate"][0].data.metrics
    assert by["evaluate"][0].data.tags["mlflow.source.name"] == "python -m pipeline.evaluate"


def test_mlflow_has_one_comparable_run_per_model(mlflow_client, repro_project):
    """Compare in the MLflow UI puts runs in columns and metric keys in rows: every evaluated
    model is a run of its own, all with the same keys, equal to the table evaluate wrote."""
    import csv

    by = runs_by_stage(mlflow_client)
    evaluated = {r.data.tags["mixmerge.model"]: r for r in by["evaluation"]}
    with (repro_project / "results/models.csv").open() as fh:
        table = {row["model"]: row for row in csv.DictReader(fh)}
    assert set(evaluated) == set(table)
    keys = {"accuracy", "nll", "ece", "brier", "temperature", "nll_scaled", "ece_scaled",
            *(f"shard_{k}_accuracy" for k in range(K))}
    for name, r in evaluated.items():
        expected = keys if name == "ensemble" else keys | {"probe_accuracy", "knn_accuracy"}  # no features
        assert set(r.data.metrics) == expected, name
        assert r.data.metrics["accuracy"] == float(table[name]["accuracy"]), name
        assert r.data.tags["mixmerge.model_kind"] == table[name]["kind"]
        assert r.data.tags["mixmerge.stage_run"] == by["evaluate"][0].info.run_id
    assert not [k for k in by["evaluate"][0].data.metrics if k.startswith(("expert_", "ties.", "fed_"))], \
        "the evaluate run keeps the summary; the models' scores are in their own runs"


def test_each_logged_model_carries_its_own_params_and_metrics(mlflow_client):
    exp = mlflow_client.get_experiment_by_name("mixmerge").experiment_id
    models = {m.name: m for m in mlflow_client.search_logged_models([exp])}
    assert set(models) == set(MERGERS) | {n.removeprefix("fed_") for n in FEDERATED}
    for name in MERGERS:
        m = models[name]
        assert m.params["merger"] == name and not [k for k in m.params if k.startswith("merge.")], name
        metrics = {x.key: x.value for x in m.metrics}
        assert set(metrics) >= {"val_accuracy", "accuracy", "shard_0_accuracy"} and not [k for k in metrics if "." in k], name
    fed = {x.key for x in models["fedavg"].metrics} if "fedavg" in models else set()
    assert not [k for k in fed if k.startswith("system/")]


def test_lineage_is_a_clickable_description(mlflow_client):
    by = runs_by_stage(mlflow_client)
    merge = by["merge"][0]
    note = merge.data.tags["mlflow.note.content"]
    exp = merge.info.experiment_id
    for r in by["mix_train"]:  # each expert's run, as a link of the MLflow UI's own
        assert f"(#/experiments/{exp}/runs/{r.info.run_id})" in note
    ties = next(r for r in by["evaluation"] if r.data.tags["mixmerge.model"] == "ties")
    made_by = next(r for r in by["merged_model"] if r.data.tags["mixmerge.model"] == "ties")
    assert f"(#/experiments/{exp}/runs/{made_by.info.run_id})" in ties.data.tags["mlflow.note.content"]


def test_dvc_plots_have_the_declared_fields(repro_project):
    """Every declared plot loads, and every data point has the plot's x and y (a plot without
    them draws its last column against the row number)."""
    proc = run([sys.executable, "-m", "dvc", "plots", "show", "--json"], repro_project)
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown.get("errors")
    declared = yaml.safe_load((repro_project / "dvc.yaml").read_text())["plots"]
    charts = [d for d in declared if isinstance(d, dict)]
    for d in charts:
        ((title, spec),) = d.items()
        (plot,) = shown["data"][title]
        ((source, y),) = spec["y"].items()
        values = _datapoints(plot["content"])
        assert values, title
        assert all(spec["x"] in v and y in v for v in values), title
        assert spec["template"] == "scatter" or (repro_project / ".dvc/plots" / f"{spec['template']}.json").exists()
    per_shard = next(v for t, v in shown["data"].items() if t.startswith("Test accuracy on the label"))
    assert all(0 <= float(v["accuracy"]) <= 1 for v in _datapoints(per_shard[0]["content"]))


def _datapoints(spec):
    if isinstance(spec, dict):
        values = spec.get("values")
        if isinstance(values, list) and values and isinstance(values[0], dict) and "rev" in values[0]:
            return values
        spec = list(spec.values())
    if isinstance(spec, list):
        for item in spec:
            found = _datapoints(item)
            if found:
                return found
    return None


def test_lineage_walks_back_from_merged_model_to_partition(mlflow_client, repro_project):
    by = runs_by_stage(mlflow_client)
    md5s = lock_md5s(repro_project)
    merge = by["merge"][0].data.tags
    shard_runs = {r.data.params["shard"]: r for r in by["mix_train"]}
    for k in range(K):
        path = f"data/experts/shard_{k}.safetensors"
        expert = shard_runs[str(k)]
        # the merge run names the expert runs that wrote its inputs, and the hashes DVC has
        assert merge[f"mixmerge.input_run.{path}"] == expert.info.run_id
        assert merge[f"mixmerge.dep.{path}"] == md5s[path]
        assert expert.data.tags[f"mixmerge.out.{path}"] == md5s[path]
        # each expert names the pretrain and prepare runs
        assert expert.data.tags["mixmerge.input_run.data/pretrain/model.safetensors"] == by["pretrain"][0].info.run_id
        assert expert.data.tags["mixmerge.input_run.data/prepared/partition.json"] == by["prepare"][0].info.run_id
    merged_runs = {r.data.tags["mixmerge.model"]: r for r in by["merged_model"]}
    for name in MERGERS:  # each merged model's own run wrote it, under the merge run
        path = f"data/merged/{name}.safetensors"
        assert merged_runs[name].data.tags[f"mixmerge.out.{path}"] == md5(repro_project / path)
        assert merged_runs[name].data.tags["mlflow.parentRunId"] == by["merge"][0].info.run_id
    assert by["merge"][0].data.tags["mixmerge.dep.pipeline/methods/merge/task_vectors.py"] == md5s["pipeline/methods/merge/task_vectors.py"]


def test_registered_model_loads_by_alias_and_unpickles_nothing(mlflow_client, repro_project, monkeypatch):
    import mlflow
    from sklearn.datasets import load_digits

    name = "mixmerge-merged"
    aliases = mlflow_client.get_registered_model(name).aliases
    assert set(aliases) >= {"best", *MERGERS}
    calls = []
    for fn in ("load", "loads"):
        orig = getattr(pickle, fn)
        monkeypatch.setattr(pickle, fn, lambda *a, _o=orig, _n=fn, **k: (calls.append(_n), _o(*a, **k))[1])
    # Through the environment, restored after the test: mlflow.set_tracking_uri would also set
    # MLFLOW_TRACKING_URI for the rest of the session, and later flow runs would inherit it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repro_project / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{name}@best")
    digits = load_digits()
    images = (digits.images[:32] / 16.0).astype(np.float32)[:, None]
    probs = model.predict(images)
    assert probs.shape == (32, 10)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == digits.target[:32]).mean() > 0.3
    assert calls == [], "loading the model must not unpickle anything"


def test_host_data_path_reproduces_the_resident_pipeline(repro_project, tmp_path):
    # The same stages with the images left in host memory, memory-mapped, and served by
    # DataLoader worker processes: the same expert, the same merges, the same table.
    import shutil

    from pipeline.io.checkpoints import load_tensors

    root = tmp_path / "host"
    shutil.copytree(repro_project, root, symlinks=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"].update(data_path="host", loader_workers=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "results/models.csv").unlink()
    for cmd in (["mix_train", "--shard", "0"], ["merge"], ["evaluate"]):
        proc = run([sys.executable, "-m", f"pipeline.{cmd[0]}", *cmd[1:]], root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    resident, _ = load_tensors(repro_project / "data/experts/shard_0.safetensors")
    host, _ = load_tensors(root / "data/experts/shard_0.safetensors")
    assert all(torch.equal(resident[n], host[n]) for n in resident)
    assert (root / "results/models.csv").read_text() == (repro_project / "results/models.csv").read_text()


def test_federated_runs_log_each_round_and_register_their_global_model(mlflow_client, repro_project):
    by = runs_by_stage(mlflow_client)
    runs = {r.data.params["name"]: r for r in by["federate"]}
    assert set(runs) == {n.removeprefix("fed_") for n in FEDERATED}
    rounds = TINY["federate.rounds"]
    for name, r in runs.items():
        history = mlflow_client.get_metric_history(r.info.run_id, "test_accuracy")
        assert [m.step for m in history] == list(range(1, rounds + 1)), name
        assert r.data.metrics["final_test_accuracy"] == history[-1].value
    lines = (repro_project / "results/rounds.csv").read_text().splitlines()
    assert len(lines) == 1 + rounds * len(FEDERATED) and lines[0].startswith("run,round,test_accuracy")
    model = mlflow_client.get_registered_model("mixmerge-federated")
    assert set(model.aliases) == set(runs)


def test_dvc_draws_one_line_per_federate_run(repro_project):
    proc = run([sys.executable, "-m", "dvc", "plots", "show", "--json"], repro_project)
    shown = json.loads(proc.stdout)
    assert not [e for e in shown.get("errors", []) if "rounds" in e["source"]], shown.get("errors")
    (plot,) = [p for name, plots in shown["data"].items() if name.startswith("Global test accuracy per round")
               for p in plots]
    spec = plot["content"]
    assert spec["encoding"]["color"]["field"] == "run" and spec["encoding"]["x"]["field"] == "round"
    assert {v["run"] for v in spec["data"]["values"]} == {n.removeprefix("fed_") for n in FEDERATED}


def test_dvc_plots_diff_draws_both_revisions(repro_project, tmp_path):
    """`dvc plots diff` between a committed result and a changed one: every chart carries the
    data points of both revisions (the templates tell them apart by dash, opacity or facet)."""
    import shutil

    root = tmp_path / "project"
    shutil.copytree(repro_project, root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["git", "add", "-A"], [*git, "commit", "-qm", "first results"]):
        assert run(cmd, root).returncode == 0
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["ece_bins"] = 10  # evaluate alone reruns; the reliability bins change
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run([sys.executable, "-m", "dvc", "repro"], root, MLFLOW_TRACKING_URI=store)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run([sys.executable, "-m", "dvc", "plots", "diff", "HEAD", "--json"], root)
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown.get("errors")
    for title, plots in shown["data"].items():
        if plots[0]["type"] != "vega":
            continue
        assert {v["rev"] for v in _datapoints(plots[0]["content"])} == {"HEAD", "workspace"}, title
    reliability = next(p for t, p in shown["data"].items() if t.startswith("Reliability"))
    bins = {rev: {v["bin"] for v in _datapoints(reliability[0]["content"]) if v["rev"] == rev}
            for rev in ("HEAD", "workspace")}
    assert len(bins["HEAD"]) == 15 and len(bins["workspace"]) == 10
