"""One sweep cell: every stage of the pipeline, in this one process, in the cell's folder.

The cell folder is a DVC repository of its own: its params.yaml, a copy of dvc.yaml, and a
link to this checkout's pipeline/ (the stages' code deps). The stages, their order and their
commands come from DVC's graph of that folder, so a stage added to dvc.yaml runs here as it
does in `dvc repro` and the Prefect flow. For each generation of the graph the cell asks DVC
which stages are stale, restores those that DVC's run cache holds (computed before, by any cell
with the same code, params and inputs: the cells of a sweep share one DVC cache,
``<sweep folder>/.dvc-cache``, and with MIXMERGE_DVC_REMOTE set, the run cache of every
machine), runs the rest, and records them as `dvc commit` would (cache and run cache as each
generation ends, dvc.lock once at the end).

Each command (`python -m pipeline.<stage> ...`) is run as a call of that module's main in this
process, the K shard stages as one stacked call: that spares each cell an interpreter start and
the imports of torch and MLflow per stage, which on a small dataset cost more than the training.
What ran and what was restored is written to ``stages.json`` in the cell folder.

Run: python -m flows.sweep_cell CELL_DIR [--target STAGE]   (the sweep flow does this per cell;
a worker given one shard of a flow's experiment runs it with --target mix_train@K)
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REMOTE = "shared"


def prepare_repo(cell_dir: Path, dvc_yaml: Path = REPO / "dvc.yaml") -> None:
    """Make the cell folder a DVC repository running this checkout's dvc.yaml and code, with
    the sweep's shared cache (two folders up: cells live in <sweep>/<grid>/<cell>, pool stages
    in <data dir>/projects/<params digest>) and, if MIXMERGE_DVC_REMOTE is set, that remote as
    its default."""
    from dvc.repo import Repo

    shutil.copyfile(dvc_yaml, cell_dir / "dvc.yaml")
    code = cell_dir / "pipeline"
    if code.is_symlink() and code.readlink() != REPO / "pipeline":  # a folder another checkout ran
        code.unlink()
    if not code.exists():  # (a copy of the whole project has its own pipeline/: kept)
        code.symlink_to(REPO / "pipeline", target_is_directory=True)
    if not (cell_dir / ".dvc").is_dir():
        Repo.init(str(cell_dir), no_scm=True).close()
    with Repo(str(cell_dir)) as repo, repo.config.edit("local") as conf:
        conf["cache"]["dir"] = str((cell_dir.parent.parent / ".dvc-cache").resolve())
        remote = os.environ.get("MIXMERGE_DVC_REMOTE")
        if remote:
            conf["remote"][REMOTE] = {"url": remote}
            conf["core"]["remote"] = REMOTE


def plan(cell_dir: Path, dvc_yaml: Path = REPO / "dvc.yaml") -> list[tuple[str, list[str]]]:
    """(module, arguments) of each command a fresh cell runs, in the order of DVC's graph of
    ``dvc_yaml`` with the cell's params (its foreach expands with the cell's own shards)."""
    from flows.dvc_commands import layers, python_module, stacked_shard_units, unit_command

    prepare_repo(cell_dir, dvc_yaml)
    return [python_module(unit_command(unit))
            for layer in layers(cell_dir) for unit in stacked_shard_units([[stage] for stage in layer])]


def needed_for(target: str, upstream: dict[str, list[str]]) -> set[str]:
    """``target`` and every stage whose outputs it reads, directly or not."""
    if target not in upstream:
        raise ValueError(f"no stage {target!r} in dvc.yaml; stages: {', '.join(sorted(upstream))}")
    out, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += upstream[name]
    return out


def main(cell_dir: str, target: str | None = None) -> dict[str, list[str]]:
    """Bring the cell's stages up to date (only ``target`` and what it needs, if given)."""
    from flows.dvc_commands import graph, python_module, restore_from_run_cache, stacked_shard_units, stale, \
        unit_command
    from pipeline.runtime import cli

    cell = Path(cell_dir).resolve()
    prepare_repo(cell)
    pull = bool(os.environ.get("MIXMERGE_DVC_REMOTE"))
    os.chdir(cell)
    generations, upstream = graph(cell)
    wanted = needed_for(target, upstream) if target else set(upstream)
    ran, restored = [], []
    for layer in generations:
        layer = [s for s in layer if s.name in wanted]
        if not layer:
            continue
        todo = stale(cell, [s.name for s in layer])
        back = restore_from_run_cache(cell, todo, pull=pull, write_lock=False) if todo else []
        restored += back
        units = stacked_shard_units([[s] for s in layer if s.name in todo and s.name not in back])
        for unit in units:
            module, argv = python_module(unit_command(unit))
            cli.run(module.rsplit(".", 1)[-1], importlib.import_module(module).main, argv)
        names = [s.name for unit in units for s in unit]
        if names:
            _save(cell, names)
            ran += names
    if ran or restored:
        _write_lock(cell, ran + restored)
    if restored:
        print(f"restored from DVC's run cache, not run: {', '.join(restored)}", flush=True)
    (cell / "stages.json").write_text(json.dumps({"ran": ran, "restored": restored}) + "\n")
    return {"ran": ran, "restored": restored}


def _save(cell: Path, names: list[str]) -> None:
    """What `dvc commit` does for stages that ran, but dvc.lock: their outputs into the cache
    and their run-cache entries. dvc.lock is written once, at the end (_write_lock): DVC rewrites
    it through a round-trip YAML parser, 0.45 s a write. A cell stopped before then loses
    nothing: its rerun restores these stages from the run cache."""
    from flows.dvc_commands import locked_repo

    with locked_repo(cell) as repo:
        stages = {s.name: s for s in repo.index.stages}
        for name in names:
            stages[name].save()
            stages[name].commit()


def _write_lock(cell: Path, names: list[str]) -> None:
    """The dvc.lock entries of the stages that ran or were restored, in one write."""
    from flows.dvc_commands import locked_repo

    with locked_repo(cell) as repo:
        stages = {s.name: s for s in repo.index.stages}
        for name in names:  # their hashes, as saved (the files are in the cache already)
            stages[name].save(run_cache=False)
        stages[names[0]].dvcfile.dump_stages([stages[n] for n in names], update_pipeline=False)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m flows.sweep_cell", description=__doc__.split("\n\n")[0])
    p.add_argument("cell_dir")
    p.add_argument("--target", default=None, help="only this stage and the stages it needs")
    args = p.parse_args()
    main(args.cell_dir, args.target)
