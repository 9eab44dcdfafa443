"""Wall-clock measurements of the engine's forwards, end-to-end generation, compute skipping at
forced rates and an autoregressive baseline, next to bounds measured on the same device:

    python -m v2.bench                          # 7B + 1.5B shapes (random bf16 weights) + tiny
    python -m v2.bench --models tiny --quick    # a reduced grid
    python -m v2.bench --models test --quick --device cpu --out /tmp/b   # what the tests run

Models are built directly on the device with random weights (no download): timing does not
depend on the weights' values. Every timing is synchronised (CUDA events on a GPU), warm-up is
excluded and the median of several repeats is reported. The bounds are the bytes a forward must
read (weights it touches + K/V it attends) over a device-to-device copy bandwidth measured here,
and its executed FLOPs (the engine's own count) over a bf16 matmul rate measured here.

Writes <out>/<name>.json (everything, rewritten after every section so a killed run keeps what it
measured), <name>.md (tables) and <name>.png (plots). docs/benchmarks/README.md explains columns.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch

from v2.checkpoint import TokenIds, load_model
from v2.engine import Engine
from v2.generate import GenerationConfig, generate
from v2.model import ModelConfig, Network, sdpa
from v2.policy import COMPUTE, PASS, REUSE, ForwardContext, Policy

TINY_CHECKPOINT = Path(__file__).resolve().parent / "tiny" / "checkpoint"

# Fast-dLLM v2 release shapes (fast-dllm-v2.md section 1); "test" is a test-only small config.
SHAPES: dict[str, ModelConfig] = {
    "7b": ModelConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "1.5b": ModelConfig(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # 4 layers, not 2: with 2 there is no layer besides the first and last to PASS.
    "test": ModelConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    ),
}

GRIDS = {
    "full": dict(
        batches=(1, 8, 32),
        prefixes=(128, 512, 1024),
        warmup=2,
        repeats=7,
        e2e_batches=(1, 8, 32),
        e2e_repeats=3,
        prompt_tokens=100,
        new_tokens=256,
        skip_batches=(1, 32),
        skip_prefix=512,
        skip_rounds=4,
        skip_steps=4,
        ar_batches=(1, 8, 32),
        ar_latency_steps=16,
    ),
    "quick": dict(
        batches=(1, 32),
        prefixes=(512,),
        warmup=1,
        repeats=3,
        e2e_batches=(1,),
        e2e_repeats=1,
        prompt_tokens=100,
        new_tokens=64,
        skip_batches=(1, 32),
        skip_prefix=512,
        skip_rounds=2,
        skip_steps=2,
        ar_batches=(1,),
        ar_latency_steps=8,
    ),
}

# Targets (H100, 7B shapes, bf16); evaluated on whatever was measured, labelled with the model.
TARGET_GOALS = {
    "denoise32_b1_p512_over_bandwidth_bound": ("<=", 1.25),
    "denoise32_b32_p512_over_compute_bound": ("<=", 1.3),
    "e2e_b1_tokens_per_s": (">=", 150.0),
    "e2e_b1_loop_overhead": ("<=", 0.10),
    "token_reuse50_b32_wall_ratio": ("<=", 0.6),
    "layer_pass8_b1_wall_ratio": ("<=", 0.75),
    "disabled_policy_wall_ratio": ("<=", 1.02),
}


# ---- forced policies: fixed skip rates, independent of any threshold ----------------------------


class DisabledPolicy(Policy):
    """Always answers None: what the policy hook itself costs."""

    name = "disabled"


class ForcedTokenReuse(Policy):
    """REUSE the units with (absolute block position + layer) % 4 < k in layers >= min_layer:
    k / 4 of each row's units, the same count in every row (regular shapes)."""

    name = "forced_token_reuse"
    reuses = True

    def __init__(self, k: int, min_layer: int = 1):
        if not 0 <= k <= 4:
            raise ValueError(f"k must be in 0..4, got {k}")
        self.k, self.min_layer = k, min_layer
        self._plans: dict[tuple, torch.Tensor] = {}

    @property
    def rate(self) -> float:
        return self.k / 4

    def protected_layers(self, num_layers: int) -> set[int]:
        return set(range(min(self.min_layer, num_layers)))

    def plan(self, layer: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        if layer < self.min_layer:
            return None
        b, w = x.shape[:2]
        key = ((ctx.window_start + layer) % 4, b, w, x.device)
        if key not in self._plans:
            pos = torch.arange(ctx.window_start, ctx.window_start + w, device=x.device)
            row = torch.where((pos + layer) % 4 < self.k, REUSE, COMPUTE).to(torch.int8)
            self._plans[key] = row.expand(b, w).contiguous()
        return self._plans[key]

    def config(self) -> dict:
        return {"policy": self.name, "k": self.k, "rate": self.rate, "min_layer": self.min_layer}


def spread_layers(n: int, num_layers: int) -> list[int]:
    """n layers evenly spread over 1 .. num_layers - 2 (the first and last never)."""
    inner = num_layers - 2
    n = max(0, min(n, inner))
    return [1 + int((i + 0.5) * inner / n) for i in range(n)]


def middle_layers(n: int, num_layers: int) -> list[int]:
    n = max(0, min(n, num_layers))
    first = (num_layers - n) // 2
    return list(range(first, first + n))


def scaled(n_of_28: int, num_layers: int) -> int:
    """A count given for 28 layers, scaled to another depth."""
    return round(n_of_28 * num_layers / 28)


class ForcedLayerPass(Policy):
    """PASS whole rows of `n` layers evenly spread between the first and the last."""

    name = "forced_layer_pass"

    def __init__(self, n: int):
        self.n = n
        self.layers: list[int] = []

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        self.layers = spread_layers(self.n, num_layers)
        self._set = set(self.layers)

    def protected_layers(self, num_layers: int) -> set[int]:
        return {0, num_layers - 1}

    def plan(self, layer: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        return PASS if layer in self._set else None

    def config(self) -> dict:
        return {"policy": self.name, "n": self.n, "layers": self.layers}


class ForcedLayerReuse(Policy):
    """The group's schedule: REUSE every unit of `n` middle layers on steps with step % k != 0."""

    name = "forced_layer_reuse"
    reuses = True

    def __init__(self, n: int, k: int = 2):
        self.n, self.k = n, k
        self.layers: list[int] = []
        self._set: set[int] = set()

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        self.layers = middle_layers(self.n, num_layers)
        self._set = set(self.layers)

    def plan(self, layer: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        return None if layer not in self._set or ctx.step % self.k == 0 else REUSE

    def config(self) -> dict:
        return {"policy": self.name, "n": self.n, "k": self.k, "layers": self.layers}


def skip_policies(num_layers: int) -> list[tuple[str, Policy | None, float]]:
    """(label, policy, nominal skip rate) for the forced-rate section."""
    out: list[tuple[str, Policy | None, float]] = [
        ("none", None, 0.0),
        ("disabled", DisabledPolicy(), 0.0),
    ]
    for k in range(4):
        out.append((f"token_reuse_{25 * k}", ForcedTokenReuse(k), k / 4))
    for n in (0, 4, 8):
        m = len(spread_layers(scaled(n, num_layers), num_layers))
        out.append((f"layer_pass_{n}", ForcedLayerPass(scaled(n, num_layers)), m / num_layers))
    m = len(middle_layers(scaled(12, num_layers), num_layers))
    out.append(("reuse_k2_12", ForcedLayerReuse(scaled(12, num_layers), 2), m / num_layers))
    return out


# ---- timing --------------------------------------------------------------------------------------


class Clock:
    """Synchronised timing: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once(self, fn) -> float:
        """Milliseconds of one call, from an idle device to the end of its work."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

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

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


@contextmanager
def forward_spans(model: Network, clock: Clock):
    """Marks around every engine forward (prefill / denoise / commit) and every `model.logits`
    call while active: [(kind, start, end)], read with clock.between after a sync."""
    spans: list[tuple[str, object, object]] = []
    originals = {name: getattr(Engine, name) for name in ("prefill", "denoise", "commit")}

    def wrap(kind, fn):
        def timed(*args, **kwargs):
            a = clock.mark()
            out = fn(*args, **kwargs)
            spans.append((kind, a, clock.mark()))
            return out

        return timed

    for name, fn in originals.items():
        setattr(Engine, name, wrap(name, fn))
    model.logits = wrap("logits", Network.logits.__get__(model))
    try:
        yield spans
    finally:
        for name, fn in originals.items():
            setattr(Engine, name, fn)
        del model.logits


def measure_bandwidth(clock: Clock, small: bool) -> dict:
    """A large device-to-device copy; bytes read + written per second."""
    n = (64 << 20) if small else (1 << 30)
    src = torch.ones(n, dtype=torch.uint8, device=clock.device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    for _ in range(3):
        copy()
    m = median([clock.once(copy) for _ in range(10)])
    return {"bytes_per_copy": 2 * n, "median_ms": m, "bytes_per_s": 2 * n / (m / 1e3)}


def measure_matmul(clock: Clock, dtype: torch.dtype, small: bool) -> dict:
    """A square matmul (8192^3 on a GPU) in the model's dtype; FLOPs per second."""
    n = 1024 if small else 8192
    g = torch.Generator(device=clock.device).manual_seed(0)
    a = torch.randn(n, n, device=clock.device, generator=g).to(dtype)
    b = torch.randn(n, n, device=clock.device, generator=g).to(dtype)

    def mm():
        a @ b

    for _ in range(3):
        mm()
    m = median([clock.once(mm) for _ in range(10)])
    return {"n": n, "dtype": str(dtype), "median_ms": m, "flops_per_s": 2 * n**3 / (m / 1e3)}


# ---- models --------------------------------------------------------------------------------------


def build_random(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random weights (normal, std 0.02; norms 1) made on the device: nothing passes the CPU."""
    with torch.device("meta"):
        model = Network(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def special_ids(vocab: int) -> TokenIds:
    return TokenIds(mask=vocab - 1, eos=vocab - 2, pad=vocab - 3)


def load(name: str, device: torch.device, dtype: torch.dtype, need_positions: int):
    """(model, ids, source). The tiny checkpoint's position limit is raised to `need_positions`
    for timing (RoPE is a table; the weights do not depend on it)."""
    if name == "tiny":
        model = load_model(TINY_CHECKPOINT, dtype=dtype, device=device)
        try:
            from v2.checkpoint import load_tokenizer

            ids = load_tokenizer(TINY_CHECKPOINT)[1]
        except Exception:  # noqa: BLE001 - the ids only label tokens; timing does not need them
            ids = special_ids(model.cfg.vocab_size)
        source = str(TINY_CHECKPOINT)
    else:
        model = build_random(SHAPES[name], device, dtype)
        ids = special_ids(model.cfg.vocab_size)
        source = "random weights, normal std 0.02"
    if model.cfg.max_position_embeddings < need_positions:
        model.cfg = replace(model.cfg, max_position_embeddings=need_positions)
        model._rope = None
    return model, ids, source


def ordinary_tokens(ids: TokenIds, vocab: int, n: int, offset: int = 0) -> list[int]:
    special = {ids.mask, ids.eos, ids.pad}
    pool = [t for t in range(min(vocab, 4096)) if t not in special]
    return [pool[(i * 7 + offset * 13) % len(pool)] for i in range(n)]


def token_tensor(ids, vocab, b, n, device) -> torch.Tensor:
    return torch.tensor(
        [ordinary_tokens(ids, vocab, n, r) for r in range(b)], dtype=torch.long, device=device
    )


# ---- roofline ------------------------------------------------------------------------------------


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


def snapshot(engine: Engine) -> tuple[int, int, list[int]]:
    s = engine.stats
    return s.executed_flops, s.baseline_flops, list(s.executed_units_per_layer)


def diff(a, b) -> tuple[int, int, list[int]]:
    return b[0] - a[0], b[1] - a[1], [y - x for x, y in zip(a[2], b[2], strict=True)]


# ---- the benchmark -------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args = args
        self.grid = dict(GRIDS["quick" if args.quick else "full"])
        self.device = torch.device(args.device)
        self.clock = Clock(self.device)
        if args.dtype:
            self.dtype = getattr(torch, args.dtype)
        else:
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.t0 = time.perf_counter()
        gpu = torch.cuda.get_device_name(self.device) if self.clock.cuda else None
        self.name = args.name or slug(gpu or "cpu")
        self.out = Path(args.out)
        self.data: dict = {
            "command": "python -m v2.bench " + " ".join(argv),
            "argv": argv,
            "gpu": gpu,
            "device": str(self.device),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "dtype": str(self.dtype).removeprefix("torch."),
            "grid": "quick" if args.quick else "full",
            "grid_settings": self.grid,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": 0.0,
            "complete": False,
            "models": {},
            "forwards": [],
            "e2e": [],
            "skip": [],
            "ar": [],
            "targets": [],
            "errors": [],
            "skipped": [],
            "notes": [
                "Weights are random (no download); timing does not depend on their values.",
                "Bounds: bw_bound = (weight bytes touched + K/V bytes read) / measured copy "
                "bandwidth; compute_bound = engine-counted executed FLOPs / measured matmul rate.",
                "Forward latency includes model.logits on the rows whose logits are used.",
                "Skip timings share one prefix cache between engines (content does not affect "
                "timing); each block starts with one all-compute forward that is not timed.",
            ],
        }

    # -- bookkeeping

    def log(self, msg: str) -> None:
        print(f"[bench {time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def over_deadline(self, what: str) -> bool:
        if time.perf_counter() - self.t0 > self.args.deadline_s:
            self.data["skipped"].append(what)
            self.log(f"deadline ({self.args.deadline_s:.0f} s) passed: skipping {what}")
            return True
        return False

    def save(self, plot: bool = False) -> None:
        self.data["elapsed_s"] = time.perf_counter() - self.t0
        self.data["targets"] = targets(self.data)
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / f"{self.name}.json", json.dumps(self.data, indent=1) + "\n")
        write_atomic(self.out / f"{self.name}.md", markdown(self.data))
        if plot:
            try:
                write_plot(self.data, self.out / f"{self.name}.png")
            except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the data
                self.data["plot_error"] = f"{type(e).__name__}: {e}"
                self.log(f"no plot: {self.data['plot_error']}")
                write_atomic(self.out / f"{self.name}.json", json.dumps(self.data, indent=1) + "\n")

    def error(self, section: str, model: str | None, e: BaseException) -> None:
        self.data["errors"].append(
            {"section": section, "model": model, "error": f"{type(e).__name__}: {e}"}
        )
        self.log(f"ERROR in {section} ({model}): {type(e).__name__}: {e}")
        traceback.print_exc()
        sys.stderr.flush()
        if self.clock.cuda:
            torch.cuda.empty_cache()

    # -- sections

    def run(self) -> dict:
        g = self.grid
        self.log(f"device {self.data['gpu'] or self.device}, torch {torch.__version__}")
        small = self.device.type != "cuda"
        self.data["bandwidth"] = measure_bandwidth(self.clock, small)
        self.data["matmul"] = measure_matmul(self.clock, self.dtype, small)
        if self.clock.cuda:
            torch.cuda.empty_cache()  # the copy and matmul buffers
        self.bw = self.data["bandwidth"]["bytes_per_s"]
        self.rate = self.data["matmul"]["flops_per_s"]
        self.log(
            f"copy bandwidth {self.bw / 1e9:.0f} GB/s (read + write), "
            f"matmul {self.rate / 1e12:.1f} TFLOP/s ({self.data['matmul']['n']}^3 {self.dtype})"
        )
        self.save()
        need = max(max(g["prefixes"]), g["skip_prefix"], g["prompt_tokens"] + g["new_tokens"])
        need = need + 2 * 32 + g["ar_latency_steps"]
        for name in self.args.models:
            if self.over_deadline(f"model {name}"):
                continue
            self.log(f"== model {name}: building")
            try:
                t = time.perf_counter()
                model, ids, source = load(name, self.device, self.dtype, need)
                self.clock.sync()
                self.data["models"][name] = {
                    "config": asdict(model.cfg),
                    "source": source,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "parameter_bytes": sum(nbytes(p) for p in model.parameters()),
                    "build_s": time.perf_counter() - t,
                }
                self.log(
                    f"{name}: {self.data['models'][name]['parameters'] / 1e9:.3f} B parameters "
                    f"in {self.data['models'][name]['build_s']:.1f} s"
                )
            except Exception as e:  # noqa: BLE001
                self.error("build", name, e)
                continue
            for section in (self.forwards, self.skip, self.e2e, self.ar):
                if self.over_deadline(f"{section.__name__} {name}"):
                    continue
                try:
                    section(name, model, ids)
                except Exception as e:  # noqa: BLE001 - keep measuring the other sections
                    self.error(section.__name__, name, e)
                self.save()
            del model
            if self.clock.cuda:
                torch.cuda.empty_cache()
            self.save(plot=True)
        self.data["complete"] = True
        self.save(plot=True)
        self.log(f"done: {self.out / self.name}.{{json,md,png}}")
        return self.data

    def forwards(self, name: str, model: Network, ids: TokenIds) -> None:
        """Latency of each forward kind through the Engine, per batch and prefix."""
        g, cfg, dev, clock = self.grid, model.cfg, self.device, self.clock
        B, S, V = cfg.block_size, 8, cfg.vocab_size
        prefixes = sorted(set(g["prefixes"]) | {g["skip_prefix"]})
        for b in g["batches"]:
            for P in prefixes:
                if self.over_deadline(f"forwards {name} b{b} p{P}"):
                    continue
                clock.reset_peak()
                engine = Engine(model)
                engine.allocate(b, P + B)
                prompt = token_tensor(ids, V, b, P, dev)
                block = token_tensor(ids, V, b, B, dev)
                full_out = torch.arange(S, 2 * S, device=dev) - 1
                sub_out = (torch.arange(S, 2 * S, device=dev) - 1 - S).clamp(min=0)

                def prefill(engine=engine, prompt=prompt):
                    model.logits(engine.prefill(prompt))

                def denoise32(engine=engine, block=block, full_out=full_out):
                    model.logits(engine.denoise(block, 0, full_out))

                def denoise8(engine=engine, block=block, sub_out=sub_out):
                    model.logits(engine.denoise(block[:, S : 2 * S], S, sub_out))

                def commit(engine=engine, block=block, P=P):
                    model.logits(engine.commit(block))
                    engine.prefix_len = P  # time the same commit again

                kinds = [
                    ("prefill", prefill, P, P, 1),
                    ("denoise32", denoise32, B, P + B, S),
                    ("denoise8", denoise8, S, P + B, S),
                    ("commit", commit, B, P + B, 1),
                ]
                prefill()  # the prefix cache every other forward attends to
                engine.begin_block()
                for kind, fn, window, keys, logit_rows in kinds:
                    clock.reset_peak()
                    for _ in range(g["warmup"]):
                        fn()
                    before = snapshot(engine)
                    ms = [clock.once(fn) for _ in range(g["repeats"])]
                    flops = diff(before, snapshot(engine))[0] / g["repeats"]
                    m = median(ms)
                    wb, kvb = bytes_read(
                        model, list(range(cfg.num_hidden_layers)), b, window, keys, logit_rows
                    )
                    row = {
                        "model": name,
                        "kind": kind,
                        "batch": b,
                        "prefix": P,
                        "window": window,
                        "tokens": b * window,
                        "median_ms": m,
                        "min_ms": min(ms),
                        "max_ms": max(ms),
                        "repeats": len(ms),
                        **roofline(m, wb, kvb, flops, self.bw, self.rate),
                        "peak_memory_bytes": clock.peak(),
                    }
                    self.data["forwards"].append(row)
                    self.log(
                        f"{name} {kind:9s} b{b:<2d} p{P:<4d} {m:8.2f} ms  bound "
                        f"{row['bound_ms']:7.2f} ms ({row['bound_fraction']:.0%})"
                    )
                del engine
            self.save()

    def skip(self, name: str, model: Network, ids: TokenIds) -> None:
        """Denoise forwards (32-token window) under forced skip rates vs no policy."""
        g, cfg, dev, clock = self.grid, model.cfg, self.device, self.clock
        B, S, V, P, L = cfg.block_size, 8, cfg.vocab_size, g["skip_prefix"], cfg.num_hidden_layers
        for b in g["skip_batches"]:
            if self.over_deadline(f"skip {name} b{b}"):
                continue
            clock.reset_peak()
            base = Engine(model)
            base.allocate(b, P + B)
            base.prefill(token_tensor(ids, V, b, P, dev))
            block = token_tensor(ids, V, b, B, dev)
            out_pos = torch.arange(S, 2 * S, device=dev) - 1
            runs = []
            for label, policy, rate in skip_policies(L):
                e = base if policy is None else Engine(model, policy)
                e.k, e.v, e.prefix_len = base.k, base.v, base.prefix_len  # shared prefix cache
                runs.append((label, policy, rate, e, []))
            for r in range(1 + g["skip_rounds"]):  # round 0 warms up
                for _label, _policy, _rate, e, samples in runs:
                    e.begin_block()
                    model.logits(e.denoise(block, 0, out_pos))  # step 0: computes everything
                    for step in range(1, g["skip_steps"] + 1):
                        before = snapshot(e)
                        ms = clock.once(
                            lambda e=e, blk=block, out=out_pos: model.logits(e.denoise(blk, 0, out))
                        )
                        if r:
                            samples.append((step, ms, diff(before, snapshot(e))))
            base_ms = None
            for label, policy, rate, _e, samples in runs:
                # reuse_k2: the skipping (odd) steps; its cycle mean is reported beside.
                chosen = (
                    [s for s in samples if s[0] % 2] if label.startswith("reuse_k") else samples
                )
                ms = [s[1] for s in chosen]
                m = median(ms)
                ex = sum(s[2][0] for s in chosen)
                bl = sum(s[2][1] for s in chosen)
                units = [sum(s[2][2][i] for s in chosen) for i in range(L)]
                ran = [i for i in range(L) if units[i] > 0]
                n = len(chosen)
                wb, kvb = bytes_read(model, ran, b, B, P + B, S)
                if label == "none":
                    base_ms, base_bytes = m, wb + kvb
                row = {
                    "model": name,
                    "batch": b,
                    "prefix": P,
                    "policy": label,
                    "config": policy.config() if policy else {"policy": "none"},
                    "nominal_rate": rate,
                    "median_ms": m,
                    "min_ms": min(ms),
                    "samples": n,
                    "wall_ratio": m / base_ms,
                    "flops_ratio": ex / bl if bl else None,
                    "units_ratio": sum(units) / (n * b * B * L),
                    "units_ratio_per_layer": [u / (n * b * B) for u in units],
                    "layers_run": len(ran),
                    "bytes_ratio": (wb + kvb) / base_bytes,
                    **roofline(m, wb, kvb, ex / n, self.bw, self.rate),
                    "peak_memory_bytes": clock.peak(),
                }
                if label.startswith("reuse_k"):
                    even = [s[1] for s in samples if s[0] % 2 == 0]
                    row["compute_step_ms"] = median(even)
                    row["cycle_mean_ms"] = (m + median(even)) / 2 if even else None
                    row["cycle_wall_ratio"] = row["cycle_mean_ms"] / base_ms if even else None
                self.data["skip"].append(row)
                self.log(
                    f"{name} skip b{b:<2d} {label:15s} {m:8.2f} ms  wall x{row['wall_ratio']:.3f}"
                    f"  FLOPs x{row['flops_ratio']:.3f}  units x{row['units_ratio']:.3f}"
                )
            del runs, base
            self.save()

    def e2e(self, name: str, model: Network, ids: TokenIds) -> None:
        """generate() at threshold 1 with ignore_eos: one token per row and forward."""
        g, cfg, clock = self.grid, model.cfg, self.clock
        V = cfg.vocab_size
        for b in g["e2e_batches"]:
            if self.over_deadline(f"e2e {name} b{b}"):
                continue
            prompts = [ordinary_tokens(ids, V, g["prompt_tokens"], r) for r in range(b)]
            warm = GenerationConfig(max_new_tokens=cfg.block_size, threshold=1.0, ignore_eos=True)
            generate(model, prompts, ids, warm)
            gc = GenerationConfig(max_new_tokens=g["new_tokens"], threshold=1.0, ignore_eos=True)
            clock.reset_peak()
            walls, fwd, over, result = [], [], [], None
            for _ in range(g["e2e_repeats"]):
                with forward_spans(model, clock) as spans:
                    clock.sync()
                    t = time.perf_counter()
                    result = generate(model, prompts, ids, gc)
                    clock.sync()
                    wall = time.perf_counter() - t
                f = sum(clock.between(a, z) for _k, a, z in spans) / 1e3
                walls.append(wall)
                fwd.append(f)
                over.append(wall / f - 1)
            st = result.stats
            wall = median(walls)
            n_fwd = sum(st.forwards.values())
            row = {
                "model": name,
                "batch": b,
                "prompt_tokens": g["prompt_tokens"],
                "new_tokens": g["new_tokens"],
                "repeats": len(walls),
                "wall_s": wall,
                "generated_tokens": st.generated_tokens,
                "tokens_per_s": st.generated_tokens / wall,
                "forwards": dict(st.forwards),
                "forwards_total": n_fwd,
                "forwards_per_s": n_fwd / wall,
                "tokens_per_forward": st.tokens_per_forward,
                "forward_sum_s": median(fwd),
                "loop_overhead": median(over),
                "executed_flops": st.executed_flops,
                "achieved_tflops": st.executed_flops / wall / 1e12,
                "peak_memory_bytes": clock.peak(),
            }
            self.data["e2e"].append(row)
            self.log(
                f"{name} e2e b{b:<2d} {row['tokens_per_s']:9.1f} tokens/s "
                f"{row['forwards_per_s']:7.1f} forwards/s, loop +{row['loop_overhead']:.1%} "
                f"over the forwards ({n_fwd} forwards, {wall:.2f} s)"
            )
            self.save()

    def ar(self, name: str, model: Network, ids: TokenIds) -> None:
        """Autoregressive baseline: one token per forward, same network and cache layout."""
        g, cfg, clock = self.grid, model.cfg, self.clock
        P, steps, n = g["skip_prefix"], g["ar_latency_steps"], g["new_tokens"]
        for b in g["ar_batches"]:
            if self.over_deadline(f"ar {name} b{b}"):
                continue
            clock.reset_peak()
            ar = AutoRegressive(model, b, max(P + steps, g["prompt_tokens"] + n) + 8)
            tok = token_tensor(ids, cfg.vocab_size, b, 1, self.device)
            ar.decode(tok, g["prompt_tokens"], 8)  # warm-up
            dec_ms = clock.once(lambda ar=ar, tok=tok: ar.decode(tok, g["prompt_tokens"], n))
            lat_ms = clock.once(lambda ar=ar, tok=tok: ar.decode(tok, P, steps)) / steps
            mid = P + steps // 2
            wb, kvb = bytes_read(model, list(range(cfg.num_hidden_layers)), b, 1, mid, 1)
            dllm = next(
                (
                    r["median_ms"]
                    for r in self.data["forwards"]
                    if (r["model"], r["kind"], r["batch"], r["prefix"]) == (name, "denoise32", b, P)
                ),
                None,
            )
            row = {
                "model": name,
                "batch": b,
                "prefix": P,
                "step_ms": lat_ms,
                "decode_start": g["prompt_tokens"],
                "decode_tokens": n,
                "decode_tokens_per_s": b * n / (dec_ms / 1e3),
                **roofline(lat_ms, wb, kvb, ar.flops(b, mid), self.bw, self.rate),
                "dllm_denoise32_ms": dllm,
                "dllm_over_ar": dllm / lat_ms if dllm else None,
                "peak_memory_bytes": clock.peak(),
            }
            self.data["ar"].append(row)
            self.log(
                f"{name} AR b{b:<2d} {lat_ms:7.2f} ms/step at p{P} "
                f"({row['bound_fraction']:.0%} of bound), {row['decode_tokens_per_s']:.1f} tokens/s"
            )
            del ar


class AutoRegressive:
    """A minimal AR decoder over the same layers: K/V preallocated like the engine's, one token
    per forward, greedy, no host synchronisation between steps. Timing only: the cache before
    the start position is zeros (the prompt's prefill is not part of the per-token cost)."""

    def __init__(self, model: Network, batch: int, max_len: int):
        cfg, w = model.cfg, model.embed_tokens.weight
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.model = model
        self.k = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.positions = torch.arange(max_len, device=w.device)

    def flops(self, batch: int, keys: int) -> int:
        cfg = self.model.cfg
        attn = 4 * keys * cfg.num_attention_heads * cfg.head_dim
        per_row = cfg.num_hidden_layers * (2 * cfg.layer_weight_count + attn)
        return batch * (per_row + 2 * cfg.hidden_size * cfg.vocab_size)

    @torch.inference_mode()
    def step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        m = self.model
        x = m.embed_tokens(tok)
        cos, sin = m.rope(self.positions[pos : pos + 1])
        for i, layer in enumerate(m.layers):

            def attend(q, k, v, i=i):
                self.k[i, :, :, pos] = k[:, 0]
                self.v[i, :, :, pos] = v[:, 0]
                keys, values = self.k[i, :, :, : pos + 1], self.v[i, :, :, : pos + 1]
                return sdpa(q.transpose(1, 2), keys, values).transpose(1, 2)

            x = layer(x, cos, sin, attend)
        return m.logits(x[:, -1]).argmax(-1, keepdim=True)

    def decode(self, tok: torch.Tensor, start: int, n: int) -> torch.Tensor:
        for pos in range(start, start + n):
            tok = self.step(tok, pos)
        return tok


# ---- targets and reports -------------------------------------------------------------------------


def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def targets(data: dict) -> list[dict]:
    """The targets on the 7B model when it was measured, else on the first model measured."""
    models = list(data["models"])
    model = "7b" if "7b" in models else (models[0] if models else None)
    fw, sk, e2 = data["forwards"], data["skip"], data["e2e"]
    f1 = _find(fw, model=model, kind="denoise32", batch=1, prefix=512)
    f32 = _find(fw, model=model, kind="denoise32", batch=32, prefix=512)
    e1 = _find(e2, model=model, batch=1)
    t50 = _find(sk, model=model, batch=32, policy="token_reuse_50")
    p8 = _find(sk, model=model, batch=1, policy="layer_pass_8")
    dis = [r["wall_ratio"] for r in sk if r["model"] == model and r["policy"] == "disabled"]
    values = {
        "denoise32_b1_p512_over_bandwidth_bound": f1 and f1["median_ms"] / f1["bw_bound_ms"],
        "denoise32_b32_p512_over_compute_bound": f32 and f32["median_ms"] / f32["compute_bound_ms"],
        "e2e_b1_tokens_per_s": e1 and e1["tokens_per_s"],
        "e2e_b1_loop_overhead": e1 and e1["loop_overhead"],
        "token_reuse50_b32_wall_ratio": t50 and t50["wall_ratio"],
        "layer_pass8_b1_wall_ratio": p8 and p8["wall_ratio"],
        "disabled_policy_wall_ratio": max(dis) if dis else None,
    }
    out = []
    for tname, (op, goal) in TARGET_GOALS.items():
        v = values[tname]
        met = None if v is None else (v <= goal if op == "<=" else v >= goal)
        out.append(
            {
                "name": tname,
                "value": v,
                "goal": f"{op} {goal}",
                "met": met,
                "model": model,
                "official": model == "7b"
                and "H100" in (data.get("gpu") or "")
                and data["grid"] == "full",
            }
        )
    return out


def _f(x, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.1f}"


def markdown(data: dict) -> str:
    bw, mm = data.get("bandwidth", {}), data.get("matmul", {})
    lines = [
        f"# v2.bench: {data['gpu'] or data['device']}",
        "",
        f"`{data['command']}`  ",
        f"torch {data['torch']} (CUDA {data['cuda']}), {data['dtype']}, grid {data['grid']}, "
        f"{data['elapsed_s']:.0f} s{'' if data['complete'] else ' (INCOMPLETE)'}  ",
        f"measured copy bandwidth {_f(bw.get('bytes_per_s'), '.0f', 1e-9)} GB/s (read + write); "
        f"matmul {_f(mm.get('flops_per_s'), '.1f', 1e-12)} TFLOP/s ({mm.get('n')}^3)",
        "",
        "## Targets",
        "",
        "| target | model | value | goal | met |",
        "|---|---|---|---|---|",
    ]
    for t in data["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(
            f"| {t['name']} | {t['model']} | {_f(t['value'], '.3f')} | {t['goal']} | {met} |"
        )
    lines += [
        "",
        "## Forward latency",
        "",
        "| model | kind | batch | prefix | tokens | median ms | bw bound ms | compute bound ms "
        "| bound/measured | TFLOP/s | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["forwards"]:
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['batch']} | {r['prefix']} | {r['tokens']} | "
            f"{_f(r['median_ms'])} | {_f(r['bw_bound_ms'])} | {_f(r['compute_bound_ms'])} | "
            f"{_f(r.get('bound_fraction'), '.0%')} | {_f(r.get('achieved_tflops'), '.1f')} | "
            f"{_gb(r['peak_memory_bytes'])} |"
        )
    lines += [
        "",
        "## Forced skipping (denoise forward, 32-token window)",
        "",
        "| model | batch | prefix | policy | median ms | wall ratio | FLOPs ratio | units ratio "
        "| bytes ratio | layers run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["skip"]:
        extra = ""
        if r.get("cycle_wall_ratio") is not None:
            extra = f" (cycle x{r['cycle_wall_ratio']:.3f})"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prefix']} | {r['policy']} | "
            f"{_f(r['median_ms'])} | {_f(r['wall_ratio'], '.3f')}{extra} | "
            f"{_f(r['flops_ratio'], '.3f')} | {_f(r['units_ratio'], '.3f')} | "
            f"{_f(r['bytes_ratio'], '.3f')} | {r['layers_run']} |"
        )
    lines += [
        "",
        "## End to end (threshold 1, ignore_eos)",
        "",
        "| model | batch | prompt | new | tokens/s | forwards/s | forwards | wall s "
        "| forward sum s | loop overhead | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["e2e"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prompt_tokens']} | {r['new_tokens']} | "
            f"{_f(r['tokens_per_s'], '.1f')} | {_f(r['forwards_per_s'], '.1f')} | "
            f"{r['forwards_total']} | {_f(r['wall_s'])} | {_f(r['forward_sum_s'])} | "
            f"{_f(r['loop_overhead'], '.1%')} | {_gb(r['peak_memory_bytes'])} |"
        )
    lines += [
        "",
        "## Autoregressive baseline (one token per forward)",
        "",
        "| model | batch | prefix | ms/step | bw bound ms | bound/measured | decode tokens/s "
        "| dLLM denoise32 ms | dLLM/AR per forward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["ar"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['prefix']} | {_f(r['step_ms'])} | "
            f"{_f(r['bw_bound_ms'])} | {_f(r.get('bound_fraction'), '.0%')} | "
            f"{_f(r['decode_tokens_per_s'], '.1f')} | {_f(r['dllm_denoise32_ms'])} | "
            f"{_f(r['dllm_over_ar'], '.2f')} |"
        )
    if data["errors"] or data["skipped"]:
        lines += ["", "## Errors and skipped work", ""]
        lines += [f"- error in {e['section']} ({e['model']}): {e['error']}" for e in data["errors"]]
        lines += [f"- skipped: {s}" for s in data["skipped"]]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


SHORT = {
    "none": "",
    "disabled": "off",
    "token_reuse_0": "t0",
    "token_reuse_25": "t25",
    "token_reuse_50": "t50",
    "token_reuse_75": "t75",
    "layer_pass_0": "p0",
    "layer_pass_4": "p4",
    "layer_pass_8": "p8",
    "reuse_k2_12": "k2",
}


README_BEGIN = "<!-- speed table: python -m v2.bench --readme JSON -->"
README_END = "<!-- /speed -->"


def readme_table(data: dict, source: str) -> str:
    """The README's speed table: the targets and end-to-end tokens/s, from one bench JSON."""
    model = next((t["model"] for t in data["targets"]), None)
    lines = [
        f"Measured by `{data['command']}` on {data['gpu'] or data['device']} "
        f"({model} shapes, random {data['dtype']} weights; [{source}]({source})):",
        "",
        "| measure | value | goal | met |",
        "|---|---|---|---|",
    ]
    for t in data["targets"]:
        met = {True: "yes", False: "no", None: "-"}[t["met"]]
        lines.append(f"| {t['name']} | {_f(t['value'], '.3f')} | {t['goal']} | {met} |")
    rows = [r for r in data["e2e"] if r["model"] == model]
    if rows:
        lines += [
            "",
            "| end to end, threshold 1, 256 new tokens | "
            + " | ".join(f"batch {r['batch']}" for r in rows)
            + " |",
            "|---|" + "---|" * len(rows),
            "| tokens/s | " + " | ".join(_f(r["tokens_per_s"], ".0f") for r in rows) + " |",
        ]
    return "\n".join(lines)


def update_readme(json_path: Path, readme: Path) -> None:
    data = json.loads(json_path.read_text())
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"error: {readme} has no {README_BEGIN} ... {README_END} block")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    source = json_path.resolve().relative_to(readme.resolve().parent).as_posix()
    table = readme_table(data, source)
    write_atomic(readme, f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")


def write_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    models = list(data["models"])
    colors = {m: f"C{i}" for i, m in enumerate(models)}

    ax = axes[0]
    for m in models:
        rows = [r for r in data["forwards"] if r["model"] == m and r["kind"] == "denoise32"]
        P = max((r["prefix"] for r in rows), key=lambda p: p == 512, default=None)
        rows = sorted((r for r in rows if r["prefix"] == P), key=lambda r: r["batch"])
        if rows:
            xs = [r["batch"] for r in rows]
            ax.plot(xs, [r["median_ms"] for r in rows], "o-", color=colors[m], label=f"{m}")
            ax.plot(xs, [r["bound_ms"] for r in rows], "--", color=colors[m], alpha=0.6)
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="ms")
    ax.set_title("denoise forward (32 tokens, prefix 512)\nsolid: measured, dashed: bound")
    ax.legend(fontsize=8)

    ax = axes[1]
    for m in models:
        for b, marker in ((1, "o"), (32, "s")):
            rows = [r for r in data["skip"] if r["model"] == m and r["batch"] == b]
            if rows:
                ax.scatter(
                    [r["flops_ratio"] for r in rows],
                    [r["wall_ratio"] for r in rows],
                    marker=marker,
                    color=colors[m],
                    label=f"{m} batch {b}",
                )
                for r in rows:
                    ax.annotate(
                        SHORT.get(r["policy"], r["policy"]),
                        (r["flops_ratio"], r["wall_ratio"]),
                        fontsize=6,
                        xytext=(3, 2),
                        textcoords="offset points",
                    )
    ax.plot([0, 1.05], [0, 1.05], "k:", lw=1)
    ax.set(xlim=(0, 1.1), ylim=(0, 1.3), xlabel="executed FLOPs / no skip", ylabel="wall / no skip")
    ax.set_title("forced skipping: wall-clock vs FLOPs\n(dotted: time follows FLOPs)")
    ax.legend(fontsize=8)

    ax = axes[2]
    for m in models:
        rows = sorted((r for r in data["e2e"] if r["model"] == m), key=lambda r: r["batch"])
        if rows:
            ax.plot(
                [r["batch"] for r in rows],
                [r["tokens_per_s"] for r in rows],
                "o-",
                color=colors[m],
                label=f"{m} dLLM t=1",
            )
        rows = sorted((r for r in data["ar"] if r["model"] == m), key=lambda r: r["batch"])
        if rows:
            ax.plot(
                [r["batch"] for r in rows],
                [r["decode_tokens_per_s"] for r in rows],
                "x--",
                color=colors[m],
                label=f"{m} AR",
            )
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s")
    ax.set_title("end to end, threshold 1 (AR: per-token decode)")
    ax.legend(fontsize=8)

    fig.suptitle(f"v2.bench on {data['gpu'] or data['device']} ({data['dtype']})")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' -> 'cpu'."""
    words = [w for w in re.split(r"[\s_-]+", device_name.lower()) if w]
    words = [w for w in words if w not in ("nvidia", "geforce", "tesla", "rtx")]
    for w in words:
        if re.search(r"\d", w):
            return re.sub(r"[^a-z0-9.]+", "", w) or "device"
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m v2.bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        default="7b,1.5b,tiny",
        help=f"comma-separated, from {', '.join([*SHAPES, 'tiny'])} (default 7b,1.5b,tiny)",
    )
    p.add_argument("--quick", action="store_true", help="a reduced grid")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default=None, help="file stem (default: a slug of the GPU name)")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=450.0,
        help="skip work not yet started after this many seconds (default 450)",
    )
    p.add_argument(
        "--readme",
        metavar="JSON",
        default=None,
        help="measure nothing: rewrite README.md's speed table from this bench JSON",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.readme:
        update_readme(Path(args.readme), Path(__file__).resolve().parent.parent / "README.md")
        return 0
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in (*SHAPES, "tiny")]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cpu" and any(m in ("7b", "1.5b") for m in args.models):
        print("error: the 7b / 1.5b shapes are GPU-only (built on the device)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args, argv)
    data = bench.run()
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
