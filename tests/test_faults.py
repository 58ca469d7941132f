"""Faults a real user meets, on real processes: for each, what "nothing lost" means is checked.

Diverged training: a model with NaN or infinite values is never saved, merged or registered;
the stage stops with exit 2 and one line naming the model and its first bad tensor, and the
outputs already there stay as they were.
"""
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import TINY, make_project, run, set_key  # noqa: F401


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory):
    """The tiny project up to its experts, one process per stage, as dvc repro runs them."""
    root = make_project(tmp_path_factory.mktemp("faults"), {**TINY, "merge.registered_model": None})
    for cmd in (["prepare"], ["pretrain"], ["mix_train", "--shard", "0", "1", "2"]):
        proc = run([sys.executable, "-m", f"pipeline.{cmd[0]}", *cmd[1:]], root)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def with_params(root, **overrides):
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    for k, v in overrides.items():
        set_key(params, k, v)
    path = root / "diverging.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


def test_a_diverged_expert_is_not_saved_and_the_earlier_one_is_kept(trained_project):
    root = trained_project
    expert = root / "data/experts/shard_0.safetensors"
    before = expert.read_bytes()
    proc = run([sys.executable, "-m", "pipeline.mix_train", "--shard", "0",
                "--params", with_params(root, **{"mix_train.lr": 1e6})], root)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]  # beside the progress lines
    assert len(errors) == 1 and errors[0].startswith("mix_train: error: data/experts/shard_0.safetensors: tensor")
    assert "NaN or infinite" in errors[0] and "Traceback" not in proc.stderr
    assert expert.read_bytes() == before, "the earlier expert is untouched"
    assert not list((root / "data/experts").glob(".*tmp")), "no temporary file left"


def test_merge_refuses_a_non_finite_expert_and_writes_nothing(trained_project):
    root = trained_project
    expert = root / "data/experts/shard_1.safetensors"
    original = expert.read_bytes()
    with safe_open(str(expert), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["classifier.weight"][0, 0] = float("nan")  # one NaN, as one diverged step leaves
    try:
        save_file(tensors, str(expert), metadata=meta)
        proc = run([sys.executable, "-m", "pipeline.merge"], root)
    finally:
        expert.write_bytes(original)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data/experts/shard_1.safetensors: tensor 'classifier.weight'" in lines[0], proc.stderr
    assert not (root / "data/merged").exists() and not list((root / "data").glob(".merged.*"))


def test_a_diverging_federated_run_stops_at_its_round_naming_it(trained_project):
    root = trained_project
    params = with_params(root, **{"federate.lr": 1e6, "federate.rounds": 3, "federate.registered_model": None,
                                  "federate.runs": {"exploding": {"algorithm": "fedavg"}}})
    proc = run([sys.executable, "-m", "pipeline.federate", "--params", params], root)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "exploding.safetensors: tensor" in last and "NaN or infinite" in last, proc.stderr
    assert not (root / "data/federated").exists()


def test_the_finiteness_check_names_the_first_bad_tensor():
    from pipeline.io.checkpoints import first_non_finite

    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor([float("nan")]),
             "n": torch.tensor(5)}
    assert first_non_finite(state) == "b"
    assert first_non_finite({"a": torch.ones(2), "n": torch.tensor(1)}) is None


def test_leftovers_of_a_killed_write_change_no_hash_and_are_cleared(repro_project):
    """What a kill between a write and its rename leaves (a `.name.*.tmp` file in an output
    folder, a `.merged.*.tmp` staging folder) leaves every stage up to date (.dvcignore), and
    the next write clears it."""
    import json

    from pipeline.io.checkpoints import atomic_write, staging_dir

    root = repro_project
    leftover = root / "data/experts/.shard_0.safetensors.k1ll3d.tmp"
    staging = root / "data/.merged.k1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    staging.mkdir()
    (staging / "fedavg.safetensors").write_bytes(b"half a model")
    try:
        proc = run([sys.executable, "-m", "dvc", "status", "--json"], root)
        assert proc.returncode == 0 and json.loads(proc.stdout) == {}, proc.stdout
    finally:
        atomic_write(root / "data/experts/shard_0.safetensors", (root / "data/experts/shard_0.safetensors").read_bytes())
        new = staging_dir(root / "data/merged")
        new.rmdir()
    assert not leftover.exists() and not staging.exists()


