"""mixmerge: partition -> pretrain -> mix_train (K experts) -> merge -> evaluate.

The stage entry points sit at the top (``python -m pipeline.<stage>``, one per DVC stage) and
use the layers below them, each a package: ``runtime`` (typed config, CLI, exit codes), ``io``
(datasets, checkpoints, tracking, plots, serving), ``train`` (the engine: train K models,
combine K states) and ``evaluation`` (metrics, probes, diagnostics), ``methods`` (one package per
method family, each a registry), ``nn`` (architectures, inference, BatchNorm). The contract in
pyproject.toml ([tool.importlinter]) keeps the pure layers free of IO, tracking and config.
"""
