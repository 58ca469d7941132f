"""mixmerge: partition -> pretrain -> mix_train (K experts) -> merge -> evaluate.

Pure library modules (tensors in, tensors out): partition, models, augment, objectives,
mixers, training, merging, metrics. IO modules: config, datasets, checkpoints, tracking,
plots, progress. Stage entry points (one per DVC stage): prepare, pretrain, mix_train,
merge, evaluate, each runnable as ``python -m pipeline.<stage>``.
"""
