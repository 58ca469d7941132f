"""The federate stage as a user runs it: a real process on the real (tiny) project, killed
and started again, and refused on bad input before any computation."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.io.checkpoints import load_metadata
from tests.conftest import TINY, make_project, run, subprocess_env

RUNS = {"scaffold": {"algorithm": "scaffold"}, "ring": {"topology": "ring"}}
SETTINGS = {**TINY, "federate.rounds": 24, "federate.runs": RUNS, "federate.registered_model": None,
            "federate.sample_fraction": 0.67}


@pytest.fixture(scope="module")
def pretrained_project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("federate"), SETTINGS)
    for stage in ("prepare", "pretrain"):
        proc = run([sys.executable, "-m", f"pipeline.{stage}"], root)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def outputs(root):
    files = sorted((root / "data/federated").glob("*.safetensors"))
    return {f.name: f.read_bytes() for f in files} | {"rounds.csv": (root / "results/rounds.csv").read_bytes()}


def test_a_killed_run_resumes_from_its_last_round_and_ends_byte_identical(pretrained_project):
    root = pretrained_project
    proc = run([sys.executable, "-m", "pipeline.federate"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    straight = outputs(root)
    assert set(straight) == {"scaffold.safetensors", "ring.safetensors", "rounds.csv"}
    assert not list((root / ".mixmerge/checkpoints/federate").glob("*")), "checkpoints removed after success"
    table = list(csv.DictReader((root / "results/rounds.csv").open()))
    for name in RUNS:
        rows = [r for r in table if r["run"] == name]
        assert [r["round"] for r in rows] == [str(i) for i in range(1, 25)] and {r["run"] for r in rows} == {name}
        assert {r["clients"] for r in rows} == ({"2"} if name == "scaffold" else {"3"})  # int(0.67 * 3); every node
        assert all(r["node_test_accuracy"] for r in rows) == (name == "ring")

    checkpoint = root / ".mixmerge/checkpoints/federate/scaffold.safetensors"
    child = subprocess.Popen([sys.executable, "-m", "pipeline.federate"], cwd=root, env=subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_after = None
    while time.time() < deadline and child.poll() is None:
        if checkpoint.exists():
            try:
                killed_after = load_metadata(checkpoint)["round"]
            except Exception:  # noqa: BLE001  (read while being replaced: try again)
                killed_after = None
            if killed_after is not None and killed_after >= 3:
                os.kill(child.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run was killed mid-way"
    assert 3 <= killed_after < 24

    resumed = run([sys.executable, "-m", "pipeline.federate"], root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "scaffold: resuming after round" in resumed.stdout
    assert outputs(root) == straight


def test_a_checkpoint_of_another_configuration_is_not_resumed(pretrained_project):
    """A checkpoint whose fingerprint (configuration, inputs) differs is ignored: the run
    starts over instead of continuing someone else's rounds."""
    from pipeline.io.round_checkpoints import save_round
    from pipeline.train.rounds import RoundState

    root = pretrained_project
    params = (root / "params.yaml").read_text()
    checkpoint = root / ".mixmerge/checkpoints/federate/ring.safetensors"
    save_round(checkpoint, RoundState(1, {}), [], "another configuration")
    try:
        (root / "params.yaml").write_text(params.replace("rounds: 24", "rounds: 7").replace("eval_every: 1", "eval_every: 3"))
        again = run([sys.executable, "-m", "pipeline.federate"], root)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "resuming" not in again.stdout and not checkpoint.exists()
        rows = [r for r in csv.DictReader((root / "results/rounds.csv").open()) if r["run"] == "ring"]
        assert [r["round"] for r in rows] == ["3", "6", "7"], "every eval_every rounds, and the last"
    finally:
        (root / "params.yaml").write_text(params)


BAD = [
    ({"federate.runs": {"a": {"algorithm": "fedgold"}}}, "federate.runs.a.algorithm = 'fedgold': allowed: fedavg"),
    ({"federate.runs": {"a": {"topology": "star"}}}, "federate.runs.a.topology = 'star': allowed: complete"),
    ({"federate.sample_fraction": 0}, "federate.sample_fraction = 0: Input should be greater than 0"),
    ({"federate.sample_fraction": 1.5}, "federate.sample_fraction = 1.5"),
    ({"federate.rounds": 0}, "federate.rounds = 0"),
    ({"federate.local_epochs": -2}, "federate.local_epochs = -2"),
    ({"federate.runs": {"a": {"algorithm": "scaffold", "aggregator": {"method": "ties"}}}},
     "federate.runs.a.aggregator = 'ties': scaffold's server update assumes an average"),
    ({"federate.runs": {"a": {"algorithm": "fedprox", "mu": -1}}}, "federate.runs.a.mu = -1"),
    ({"federate.runs": {"a": {"topology": "torus"}}}, "federate.runs.a.topology = 'torus': a torus needs K = r x c"),
    ({"federate.runs": {"a": {"topology": "random", "peers": 3}}}, "peers = 3 must be below K = 3"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_input_is_refused_in_one_line_before_any_computation(tmp_path, override, message):
    root = make_project(tmp_path, {**SETTINGS, **override})  # no data at all: nothing may be read
    proc = run([sys.executable, "-m", "pipeline.federate"], root)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (root / "data/federated").exists() and not (root / ".mixmerge").exists()
