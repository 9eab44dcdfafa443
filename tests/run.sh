#!/usr/bin/env bash
# The project's test command (README.md): installs what the tests need, lints, runs the suite.
# On a machine without torch it installs torch 2.13.0 (the CPU wheel on our CPU-only machines;
# a GPU user's own install keeps CUDA torch: pip leaves an installed torch alone).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# tests/test_slurm.py starts a one-node SLURM cluster from Debian's packages: as root with apt-get,
# install them when missing (4-10 s; elsewhere those tests are skipped, saying why).
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null \
    && ! [[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/sbin/munged ]]; then
    echo "installing slurm-wlm and munge (SLURM tests)"
    _apt=(apt-get install -y -qq --no-install-recommends slurm-wlm munge)
    DEBIAN_FRONTEND=noninteractive "${_apt[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${_apt[@]}" >/dev/null; } \
        || echo "could not install slurm-wlm and munge: the SLURM tests will be skipped"
fi
python -m pip install -q -e ".[dev]"
python -m ruff check .
python -m pytest -q "$@"
