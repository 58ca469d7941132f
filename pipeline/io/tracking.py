"""MLflow record of a stage run, with lineage. Created in a stage's main() and passed down.

Layout: one parent run per pipeline run, one child run per stage (and per shard).
- Parent: the flow creates it and passes MIXMERGE_PARENT_RUN_ID. Under a plain `dvc repro`
  the stages find or create a parent keyed by (git commit, params.yaml content), so stages
  of one configuration share it.
- Lineage tags on every child run:
    mixmerge.git_commit             the commit the code ran at
    mixmerge.dep.<path> = <md5>     each input file and the hash DVC records for it
    mixmerge.out.<path> = <md5>     each output file and its hash
    mixmerge.input_run.<path> = id  the run that wrote that input (found by its out tag)
  so from the merged model one can walk back to each expert, the backbone and the partition.
Store: MLFLOW_TRACKING_URI, else a SQLite file in the project (mlflow.db, ignored by git).
Metrics are sent in batches (one log_batch per call site), never one call per step.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from pipeline.io.checkpoints import md5
from pipeline.io.errors import DataError, TrackingUnavailable

EXPERIMENT_ENV = "MIXMERGE_EXPERIMENT"
PARENT_ENV = "MIXMERGE_PARENT_RUN_ID"
DEFAULT_EXPERIMENT = "mixmerge"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def loaded_sources(root: Path) -> list[str]:
    """Project-relative paths of the pipeline modules imported by this process: the code
    the stage ran, as dvc.yaml lists it in the stage's deps."""
    out = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith("pipeline.") and path:
            try:
                out.append(Path(path).resolve().relative_to(root.resolve()).as_posix())
            except ValueError:  # imported from outside this project
                continue
    return sorted(out)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside its database file (the project's mlartifacts/
    for the default store, a test's temporary folder for a test's store); a tracking server
    decides for itself (proxied artifact storage)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(client, root: Path, name: str | None = None) -> str:
    name = name or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri(root)))
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


def start_pipeline_run(client, experiment_id: str, key: str, tags: dict[str, str] | None = None):
    return client.create_run(
        experiment_id,
        run_name=f"pipeline-{key[:8]}",
        tags={"mixmerge.role": "pipeline", "mixmerge.pipeline_key": key, **(tags or {})},
    )


def store_guarded(fn):
    """A tracking call that fails (store down, timed out, corrupt, read-only) becomes one
    TrackingUnavailable naming the store, instead of minutes of retries and a long traceback:
    MLflow's HTTP retries are bounded (pipeline.runtime.cli.bounded_tracking_waits)."""
    import functools

    @functools.wraps(fn)
    def guarded(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except (TrackingUnavailable, DataError):
            raise
        except Exception as e:  # noqa: BLE001  (MLflow, requests and SQLAlchemy errors alike)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise TrackingUnavailable(f"tracking store {self.uri} is unreachable or unusable "
                                      f"({type(e).__name__}: {first})") from None

    return guarded


