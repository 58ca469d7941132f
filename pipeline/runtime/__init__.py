"""What every stage process needs around the science: typed config from params.yaml, the CLI and
its exit codes, progress lines, the allocator setting, and dvc.yaml's source deps."""
