# Sourced (from the repository root) by the job scripts, inside a SLURM job: cluster settings,
# the Python environment, offline Hugging Face, a per-job datasets cache. Not a job script itself.

# shellcheck source=cluster.env
source sbatch/cluster.env

if [[ -n "${FDLLM_MODULES}" ]]; then
    # shellcheck disable=SC2086
    module load ${FDLLM_MODULES}
fi
if [[ "${FDLLM_TMPDIR_VENV}" == 1 ]]; then
    _activate="$(bash sbatch/setup_tmpdir_venv.sh)"  # an assignment, so that set -e stops a failure
    eval "${_activate}"
elif [[ -n "${FDLLM_ACTIVATE}" ]]; then
    eval "${FDLLM_ACTIVATE}"
fi

# The job's interpreter, FDLLM_JOB_PYTHON: `python` of the environment entered above; without one,
# the interpreter that submitted the job (FDLLM_SUBMIT_PYTHON, set by `python -m v2.experiments`
# and run_single.sh: the packages that submitted it run it, whatever `python` on PATH is).
if [[ -n "${FDLLM_MODULES}${FDLLM_ACTIVATE}" || "${FDLLM_TMPDIR_VENV}" == 1 ]]; then
    FDLLM_JOB_PYTHON=python
else
    FDLLM_JOB_PYTHON="${FDLLM_SUBMIT_PYTHON:-python}"
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE-1}"
if [[ -n "${FDLLM_DATASETS_SEED}" ]]; then
    _cache="${TMPDIR:-/tmp}/fdllm-hf-datasets-${SLURM_JOB_ID:-$$}"
    mkdir -p "${_cache}"
    if [[ -d "${FDLLM_DATASETS_SEED}" ]]; then
        cp -a "${FDLLM_DATASETS_SEED}/." "${_cache}/"
    fi
    export HF_DATASETS_CACHE="${_cache}"
fi
echo "[job_env] $(hostname) job ${SLURM_JOB_ID:-?} python $(command -v "${FDLLM_JOB_PYTHON}")" \
    "HF_HUB_OFFLINE=${HF_HUB_OFFLINE} HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-default}"
