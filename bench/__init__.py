"""Speed benchmarks: `python -m bench` prints a table and writes bench-results/bench.json."""