def test_a_folder_swap_never_leaves_the_folder_missing(tmp_path):
    """merge and federate swap their output folder in: at no instant may it be absent (a kill
    there would lose it). A reader polls it through 300 swaps."""
    import threading

    from pipeline.io.checkpoints import replace_dir, staging_dir

    target = tmp_path / "merged"
    target.mkdir()
    missing, done = [], threading.Event()

    def watch():
        while not done.is_set():
            if not target.exists():
                missing.append(1)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for i in range(300):
            staged = staging_dir(target)
            (staged / "m.safetensors").write_text(str(i))
            replace_dir(target, staged)
    finally:
        done.set()
        reader.join()
    assert not missing and (target / "m.safetensors").read_text() == "299"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "no staging or old folder left"


def test_a_folder_moved_aside_by_the_fallback_swap_is_put_back(tmp_path):
    """Where the system has no atomic exchange, replace_dir renames twice; a kill between the
    renames leaves `.merged.old` and no `merged`: the next staging puts it back."""
    from pipeline.io.checkpoints import staging_dir

    old = tmp_path / ".merged.old"
    old.mkdir()
    (old / "fedavg.safetensors").write_text("kept")
    staged = staging_dir(tmp_path / "merged")
    assert (tmp_path / "merged" / "fedavg.safetensors").read_text() == "kept" and not old.exists()
    staged.rmdir()


def test_a_flow_killed_mid_pipeline_keeps_what_it_finished_and_leaves_nothing_running(tmp_path):
    """SIGKILL of the flow's process alone, once pretrain is recorded and mix_train runs:
    prepare and pretrain stay in dvc.lock and up to date (the rerun does not compute them
    again), its Prefect server stops listening and no stage process runs on."""
    import json
    import os
    import re
    import signal
    import socket
    import subprocess
    import time

    import yaml

    from tests.conftest import subprocess_env

    root = make_project(tmp_path, {**TINY, "mix_train.epochs": 30})  # mix_train long enough to be killed in
    log = tmp_path / "flow.log"
    with open(log, "w") as out:
        flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline_flow", "--project-dir", str(root)], cwd=root,
                                env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
    lock, deadline = root / "dvc.lock", time.time() + 300
    try:
        while time.time() < deadline and flow.poll() is None:
            if lock.exists() and "pretrain" in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # mix_train's processes are running now
    finally:
        os.kill(flow.pid, signal.SIGKILL)
        flow.wait()
    assert flow.returncode == -signal.SIGKILL, "killed mid-way, not finished"
    stages = yaml.safe_load(lock.read_text())["stages"]
    assert {"prepare", "pretrain"} <= set(stages) and not any(s.startswith("mix_train") for s in stages)
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], root).stdout)
    assert "prepare" not in status and "pretrain" not in status
    assert {f"mix_train@{k}" for k in range(len(TINY["base.shards"]))} <= set(status)

    port = int(re.search(r"Prefect server for this run: http://127.0.0.1:(\d+)", log.read_text()).group(1))

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def stages_running() -> list[int]:
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                # a stage (forked from the warm server, whose command line it shares) or that server
                if os.readlink(f"/proc/{pid}/cwd") == str(root) and b"python" in open(f"/proc/{pid}/cmdline", "rb").read():
                    pids.append(int(pid))
            except OSError:
                continue
        return pids

    deadline = time.time() + 15
    while time.time() < deadline and (listening() or stages_running()):
        time.sleep(0.2)
    assert not listening(), "the flow's Prefect server still listens"
    assert not stages_running(), "a stage process outlived the flow"

    # the next flow finishes the work, starting at mix_train, and marks the killed flow's parent run KILLED
    again = run([sys.executable, "-m", "flows.pipeline_flow", "--project-dir", str(root)], root)
    assert again.returncode == 0, again.stdout[-2000:]
    assert "ran: federate, mix_train@0" in again.stdout and "up to date: prepare, pretrain" in again.stdout
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parents = client.search_runs([client.get_experiment_by_name("mixmerge").experiment_id],
                                 filter_string="tags.`mixmerge.role` = 'pipeline'")
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]


