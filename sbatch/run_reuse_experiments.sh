#!/usr/bin/env bash
# The group's layer-reuse sweep (Fast-dLLM v2 7B, GSM8K, reuse_k x layer subset), same options as
# run_experiments.sh:
#   bash sbatch/run_reuse_experiments.sh [--status | --dry-run | --force [ID ...] | --limit N]
# Configuration ids: baseline, reuse_k2_first, reuse_k2_middle, ... (configs/sweeps/...yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash sbatch/run_experiments.sh "${SWEEP:-configs/sweeps/fast_dllm_v2_7b_gsm8k.yaml}" "$@"
