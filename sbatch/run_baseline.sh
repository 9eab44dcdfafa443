#!/usr/bin/env bash
# The baseline configuration (no skipping) over several tasks, one job per task:
#   bash sbatch/run_baseline.sh [--status | --dry-run | --local | --force [ID ...] | --limit N]
# Tasks and model: configs/sweeps/fast_dllm_v2_7b_baseline.yaml (SWEEP=other.yaml to change).
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash sbatch/run_experiments.sh "${SWEEP:-configs/sweeps/fast_dllm_v2_7b_baseline.yaml}" "$@"
