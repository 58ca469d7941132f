"""Where each stage's artifacts live (paths relative to the project root).

dvc.yaml names the same paths; tests/test_layout.py checks that the two agree.
"""
from pathlib import Path

PREPARED = Path("data/prepared")
DATASET = PREPARED / "dataset.safetensors"
MANIFEST = PREPARED / "partition.json"
PARTITION_PNG = PREPARED / "partition.png"
PARTITION_CARD = PREPARED / "partition_card.md"

PRETRAIN = Path("data/pretrain")
PRETRAINED = PRETRAIN / "model.safetensors"
PRETRAIN_METRICS = PRETRAIN / "metrics.json"

EXPERTS = Path("data/experts")


def expert(shard: int) -> Path:
    return EXPERTS / f"shard_{shard}.safetensors"


HISTORY = Path("data/history")  # per-epoch training loss, one CSV per training run
PRETRAIN_HISTORY = HISTORY / "pretrain.csv"


def expert_history(shard: int) -> Path:
    return HISTORY / f"shard_{shard}.csv"


MERGED = Path("data/merged")
FEDERATED = Path("data/federated")  # one global model per federated or decentralised run

RESULTS = Path("results")
METRICS = RESULTS / "metrics.json"
MODELS_CSV = RESULTS / "models.csv"
SHARDS_CSV = RESULTS / "per_shard.csv"
RELIABILITY_CSV = RESULTS / "reliability.csv"
PER_CLASS_CSV = RESULTS / "per_class.csv"
MERGE_GAP_CSV = RESULTS / "merge_gap.csv"
PAIRS_CSV = RESULTS / "pairs.csv"
INTERPOLATION_CSV = RESULTS / "interpolation.csv"
# federate: per-round metrics of every run, one table (DVC's plot draws a line per run with the
# template .dvc/plots/by_run.json: DVC does not expand a folder in a top-level plot)
ROUNDS_CSV = RESULTS / "rounds.csv"
# evaluate: every training run's per-epoch history (data/history/*.csv) in one table, drawn as
# one line per run (a top-level plot cannot name a folder, and K varies)
TRAINING_CSV = RESULTS / "training.csv"
COMPARISON_PNG = RESULTS / "comparison.png"
RELIABILITY_PNG = RESULTS / "reliability.png"
INTERPOLATION_PNG = RESULTS / "interpolation.png"
