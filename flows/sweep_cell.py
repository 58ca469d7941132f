"""One sweep cell: every stage of the pipeline, in this one process, in the cell's folder.

The cell folder holds its own params.yaml; stages write their usual relative paths there.
Running the stages in one process (shards stacked) spares each cell five interpreter starts
and the imports of torch and MLflow, which on a small dataset cost more than the training.

Run: python -m flows.sweep_cell CELL_DIR   (the sweep flow does this per cell)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def main(cell_dir: str) -> None:
    os.chdir(cell_dir)
    from pipeline import cli, config, evaluate, merge, mix_train, prepare, pretrain

    base, _ = config.load("mix_train")
    shards = [str(k) for k in base.shards]
    for name, module, argv in [
        ("prepare", prepare, []),
        ("pretrain", pretrain, []),
        ("mix_train", mix_train, ["--shard", *shards]),
        ("merge", merge, []),
        ("evaluate", evaluate, []),
    ]:
        cli.run(name, module.main, argv)


if __name__ == "__main__":
    main(sys.argv[1])
