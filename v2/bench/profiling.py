"""Where a forward's time goes: torch.profiler over a few forwards, reduced to kernel time by
class (matmul / attention / the rest), kernels per forward, the GPU's idle share, the host
synchronisations per forward and the kernels that take the most time (by name)."""

from __future__ import annotations

import re
import time

import torch

MATMUL = re.compile(r"nvjet|gemm|cutlass|xmma|splitKreduce|cublas|sm90_", re.I)
ATTENTION = re.compile(r"flash|fmha|attention|attn", re.I)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
TOP = 12  # kernels listed by time


def breakdown(step, forwards: int, device: torch.device) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(forwards):
            step()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, None
    for a, b in spans:  # union of kernel intervals
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    first, last = (spans[0][0], max(b for _, b in spans)) if spans else (0.0, 0.0)
    by_class = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in kernels:
        cls = (
            "attention"
            if ATTENTION.search(e.name)
            else ("matmul" if MATMUL.search(e.name) else "other")
        )
        by_class[cls] += e.time_range.end - e.time_range.start
    syncs = sum(1 for e in events if e.name in SYNCS) - 1  # the final one is ours
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        n_t = by_name.setdefault(e.name, [0, 0.0])
        n_t[0] += 1
        n_t[1] += e.time_range.end - e.time_range.start
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:TOP]
    return {
        "forwards": forwards,
        "wall_ms": wall * 1e3 / forwards,
        "kernel_ms": {k: v / 1e3 / forwards for k, v in by_class.items()},
        "kernels_per_forward": len(kernels) / forwards,
        "gpu_idle_share": 1 - busy / (last - first) if last > first else 0.0,
        "host_syncs_per_forward": max(syncs, 0) / forwards,
        # where to look first: the kernels taking the most time, per forward
        "top_kernels": [
            {"name": name[:120], "calls": n / forwards, "ms": us / 1e3 / forwards}
            for name, (n, us) in top
        ],
    }
