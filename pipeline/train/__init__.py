"""The training engine: train K models from K start states (engine), combine K states into one
(combine); the loops beneath them (loop: one model; stacked: K models vmapped) and how batches
reach the device (data_path). Pure code: no files, tracking or config."""
