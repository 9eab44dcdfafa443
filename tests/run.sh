#!/usr/bin/env bash
# The project's test command (README.md): installs what the tests need, lints, runs the suite.
# On a machine without torch it installs torch 2.13.0 (the CPU wheel on our CPU-only machines;
# a GPU user's own install keeps CUDA torch: pip leaves an installed torch alone).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,app]"
# The browser test (tests/test_app.py) drives Debian's Chromium through Playwright: installed
# here as root on a fresh Debian machine (about 11 s); no browser download by Playwright.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
python -m ruff check .
python -m pytest -q "$@"
