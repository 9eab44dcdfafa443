#!/usr/bin/env bash
# Build a virtual environment on the node's local disk ($TMPDIR: fast, private to the job, deleted
# when it ends) with this repository installed editable, then print the line that activates it:
#     eval "$(bash sbatch/setup_tmpdir_venv.sh)"      # in a job (sbatch/job_env.sh does this
#                                                     #  when FDLLM_TMPDIR_VENV=1)
#     bash sbatch/setup_tmpdir_venv.sh               # interactive: prints `source .../activate`
# Progress goes to stderr, the activate line alone to stdout. Wheels are cached in FDLLM_PIP_CACHE
# (cluster.env; on the shared home by default) so every job after the first installs from cache.
# FDLLM_PYTHON: the interpreter (default python3; load a module first, see cluster.env);
# FDLLM_PIP_EXTRA: more pip arguments, e.g. ".[math]" or a CUDA torch index URL.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
source "${REPO}/sbatch/cluster.env"
VENV="${FDLLM_VENV_DIR:-${TMPDIR:-/tmp}/fdllm-venv-${SLURM_JOB_ID:-$USER}}"
export PIP_CACHE_DIR="${FDLLM_PIP_CACHE}"
{
    mkdir -p "${PIP_CACHE_DIR}"
    if [[ ! -x "${VENV}/bin/python" ]]; then
        "${FDLLM_PYTHON:-python3}" -m venv "${VENV}"
    fi
    "${VENV}/bin/python" -m pip install -q --upgrade pip
    # shellcheck disable=SC2086
    "${VENV}/bin/python" -m pip install -q -e "${REPO}" ${FDLLM_PIP_EXTRA:-}
    echo "[setup_tmpdir_venv] ${VENV}: $("${VENV}/bin/python" --version), pip cache ${PIP_CACHE_DIR}"
} >&2
echo "source ${VENV}/bin/activate"
