"""Synchronised timing: CUDA events on a GPU, perf_counter on the CPU; and the engine's forward
timer (Engine.timer), which marks every forward of a generation without patching anything."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


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
        """Call `fn` at least `at_least` times, and on until a call makes no new forward record,
        graph warm-up or capture in any of `engines` (Engine.setups), so that no timed call
        pays for one; at most `at_most` calls. Returns the calls made."""
        calls = 0
        while calls < at_most:
            before = [e.setups for e in engines]
            fn()
            calls += 1
            if calls >= at_least and [e.setups for e in engines] == before:
                break
        return calls

    def repeat(self, fn, warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
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