@pytest.mark.parametrize("store", ["down", "garbage", "truncated"])
def test_a_tracking_store_that_is_down_or_corrupt_stops_a_stage_in_seconds_in_one_line(tmp_path, store):
    """Before any computation: exit 75 (try again later), one line naming the store, nothing
    written, within seconds (MLflow's own defaults waited 256 s and printed 116 lines)."""
    import socket
    import time

    root = make_project(tmp_path, TINY)
    env = {}
    if store == "down":
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env["MLFLOW_TRACKING_URI"] = uri = f"http://127.0.0.1:{port}"
    else:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        (root / "mlflow.db").write_bytes(b"\x00garbage" * 4096 if store == "garbage" else
                                         b"SQLite format 3\x00" + b"\x10\x00\x01\x01" + b"\x00" * 200)
    started = time.time()
    proc = run([sys.executable, "-m", "pipeline.prepare"], root, **env)
    elapsed = time.time() - started
    assert proc.returncode == 75, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prepare: error: tracking store {uri} is unreachable"), proc.stderr
    assert elapsed < 60, f"{elapsed:.0f} s"
    assert not (root / "data/prepared/dataset.safetensors").exists()


def test_a_corrupt_checkpoint_is_named_in_one_line(trained_project):
    root = trained_project
    expert = root / "data/experts/shard_2.safetensors"
    original = expert.read_bytes()
    try:
        expert.write_bytes(original[: len(original) // 2])  # truncated, as a full disk leaves it
        proc = run([sys.executable, "-m", "pipeline.merge"], root)
    finally:
        expert.write_bytes(original)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("merge: error: data/experts/shard_2.safetensors: not a readable"), lines


def test_outputs_follow_the_umask_as_dvcs_do(trained_project):
    import stat

    from pipeline.io.checkpoints import _umask

    for path in (root := trained_project) / "data/experts/shard_0.safetensors", root / "data/prepared/partition.json":
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask(), path


def test_a_yaml_error_names_its_line(tmp_path):
    from pipeline.runtime import config

    bad = tmp_path / "params.yaml"
    bad.write_text("base:\n  seed: 0\nmix_train:\n  lr: [0.1\n  epochs: 3\n")
    with pytest.raises(config.ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        config.read_params(bad)


def test_ctrl_c_stops_the_flow_in_seconds_in_one_line_keeping_what_finished(tmp_path):
    """SIGINT to the flow's process group, as Ctrl-C in a terminal sends it, while mix_train
    runs: the stages stop and are not retried, the flow exits 130 within seconds with one line,
    prepare and pretrain stay recorded, and no process of the run is left."""
    import os
    import signal
    import subprocess
    import time

    import yaml

    from tests.conftest import subprocess_env

    root = make_project(tmp_path, {**TINY, "mix_train.epochs": 400})
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline_flow", "--project-dir", str(root)], cwd=root,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's job
    lock, deadline = root / "dvc.lock", time.time() + 300
    while time.time() < deadline and flow.poll() is None:
        if lock.exists() and "pretrain" in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}):
            break
        time.sleep(0.2)
    time.sleep(5.0)  # mix_train's processes are running now (400 epochs: for a minute at least)
    os.killpg(flow.pid, signal.SIGINT)
    started = time.time()
    try:
        _, stderr = flow.communicate(timeout=60)
    finally:
        if flow.poll() is None:
            os.killpg(flow.pid, signal.SIGKILL)
    assert flow.returncode == 130 and time.time() - started < 30, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted: the stages that finished are recorded in dvc.lock"
    assert "Traceback" not in stderr
    stages = yaml.safe_load(lock.read_text())["stages"]
    assert {"prepare", "pretrain"} <= set(stages) and not any(s.startswith("mix_train") for s in stages)


def _holder(code: str, cwd) -> "subprocess.Popen":
    """A separate process that takes a lock, says so on stdout, and keeps it until killed."""
    import subprocess

    from tests.conftest import subprocess_env

    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_flow_waits_for_the_first_and_a_killed_one_frees_the_project(tmp_path):
    """Two flows in one project would both compute every stale stage: the second waits for the
    project's flow lock, and a holder killed with SIGKILL leaves no lock behind."""
    import os
    import signal
    import threading
    import time

    from flows.project_lock import ProjectBusy, project_lock

    holder = _holder("import time; from pathlib import Path; from flows.project_lock import project_lock\n"
                     f"with project_lock(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(600)",
                     tmp_path)
    said = []
    with pytest.raises(ProjectBusy, match=f"pid {holder.pid} on"):
        with project_lock(tmp_path, wait_s=1.0, say=said.append):
            pass
    assert said and f"pid {holder.pid}" in said[0], "the waiting flow says whom it waits for"
    threading.Timer(1.0, os.kill, (holder.pid, signal.SIGKILL)).start()
    started = time.monotonic()
    with project_lock(tmp_path, wait_s=60):  # the kernel dropped the dead holder's lock
        waited = time.monotonic() - started
    holder.wait()
    assert 0.8 < waited < 30


def test_the_flow_waits_for_a_dvc_process_holding_the_repository(tmp_path):
    """A flow beside `dvc repro` (any dvc process holding DVC's lock) waits for the lock instead
    of failing on DVC's LockError."""
    import os
    import signal
    import threading
    import time

    from flows import dvc_commands

    root = make_project(tmp_path, TINY)
    holder = _holder("import time; from dvc.repo import Repo\nrepo = Repo('.'); repo.lock.lock()\n"
                     "print('held', flush=True); time.sleep(600)", root)
    threading.Timer(1.5, os.kill, (holder.pid, signal.SIGKILL)).start()
    started = time.monotonic()
    stale = dvc_commands.stale(root, ["prepare", "pretrain"])
    holder.wait()
    assert stale == ["prepare", "pretrain"]
    assert time.monotonic() - started > 1.2, "it waited for the holder"


def test_stages_interrupted_without_the_flow_stop_the_flow_as_ctrl_c(tmp_path):
    """SIGINT to the stage processes alone (a signal that reaches the flow's main thread late, or
    not at all): the flow still reads it as an interrupt, exits 130 in one line, retries nothing."""
    import os
    import signal
    import subprocess
    import time

    import yaml

    from tests.conftest import subprocess_env

    root = make_project(tmp_path, {**TINY, "mix_train.epochs": 400})
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline_flow", "--project-dir", str(root)], cwd=root,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lock, deadline = root / "dvc.lock", time.time() + 300
    while time.time() < deadline and flow.poll() is None:
        if lock.exists() and "pretrain" in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}):
            break
        time.sleep(0.2)
    time.sleep(5.0)

    def parent_of(pid):
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])

    def in_project(pid):
        try:
            return os.readlink(f"/proc/{pid}/cwd") == str(root)
        except OSError:
            return False

    # the stages: processes in the project folder whose parent is not the flow (the warm server's children)
    stages = [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
              if int(p) != flow.pid and in_project(p) and parent_of(p) != flow.pid]
    assert stages, "mix_train runs"
    for pid in stages:
        os.kill(pid, signal.SIGINT)
    try:
        _, stderr = flow.communicate(timeout=60)
    finally:
        if flow.poll() is None:
            os.killpg(flow.pid, signal.SIGKILL)
    assert flow.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "interrupted: the stages that finished are recorded in dvc.lock"
    assert "Retry" not in stderr


def test_a_stage_failing_under_dvc_repro_loses_nothing_dvc_checkout_restores_it(repro_project, tmp_path):
    """Without `persist`, `dvc repro` deletes a stage's outputs before running it. When the stage
    then fails, DVC's cache still holds every earlier output, tables included, and `dvc checkout`
    puts them back byte for byte."""
    import shutil

    import yaml

    root = tmp_path / "project"
    shutil.copytree(repro_project, root, symlinks=True)
    before = {p: p.read_bytes() for p in (root / "results").iterdir() if p.is_file()}
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["interpolation_points"] = 1  # refused: evaluate exits 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run([sys.executable, "-m", "dvc", "repro"], root)
    assert proc.returncode != 0 and "evaluate.interpolation_points" in proc.stderr, proc.stderr[-2000:]
    assert not (root / "results/models.csv").exists(), "DVC removed the outputs before running the stage"
    proc = run([sys.executable, "-m", "dvc", "checkout"], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = {p: p.read_bytes() for p in (root / "results").iterdir() if p.is_file()}
    assert after == before and root / "results/metrics.json" in after
