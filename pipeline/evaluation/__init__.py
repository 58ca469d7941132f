"""Evaluation: every model side by side (compare), the metrics, probes and pair diagnostics it
uses, and the printed table. Pure code: no files, tracking or config."""
