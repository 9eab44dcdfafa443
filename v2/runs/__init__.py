"""The experiment wing as a package (issue 25, "What to build" item 3): sweeps of evaluation
runs, one configuration at a time or as a SLURM array, behind `python -m v2.experiments`.

Its modules now:
- v2.runs.spec: the sweep and its configurations resolved: `RunSpec` (every generation and
  policy setting of one configuration, defaults included, built once by one rule from the sweep
  file), `Sweep` (a read sweep file: its configurations and results folder), the sweep file's
  one reader (`read_sweep_file`), configuration ids, the record's `config` (`record_config`),
  `SpecError` / `SweepError` and `REPO`, where a sweep's relative paths start;
- v2.runs.state: a configuration's run folder as both backends write it: the markers (DONE,
  RUNNING, FAILED, SUBMITTED) and their writers (`write_done`, `write_failed`), the runner's log
  line, what a summary.json must show (`expected`), moving a folder aside for --force
  (`archive`) and `Interrupted` (Ctrl-C during a local run).

Still outside, to move here later (each a module of this package; v2.experiments stays the
command `python -m v2.experiments` that sbatch/ runs):
- in v2/experiments.py: reading and checking a sweep file (`load_sweep`, `check_*`), reading
  the markers into states (`SlurmView`, `config_state`, `states`), the local launcher
  (`run_local`, `run_task`) and the SLURM one (`submit_array`, `cluster_settings`, the
  manifest and `task_main`), the lm_eval backend's command line (`make_task`, `eval_argv`),
  `--status` and the CLI;
- v2/direct.py: the direct backend (the engine in this process), to sit with the lm_eval
  backend behind one small interface; the lm_eval backend is then to call lm_eval's public
  Python API inside the job instead of `python v2/eval.py`.
"""
