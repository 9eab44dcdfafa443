#!/usr/bin/env bash
# Run a sweep: what is not done yet, as one SLURM array (sbatch on PATH) or here with --local.
#   bash sbatch/run_experiments.sh configs/sweeps/tiny_default.yaml --local
#   bash sbatch/run_experiments.sh SWEEP.yaml --status | --dry-run | --force [ID ...]
#                                             | --only ID ... | --limit N
#   bash sbatch/run_experiments.sh --status     (every sweep under configs/sweeps, its state)
# Options: python -m v2.experiments --help; cluster settings: sbatch/cluster.env.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m v2.experiments "$@"
