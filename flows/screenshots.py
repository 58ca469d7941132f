"""Screenshots of the three UIs after the default experiment, taken with headless Chromium
(Debian's package): MLflow's Compare view of every evaluated model, the DVC plots page, and the
Prefect flow run (task graph, streamed logs, results artifact). The README shows them.

Runs the default experiment in a fresh copy of the project (nothing here is touched), with a
Prefect server that serves its UI and an `mlflow server` on the copy's store, both stopped at
the end. Takes about two minutes on 2 CPU cores.

Run: python -m flows.screenshots [--out docs/screenshots] [--chromium chromium]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[1]


def shoot(chromium: str, url: str, out: Path, size: str = "1600,1000", wait_ms: int = 20000) -> None:
    """One page as a PNG; virtual time lets the single-page apps fetch and draw first."""
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--virtual-time-budget={wait_ms}", f"--window-size={size}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"{out}  <-  {url}")


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def main() -> None:
    cli = argparse.ArgumentParser(prog="python -m flows.screenshots", description=__doc__.split("\n\n")[0])
    cli.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    cli.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = cli.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from bench.workspace import make_project
    from flows.local_server import _free_port, prefect_api

    with tempfile.TemporaryDirectory(prefix="mixmerge-shots-") as tmp:
        root = make_project(Path(tmp), {})
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        with prefect_api(ui=True) as api:
            from flows.pipeline_flow import mixmerge_pipeline

            summary = mixmerge_pipeline(project_dir=str(root))
            # the flow run page: task graph, streamed logs, the results artifact
            prefect_ui = api.removesuffix("/api")
            shoot(args.chromium, f"{prefect_ui}/runs/flow-run/{summary['prefect_flow_run']}",
                  args.out / "prefect_flow_run.png", size="1600,1100")
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

            with get_client(sync_client=True) as prefect:
                (artifact,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[summary["prefect_flow_run"]])))
            shoot(args.chromium, f"{prefect_ui}/artifacts/artifact/{artifact.id}", args.out / "prefect_artifact.png",
                  size="1600,1100")

        port = _free_port()
        mlflow_ui = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                                      str(port), "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
                                      "--workers", "1"], cwd=root, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(f"{base}/health")
            from mlflow import MlflowClient

            client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
            exp = client.get_experiment_by_name("mixmerge").experiment_id
            models = client.search_runs([exp], f"tags.`mixmerge.role` = 'evaluation' and "
                                                f"tags.`mixmerge.pipeline_run` = '{summary['mlflow_parent_run']}'",
                                        order_by=["attributes.run_name ASC"])
            runs = json.dumps([r.info.run_id for r in models])
            query = urllib.parse.urlencode({"runs": runs, "experiments": json.dumps([exp])})
            shoot(args.chromium, f"{base}/#/compare-runs?{query}", args.out / "mlflow_compare.png", size="1600,1400")
            # the runs table filtered to the models, in chart view: a bar per model for each metric
            search = urllib.parse.urlencode({"searchFilter": "tags.mixmerge.role = 'evaluation'",
                                             "compareRunsMode": "CHART"}, quote_via=urllib.parse.quote)
            shoot(args.chromium, f"{base}/#/experiments/{exp}/runs?{search}", args.out / "mlflow_charts.png",
                  size="1600,1200", wait_ms=60000)
            ties = next(r for r in models if r.data.tags["mixmerge.model"] == "ties")
            shoot(args.chromium, f"{base}/#/experiments/{exp}/runs/{ties.info.run_id}",
                  args.out / "mlflow_model_run.png", size="1600,1000")
        finally:
            mlflow_ui.terminate()
            mlflow_ui.wait(timeout=30)

        plots = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(root / "plots")],
                               cwd=root, capture_output=True, text=True)
        if plots.returncode:
            raise RuntimeError(f"dvc plots show failed: {plots.stderr.strip()}")
        shoot(args.chromium, (root / "plots" / "index.html").as_uri(), args.out / "dvc_plots.png",
              size="1500,2300", wait_ms=8000)


if __name__ == "__main__":
    main()
