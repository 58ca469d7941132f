"""Imports the module named on the command line and nothing else: what a forked stage pays
for its own (project) modules once the warm server has imported torch and MLflow."""
import importlib
import sys

if __name__ == "__main__":
    importlib.import_module(sys.argv[1])
