"""One sweep cell: every stage of the pipeline, in this one process, in the cell's folder.

The cell folder holds its own params.yaml and a copy of dvc.yaml; the stages, their order and
their commands come from DVC's graph of that folder (flows.dvc_commands.layers), so a stage
added to dvc.yaml runs here as it does in `dvc repro` and the Prefect flow. Each stage's
command (`python -m pipeline.<stage> ...`) is run as a call of that module's main in this
process, the K shard stages as one stacked call: that spares each cell an interpreter start
and the imports of torch and MLflow per stage, which on a small dataset cost more than the
training.

Run: python -m flows.sweep_cell CELL_DIR   (the sweep flow does this per cell)
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plan(cell_dir: Path, dvc_yaml: Path = REPO / "dvc.yaml") -> list[tuple[str, list[str]]]:
    """(module, arguments) of each command the cell runs, in the order of DVC's graph of
    ``dvc_yaml`` with the cell's params (its foreach expands with the cell's own shards)."""
    from dvc.repo import Repo

    from flows.dvc_commands import layers, python_module, stacked_shard_units, unit_command

    shutil.copyfile(dvc_yaml, cell_dir / "dvc.yaml")
    if not (cell_dir / ".dvc").is_dir():
        Repo.init(str(cell_dir), no_scm=True).close()
    return [python_module(unit_command(unit))
            for layer in layers(cell_dir) for unit in stacked_shard_units([[stage] for stage in layer])]


def main(cell_dir: str) -> None:
    from pipeline.runtime import cli

    steps = plan(Path(cell_dir))
    os.chdir(cell_dir)
    for module, argv in steps:
        cli.run(module.rsplit(".", 1)[-1], importlib.import_module(module).main, argv)


if __name__ == "__main__":
    main(sys.argv[1])
