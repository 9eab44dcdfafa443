#!/usr/bin/env bash
# One task of a sweep's SLURM array. Submitted by `python -m v2.experiments SWEEP.yaml` as
#     sbatch --array=<indices>%<cap> <cluster.env flags> sbatch/array_job.sh MANIFEST
# never by hand. MANIFEST (results/<sweep>/_manifests/*.json, frozen at submission) lists every
# configuration of the sweep; this task runs entry number $SLURM_ARRAY_TASK_ID. Requeue-safe: a
# configuration already DONE is not run again, and an interrupted one resumes from its lm_eval
# request cache. Output: results/<sweep>/<config>/slurm-<array job>_<task>.log (setup messages:
# results/<sweep>/_manifests/slurm-<array job>_<task>.log).
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
MANIFEST="${1:?usage: sbatch ... sbatch/array_job.sh MANIFEST}"
: "${SLURM_ARRAY_TASK_ID:?not inside a SLURM array task}"
source sbatch/job_env.sh
exec "${FDLLM_JOB_PYTHON}" -m v2.experiments task "${MANIFEST}" "${SLURM_ARRAY_TASK_ID}"
