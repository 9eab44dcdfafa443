#!/usr/bin/env bash
# The project's test command (README.md): installs what the tests need, lints, runs the suite.
# On a machine without torch it installs torch 2.13.0 (the CPU wheel on our CPU-only machines;
# a GPU user's own install keeps CUDA torch: pip leaves an installed torch alone).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# Debian packages some tests need, installed as root with apt-get when missing (elsewhere those
# tests are skipped, saying why): a one-node SLURM cluster for tests/test_slurm.py (slurm-wlm,
# munge: 4-10 s) and Chromium for the browser test tests/test_app.py (driven through Playwright,
# which downloads no browser; about 11 s).
packages=()
[[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/sbin/munged ]] \
    || packages+=(slurm-wlm munge)
command -v chromium >/dev/null || packages+=(chromium)
if (( ${#packages[@]} )) && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing ${packages[*]} (SLURM and browser tests)"
    _apt=(apt-get install -y -qq --no-install-recommends "${packages[@]}")
    DEBIAN_FRONTEND=noninteractive "${_apt[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${_apt[@]}" >/dev/null; } \
        || echo "could not install ${packages[*]}: the tests that need them will be skipped"
fi
python -m pip install -q -e ".[dev,app]"
python -m ruff check .
python -m pytest -q "$@"
