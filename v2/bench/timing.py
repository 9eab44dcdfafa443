"""Synchronised timing: CUDA events on a GPU, perf_counter on the CPU; the engine's forward
timer (Engine.timer), which marks every forward of a generation without patching anything; and
the one warm-up rule of everything timed (`settle`, `Clock.warm_up`).

The warm-up rule: call the timed work until a call sets nothing up, so that no timed call pays
for a setup. "Sets up" is read from counters that grow with each setup (`setups`): an Engine's
(forward records, graph warm-ups and captures: the three calls a new forward signature takes on
a GPU), and for work without an Engine torch.compile's (`CompileSetups`). With no counter the
rule is `at_least` calls. Its users: the bench (forwards, forced skipping, end to end, the
autoregressive baseline, the roofline probes), the direct backend's interleaved rounds
(v2/runs/direct.py), the tuner's tokens/s objective (v2/tune.py) and lm_eval's first batch on a GPU
(v2/lm_adapter.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class CompileSetups:
    """The setups of work without an Engine (transformers' generate under torch.compile): the
    frames torch.compile has compiled so far, in every process-wide counter it keeps. Watched
    like an Engine (`setups`); only grows."""

    @property
    def setups(self) -> int:
        from torch._dynamo.utils import counters

        return counters["frames"]["total"] + counters["stats"]["unique_graphs"]


@dataclass
class Settled:
    calls: int  # calls made, the last included
    settled: bool  # the last call set nothing up (False: `at_most` calls were not enough)
    result: Any  # the last call's return value


def settle(
    fn: Callable[[], Any], watched: Iterable = (), at_least: int = 1, at_most: int = 8
) -> Settled:
    """The warm-up rule (module docstring): call `fn` at least `at_least` times, and on until a
    call leaves the `setups` of everything `watched` unchanged (Engine.setups: no new forward
    record, graph warm-up or capture; None entries are skipped: a decode without an engine), at
    most `at_most` calls. The last call, when settled, paid for no setup: a caller whose timed
    work is a single pass (the tuner's trial, lm_eval's first batch) keeps its result as the
    measurement; others time further calls (`Clock.warm_up`)."""
    watched = [w for w in watched if w is not None]
    calls = 0
    while True:
        before = [w.setups for w in watched]
        result = fn()
        calls += 1
        quiet = [w.setups for w in watched] == before
        if (calls >= at_least and quiet) or calls >= at_most:
            return Settled(calls, quiet, result)


class Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self):
        """A point on the device timeline (no synchronisation); see `between`."""
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def between(self, a, b) -> float:
        """Milliseconds between two marks (call after a sync)."""
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def once(self, fn) -> float:
        """Milliseconds of one call, from an idle device to the end of its work."""
        self.sync()
        a = self.mark()
        fn()
        b = self.mark()
        self.sync()
        return self.between(a, b)

    def warm_up(self, fn, engines=(), at_least: int = 1, at_most: int = 8) -> int:
        """The warm-up rule (`settle`) before timed calls of `fn`: call it at least `at_least`
        times, and on until a call makes no new setup in any of `engines` (Engine.setups, or
        CompileSetups), at most `at_most` calls. Returns the calls made."""
        return settle(fn, engines, at_least, at_most).calls

    def repeat(self, fn, warmup: int, repeats: int, engines=()) -> list[float]:
        """Milliseconds of `repeats` calls after the warm-up rule (at least `warmup` calls)."""
        self.warm_up(fn, engines, at_least=warmup)
        return [self.once(fn) for _ in range(repeats)]

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None


class ForwardTimer:
    """Set as `engine.timer`: marks the start and end of every forward (prefill, denoise, commit,
    logits) on the device timeline; `total_ms()` after a sync."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.spans: list[tuple[str, object, object]] = []

    @contextmanager
    def __call__(self, kind: str):
        a = self.clock.mark()
        yield
        self.spans.append((kind, a, self.clock.mark()))

    def total_ms(self) -> float:
        return sum(self.clock.between(a, b) for _, a, b in self.spans)

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind, _, _ in self.spans:
            out[kind] = out.get(kind, 0) + 1
        return out
