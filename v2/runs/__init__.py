"""The experiment wing: sweeps of evaluation runs, one configuration at a time or as a SLURM
array, behind `python -m v2.experiments` (the command: v2/runs/cli.py). Its modules, each
importing only those above it (no circle; tests/test_imports.py):

- spec: one configuration's resolved settings (`RunSpec`, every generation and policy setting,
  defaults included, built once by one rule from the sweep file), `Sweep`, the sweep file's one
  reader (`read_sweep_file`), configuration ids, the record's `config` (`record_config`);
- state: a configuration's run folder: the markers (DONE, RUNNING, FAILED, SUBMITTED) and their
  writers, what a summary.json must show, and reading them into a state (done, pending,
  running, failed, missing; SLURM asked through `SlurmView`);
- sweep: reading and checking a sweep file (`load_sweep`), its tasks before a run;
- harness: the lm_eval backend: a configuration's job as data (`make_task`) and the job itself
  (`python -m v2.runs.harness job.json`: lm_eval's simple_evaluate, results as objects, the
  record written from them);
- direct: the direct backend: the engine called directly, every configuration in one process,
  timed in interleaved rounds;
- local: the local launcher: a job as a watched child process (`run_task`), one configuration
  after another (`run_local`);
- slurm: the SLURM launcher: the array over a manifest, cluster settings, the task inside a job;
- backend: the two backends behind one interface (`Backend`: check, dry_run, run_local, submit);
- cli: the command: --status, --dry-run, --force, --only, --limit, --local, the closing report.
"""
