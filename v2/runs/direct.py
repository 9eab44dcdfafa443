"""The `direct` backend of the sweep runner (`runner: direct` in a sweep file): the engine called
directly, with no lm_eval, so it runs on a bare GPU machine. Every configuration of the sweep
decodes in this one process:

1. accuracy and statistics on the task's problems (`direct.batch_size` at a time), configuration
   after configuration;
2. untimed passes of every configuration's timed work, until a pass sets nothing up in any
   configuration's engine (the warm-up rule, v2.bench.timing.settle: compilation, forward
   records, CUDA-graph warm-up and capture), so that no timed round pays for a setup; each
   configuration is timed on an engine of its own (FastDLLM.engine), which keeps its graphs
   while the others decode (on the model's one engine, every switch of configuration built it
   anew and the timed rounds paid for its setups again);
3. `direct.speed_rounds` interleaved timing rounds, the order reversed every other round, at each
   batch size of `direct.speed` ({batch: problems}); a configuration's speed then does not depend
   on its place in the list (timing each once, in list order, measured the first configuration
   up to 1.6x slower than others doing exactly its work).

Each configuration's record (v2/record.py) is written to results/<sweep>/<id>/<model>/summary.json
once all rounds are done, with `timing.session` shared by the configurations timed together.
Supported tasks: tiny_gsm and tiny_gsm_hard (the committed test splits), scored by their lm_eval
task's scorer (v2/tasks/gsm_answers.py: strict = the first `#### N`, flexible = the last number),
accuracy and standard error by v2.record.accuracy.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from v2.bench.timing import settle
from v2.record import Record, TaskResult, Timing, accuracy, environment, write
from v2.runs.spec import REPO, RunSpec, Sweep, as_run, record_config
from v2.runs.state import (
    FAILED,
    HOST,
    RUNNING,
    Interrupted,
    archive,
    expected,
    log_line,
    remove_markers,
    write_done,
    write_failed,
    write_marker,
)

TASKS = {
    "tiny_gsm": REPO / "v2" / "tiny" / "data" / "test.jsonl",
    "tiny_gsm_hard": REPO / "v2" / "tiny" / "data" / "hard_test.jsonl",
}
DEFAULTS = {"batch_size": 250, "speed": {32: 128, 1: 16}, "speed_rounds": 3, "max_new_tokens": 256}
STRICT, FLEXIBLE = "exact_match,strict-match", "exact_match,flexible-extract"


def problems(task: str, limit: int | None) -> tuple[list[str], list[str]]:
    """(prompts, references) of a task, the first `limit` only where given: a reference is the
    problem's answer ("... #### N"), which the scorer reads as the task does."""
    from v2.tiny.data import read_jsonl
    from v2.tiny.train import user_message

    rows = read_jsonl(TASKS[task])[:limit]
    return [user_message(q["question"]) for q in rows], [q["answer"] for q in rows]


def decode(lm, cfg: RunSpec, texts, references, batch: int, desc=None, engine=None, chat=True):
    """Decode and score `texts` with a configuration; `desc` shows a progress bar. `engine`: the
    configuration's own (`timing_engine`), with its policy; None: the model's, a new policy.
    The runner's decode and the tuner's trial (v2/tune.py): one path. `chat`: the chat template
    (the runner's always; the tuner's the sweep's lm_eval.apply_chat_template)."""
    from v2.tiny.train import score

    def policy():
        if engine is not None:
            return engine.given_policy
        return cfg.make_policy()

    gen = cfg.generation_config()
    return score(lm, texts, references, gen, batch, policy, desc, engine, chat)


def timing_engine(lm, cfg: RunSpec):
    """A configuration's own engine, with its own policy object, for every timed pass of it (its
    graphs stay valid while the other configurations decode); None where it decodes without one
    (decode: autoregressive)."""
    return lm.engine(cfg.generation_config(), cfg.make_policy())


