"""`python -m v2.experiments`: sweeps of evaluation runs (configs/sweeps/*.yaml), one results
folder per configuration, its state, and running what is not done - here (--local) or as one
SLURM array. The command lives in v2/runs/cli.py (its --help and docstring say how to use it);
the package v2/runs is the wing behind it.
"""

import sys

from v2.runs.cli import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    sys.exit(cli())
