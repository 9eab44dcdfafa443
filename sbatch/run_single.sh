#!/usr/bin/env bash
# One configuration of a sweep as one SLURM job:
#     bash sbatch/run_single.sh SWEEP.yaml CONFIG_ID [--limit N]   # submits itself, cluster.env flags
#     sbatch [flags] sbatch/run_single.sh SWEEP.yaml CONFIG_ID [--limit N]  # the #SBATCH lines below
# Results, markers and state are the sweep's (results/<sweep>/<config>/), so --status sees it once
# it starts. `python -m v2.experiments SWEEP.yaml --only CONFIG_ID` does the same as a one-task array
# (and its pending job is visible to --status).
#SBATCH --job-name=fdllm-single
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --gres=gpu:1
#SBATCH --time=08:00:00
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: bash sbatch/run_single.sh SWEEP.yaml CONFIG_ID [--limit N]" >&2
    exit 2
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
    SWEEP="$(realpath "$1")"
    cd "$(dirname "${SCRIPT}")/.."
    LINES="$("${PYTHON:-python}" -m v2.experiments sbatch-args "${SWEEP}" "$2")"  # or stop here
    mapfile -t FLAGS <<<"${LINES}"
    # the job runs this interpreter unless cluster.env names an environment (job_env.sh)
    FDLLM_SUBMIT_PYTHON="$("${PYTHON:-python}" -c 'import sys; print(sys.executable)')"
    export FDLLM_SUBMIT_PYTHON
    exec sbatch "${FLAGS[@]}" --chdir="${PWD}" "${SCRIPT}" "${SWEEP}" "${@:2}"
fi
cd "${SLURM_SUBMIT_DIR}"
source sbatch/job_env.sh
exec "${FDLLM_JOB_PYTHON}" -m v2.experiments task --sweep "$1" --id "$2" "${@:3}"