def ui_base(uri: str) -> str:
    """Where the MLflow UI for a store is: the tracking server itself, or, for a SQLite file,
    `mlflow ui --backend-store-uri <uri>` on its default address."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A Markdown link to a run that the MLflow UI renders in a run's description (a route of
    the UI's own, so it works whichever host serves it)."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id})"


class Tracker:
    """One child run for one stage (or shard) of the pipeline, or, with ``parent``, a run nested
    under another stage's run (one per merged model, one per evaluated model). Every call to
    the store is guarded (store_guarded): an outage stops the stage in seconds with one line.

    A stage's own run (no ``parent``) samples CPU, memory, disk, network and, where NVIDIA's
    management library is present, GPU use into system/* metrics (MLflow's own monitor;
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides our 1 s: stages are short)."""

    SYSTEM_METRICS_INTERVAL_S = 1.0

    def __init__(self, stage: str, run_name: str, root: str | Path = ".", params_file: str | Path = "params.yaml",
                 parent: "Tracker | None" = None, tags: dict[str, str] | None = None, nest: bool = True):
        self.root = Path(root)
        self.nest = nest
        self.uri = tracking_uri(self.root)
        self.parent, self.extra_tags = parent, dict(tags or {})
        self.monitor = None
        self._connect(stage, run_name, params_file)

    @store_guarded
    def _connect(self, stage: str, run_name: str, params_file: str | Path) -> None:
        import mlflow  # imported here: it costs seconds, and pure code never needs it
        from mlflow import MlflowClient

        self.mlflow, self.stage, self.run_name = mlflow, stage, run_name
        self.params_file = Path(params_file)
        if self.parent is not None:  # one client and experiment per process
            self.client, self.experiment_id = self.parent.client, self.parent.experiment_id
        else:
            mlflow.set_tracking_uri(self.uri)
            self.client = MlflowClient()
            self.experiment_id = ensure_experiment(self.client, self.root)
        self.run_id: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @store_guarded
    def __enter__(self) -> "Tracker":
        if self.parent is not None:
            commit, parent = self.parent.commit, self.parent.run_id
        else:
            commit = git_commit(self.root)
            parent = os.environ.get(PARENT_ENV) or self._find_or_create_parent(commit)
        self.commit, self.parent_run_id = commit, parent
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.run_name,
            tags={
                **({"mlflow.parentRunId": parent} if self.nest else {}),
                "mixmerge.stage": self.stage,
                "mixmerge.git_commit": commit,
                "mlflow.source.git.commit": commit,
                # the Source column: what ran, as the user would type it
                "mlflow.source.name": f"python -m pipeline.{self.stage}",
                "mlflow.source.type": "LOCAL",
                **self.extra_tags,
            },
        )
        self.run_id = run.info.run_id
        if self.parent is None:
            self._start_system_metrics()
        return self

    def _start_system_metrics(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.SYSTEM_METRICS_INTERVAL_S,
                                            tracking_uri=self.uri)
        self.monitor.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is TrackingUnavailable:
            return  # the store is gone: marking the run would only wait for it again
        if self.monitor is not None:
            self.monitor.finish()  # its last samples are flushed before the run ends
        self._terminate("FAILED" if exc_type else "FINISHED")

    def nested(self, run_name: str, tags: dict[str, str] | None = None, listed: bool = False) -> "Tracker":
        """A run under this one, sharing its store and commit (enter it with ``with``).

        ``listed``: a top-level row of the runs table instead, tagged with this run
        (``mixmerge.stage_run``) and the pipeline run (``mixmerge.pipeline_run``). The UI folds
        nested runs under their parent, and its chart view draws only the rows it shows: runs
        meant to be compared side by side must be rows of their own."""
        extra = {"mixmerge.stage_run": self.run_id, "mixmerge.pipeline_run": self.parent_run_id} if listed else {}
        return Tracker(self.stage, run_name, self.root, self.params_file, parent=self, tags={**(tags or {}), **extra},
                       nest=not listed)

    @store_guarded
    def _terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    @store_guarded
    def _find_or_create_parent(self, commit: str) -> str:
        params = self.params_file.read_bytes() if self.params_file.exists() else b""
        key = hashlib.sha256(commit.encode() + b"\0" + params).hexdigest()[:16]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mixmerge.pipeline_key` = '{key}' and tags.`mixmerge.role` = 'pipeline'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = start_pipeline_run(self.client, self.experiment_id, key, {"mixmerge.git_commit": commit})
        self.client.set_terminated(run.info.run_id, "FINISHED")  # a record, not a live process
        return run.info.run_id

    # -- logging ---------------------------------------------------------------------------
    @store_guarded
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @store_guarded
    def log_metrics(self, metrics: dict[str, float], step: int = 0, model_id: str | None = None) -> None:
        self.log_history({k: [v] for k, v in flatten(metrics).items()}, first_step=step, model_id=model_id)

    @store_guarded
    def log_history(self, series: dict[str, list[float]], first_step: int = 1, model_id: str | None = None) -> None:
        """Per-epoch series, all sent in as few log_batch calls as MLflow allows; with
        ``model_id`` the values also belong to that logged model (MLflow 3)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(v), now, first_step + i, model_id=model_id)
            for key, values in series.items()
            for i, v in enumerate(values)
        ]
        for i in range(0, len(items), 1000):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    @store_guarded
    def log_artifacts(self, paths: Iterable[str | Path], subdir: str | None = None) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path=subdir)

    @store_guarded
    def log_dataset(self, name: str, path: str | Path, digest: str, context: str) -> None:
        """Record a dataset input by name, source file and our own content digest."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        ds = MetaDataset(LocalArtifactDatasetSource(str(Path(path).resolve())), name=name, digest=digest[:36])
        inputs = [DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])]
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except Exception as e:  # noqa: BLE001
                # Shards started at once insert the same dataset (the validation split) at once;
                # MLflow's SQL store gets-or-creates it in two steps, so one of them meets the
                # other's row (UNIQUE constraint). Again, it finds the row and links it.
                if "UNIQUE constraint" not in str(e) and "IntegrityError" not in str(e) or attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))

    # -- lineage ---------------------------------------------------------------------------
    @store_guarded
    def record_inputs(self, files: Iterable[str | Path]) -> dict[str, str]:
        """Tag each input's md5 and the run that produced it, and the md5 of every pipeline
        source file this process has loaded; returns {path: producing run id}."""
        tags, producers = {}, {}
        for f in files:
            key, digest = str(f), md5(f)
            tags[f"mixmerge.dep.{key}"] = digest
            producer = self.producer_of(key, digest)
            if producer:
                tags[f"mixmerge.input_run.{key}"] = producer
                producers[key] = producer
        for f in loaded_sources(self.root):
            tags[f"mixmerge.dep.{f}"] = md5(self.root / f)
        if producers:
            tags["mixmerge.input_runs"] = ",".join(sorted(set(producers.values())))
            tags["mlflow.note.content"] = self.lineage_markdown(producers)
        self._set_tags(tags)
        return producers

    def lineage_markdown(self, producers: dict[str, str], heading: str = "Inputs and the runs that wrote them") -> str:
        """The run's description: each input a link to the run that wrote it (the UI renders
        Markdown there; the tags hold the same ids for the API)."""
        names = {run: self.client.get_run(run).info.run_name for run in set(producers.values())}
        lines = [f"**{heading}** (mixmerge lineage, commit `{self.commit[:10]}`)", ""]
        lines += [f"- `{path}` <- {run_link(self.experiment_id, run, f'{names[run]} ({run[:8]})')}"
                  for path, run in sorted(producers.items())]
        return "\n".join(lines)

    @store_guarded
    def describe(self, producers: dict[str, str], heading: str = "Inputs and the runs that wrote them",
                 extra: str = "") -> None:
        """Write the lineage description, and the input tags, so the API walks back from a
        nested run as from its stage's run."""
        tags = {f"mixmerge.input_run.{path}": run for path, run in producers.items()}
        tags["mlflow.note.content"] = self.lineage_markdown(producers, heading) + (f"\n\n{extra}" if extra else "")
        self._set_tags(tags)

    @store_guarded
    def record_outputs(self, files: Iterable[str | Path]) -> None:
        self._set_tags({f"mixmerge.out.{f}": md5(f) for f in files})

    @store_guarded
    def producer_of(self, path: str, digest: str) -> str | None:
        """The latest finished run whose out tag says it wrote this exact file content."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mixmerge.out.{path}` = '{digest}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return found[0].info.run_id if found else None

    @store_guarded
    def logged_model_of(self, run_id: str | None) -> str | None:
        """The id of the registered model a run logged (merge's per-model runs and federate's
        runs log one each), or None."""
        if not run_id:
            return None
        found = self.client.search_logged_models([self.experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                                 max_results=1)
        return found[0].model_id if found else None

    @store_guarded
    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])
