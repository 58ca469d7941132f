"""Input and output: datasets on disk, checkpoints, the artifacts other stages wrote, the paths
they live at, MLflow tracking, plots and the served model."""
