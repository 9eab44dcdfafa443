#!/usr/bin/env bash
# Run a sweep here, one configuration after another (interactive node, workstation, laptop):
#   bash sbatch/run_local.sh [SWEEP.yaml] [--status | --force [ID ...] | --only ID ... | --limit N]
# Several GPUs here: each configuration uses all of them through `accelerate launch`. No GPU: a
# sweep with limit_cpu runs that many problems per task (a smoke test, under _limit<N>/).
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP="configs/sweeps/tiny_default.yaml"
if [[ $# -gt 0 && "$1" != -* ]]; then SWEEP="$1"; shift; fi
exec bash sbatch/run_experiments.sh "${SWEEP}" --local "$@"
