"""Bounds measured on the device: a copy's bandwidth and a matmul's rate, and what one forward must
read and compute (weights it touches, K/V it attends; the engine's counted FLOPs)."""

from __future__ import annotations

import torch

from v2.bench.timing import Clock, median
from v2.model import Network


def measure_bandwidth(clock: Clock, small: bool) -> dict:
    """A large device-to-device copy; bytes read + written per second."""
    n = (64 << 20) if small else (1 << 30)
    src = torch.ones(n, dtype=torch.uint8, device=clock.device)
    dst = torch.empty_like(src)
    m = median(clock.repeat(lambda: dst.copy_(src), 3, 10))
    return {"bytes_per_copy": 2 * n, "median_ms": m, "bytes_per_s": 2 * n / (m / 1e3)}


def measure_matmul(clock: Clock, dtype: torch.dtype, small: bool) -> dict:
    """A square matmul (8192^3 on a GPU) in the model's dtype, on random data; FLOPs per second."""
    n = 1024 if small else 8192
    g = torch.Generator(device=clock.device).manual_seed(0)
    a = torch.randn(n, n, device=clock.device, generator=g).to(dtype)
    b = torch.randn(n, n, device=clock.device, generator=g).to(dtype)
    m = median(clock.repeat(lambda: a @ b, 3, 10))
    return {"n": n, "dtype": str(dtype), "median_ms": m, "flops_per_s": 2 * n**3 / (m / 1e3)}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bytes_read(
    model: Network, layers: list[int], batch: int, window: int, keys: int, logit_rows: int
) -> tuple[int, int]:
    """(weight bytes, K/V bytes) one forward must read: the parameters of the layers it runs,
    the embedding rows, the final norm and lm_head when it computes logits; K and V of `keys`
    positions in each layer it runs. Activations are not counted."""
    cfg = model.cfg
    elt = model.embed_tokens.weight.element_size()
    w = sum(sum(nbytes(p) for p in model.layers[i].parameters()) for i in layers)
    w += batch * window * cfg.hidden_size * elt
    if logit_rows:
        w += nbytes(model.lm_head.weight) + nbytes(model.norm.weight)
    kv = len(layers) * batch * cfg.num_key_value_heads * keys * cfg.head_dim * elt * 2
    return w, kv


def roofline(
    ms: float | None, weight_b: int, kv_b: int, flops: float, bw: float, rate: float
) -> dict:
    bw_ms = (weight_b + kv_b) / bw * 1e3
    c_ms = flops / rate * 1e3
    row = {
        "weight_bytes": weight_b,
        "kv_bytes": kv_b,
        "flops": flops,
        "bw_bound_ms": bw_ms,
        "compute_bound_ms": c_ms,
        "bound_ms": max(bw_ms, c_ms),
    }
    if ms:
        row.update(
            bw_fraction=bw_ms / ms,
            compute_fraction=c_ms / ms,
            bound_fraction=max(bw_ms, c_ms) / ms,
            achieved_tflops=flops / (ms / 1e3) / 1e12,
        )
    return row
