"""What a new user reads: the commands the READMEs point to run, and the files the result pages
cite are in the repository."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commands(markdown: str, start: str) -> list[str]:
    """The indented commands of a markdown text that start with `start` (continuations joined)."""
    found, current = [], None
    for line in markdown.splitlines():
        text = line.strip()
        if current is not None:
            current += " " + text.rstrip("\\").strip()
            if not text.endswith("\\"):
                found.append(current)
                current = None
        elif line.startswith("    ") and text.startswith(start):
            current = text.rstrip("\\").strip()
            if not text.endswith("\\"):
                found.append(current)
                current = None
    return found


def test_the_checkpoint_readme_has_the_evaluation_command_it_is_cited_for(tmp_path):
    """README: "v2/tiny/checkpoint/README.md has the command" (the whole split at threshold 1);
    it runs, here with --limit 2 on the CPU."""
    assert "`v2/tiny/checkpoint/README.md` has the command" in (REPO / "README.md").read_text()
    readme = (REPO / "v2" / "tiny" / "checkpoint" / "README.md").read_text()
    whole = [c for c in commands(readme, "python v2/eval.py") if "--limit" not in c]
    assert whole, "no evaluation command of the whole split"
    argv = shlex.split(whole[0])
    assert "threshold=1" in argv[argv.index("--model_args") + 1]
    out = tmp_path / "out"
    argv[argv.index("--output_path") + 1] = str(out)
    argv[argv.index("--batch_size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run(
        [sys.executable, *argv[1:], "--limit", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(out.rglob("summary.json"))


def test_the_gpu_main_job_page_cites_files_that_exist():
    """Relative links and `../` paths of docs/results/gpu-main-job.md resolve in the repository
    (it cited ../../shared/design/traps.md, a note outside it)."""
    page = REPO / "docs" / "results" / "gpu-main-job.md"
    text = page.read_text()
    paths = re.findall(r"\]\(([^)#]+)\)", text) + re.findall(r"(?<![\w/])(\.\./[^\s`),]+)", text)
    assert paths
    missing = [p for p in paths if "://" not in p and not (page.parent / p).exists()]
    assert missing == []