def run_local(
    sweep: Sweep,
    to_run: list[RunSpec],
    limit: int | None,
    replace_ids: set[str] | frozenset = frozenset(),
) -> list[tuple[str, int]]:
    """Run `to_run` in this process; returns (id, exit status) per configuration: all failed
    (FAILED markers with the reason) if any step raised. Ctrl-C raises Interrupted naming them
    all (records are written only once timing is done)."""
    from v2.generate import FastDLLM

    pretrained = Path(sweep.pretrained).expanduser()
    pretrained = pretrained if pretrained.is_absolute() else REPO / pretrained
    marker = {"host": HOST, "pid": os.getpid(), "runner": "direct"}
    for cfg in to_run:
        if cfg.id in replace_ids and (dest := archive(sweep, cfg, limit)):
            log_line(f"{cfg.id}: moved the old results to {dest}")
        run_dir = sweep.run_dir(cfg.id, limit)
        remove_markers(run_dir, FAILED)
        write_marker(run_dir, RUNNING, marker)
    started = time.time()
    d = sweep.direct
    try:
        lm = FastDLLM.load(pretrained)
        env = environment()
        measured: dict[str, dict] = {}
        for n, cfg in enumerate(to_run, 1):
            (task,) = cfg.tasks
            texts, refs = problems(task, limit)
            desc = f"[{n}/{len(to_run)}] {cfg.id}"
            strict, flexible, stats = decode(lm, cfg, texts, refs, d["batch_size"], desc)
            s = stats.to_dict()
            metrics = {STRICT: accuracy(strict), FLEXIBLE: accuracy(flexible)}
            measured[cfg.id] = {"task": task, "n": len(texts), "metrics": metrics, "stats": s}
            log_line(
                f"[{n}/{len(to_run)}] {cfg.id}: flexible {metrics[FLEXIBLE]['value']:.3f}, "
                f"FLOPs/fwd {s['flops_ratio']:.3f}, tokens/fwd {s['tokens_per_forward']:.2f}"
            )
        timed = {str(b): min(p, len(texts)) for b, p in d["speed"].items()}
        rounds: dict[str, dict[str, list[float]]] = {c.id: {b: [] for b in timed} for c in to_run}
        engines = {c.id: timing_engine(lm, c) for c in to_run}

        def time_all(order: list[RunSpec], keep: bool) -> None:
            for cfg in order:
                texts, refs = problems(cfg.tasks[0], limit)
                for b, n in timed.items():
                    e = engines[cfg.id]
                    _, _, stats = decode(lm, cfg, texts[:n], refs[:n], int(b), None, e)
                    if keep:
                        rounds[cfg.id][b].append(stats.tokens_per_second)

        warm = settle(lambda: time_all(to_run, keep=False), engines.values())
        warmup = (
            f"{warm.calls} untimed pass{'es' if warm.calls > 1 else ''} of every "
            "configuration's timed work, "
            + ("the last one setting nothing up" if warm.settled else "the last still setting up")
            + " (v2.bench.timing.settle)"
        )
        log_line(f"warm-up: {warmup}")
        for r in range(d["speed_rounds"]):
            time_all(to_run if r % 2 == 0 else to_run[::-1], keep=True)
            log_line(f"speed round {r + 1} of {d['speed_rounds']} done")
    except KeyboardInterrupt:
        for cfg in to_run:
            reason = "interrupted (SIGINT); a rerun runs it again"
            write_failed(sweep.run_dir(cfg.id, limit), {"rc": 130, "reason": reason, **marker})
        raise Interrupted([c.id for c in to_run]) from None
    except Exception as e:  # a bad checkpoint, setting or decode: every configuration failed
        reason = f"{type(e).__name__}: {e}"
        log_line(f"direct run failed: {reason}")
        for cfg in to_run:
            write_failed(sweep.run_dir(cfg.id, limit), {"rc": 1, "reason": reason, **marker})
        return [(cfg.id, 1) for cfg in to_run]
    session = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    command = shlex.join(["python", "-m", "v2.experiments", *sys.argv[1:]])
    results = []
    for cfg in to_run:
        m = measured[cfg.id]
        gen = cfg.generation_config()
        rec = Record(
            model=pretrained.resolve().name,
            pretrained=sweep.pretrained,
            config=record_config(  # the lm_eval backend's dialect (v2/lm_adapter.py)
                as_run(gen, lm.model.cfg.block_size, gen.max_new_tokens),
                cfg.make_policy(),
                batch_size=cfg.batch_size,
                dtype=str(lm.model.embed_tokens.weight.dtype).removeprefix("torch."),
                num_processes=1,
            ),
            tasks={
                m["task"]: TaskResult(
                    n=m["n"],
                    metrics=m["metrics"],
                    stats=m["stats"],
                    stats_problems=m["n"],  # every problem decoded: no request cache
                    cached_problems=0,
                )
            },
            stats=m["stats"],
            limit=limit,
            smoke_test=limit is not None,
            runner="direct",
            speed=None,
            timing=Timing(
                session=session,
                rounds=d["speed_rounds"],
                batches={
                    b: {"problems": n, "tokens_per_second_rounds": rounds[cfg.id][b]}
                    for b, n in timed.items()
                },
                warmup=warmup,
            ),
            env=env,
            command=command,
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        run_dir = sweep.run_dir(cfg.id, limit)
        path = write(run_dir / rec.model / "summary.json", rec)
        task = {"config_id": cfg.id, "expect": expected(cfg, limit)}
        write_done(run_dir, task, path, started)
        results.append((cfg.id, 0))
    return results
