"""The bench's measurements, one function per section; each appends rows to `bench.data`."""

from __future__ import annotations

import functools
import time

import torch

from v2.attention import choose
from v2.bench.forced import skip_policies
from v2.bench.models import ordinary_tokens, token_tensor
from v2.bench.report import e2e_row
from v2.bench.roofline import bytes_read, roofline
from v2.bench.timing import ForwardTimer, median
from v2.checkpoint import TokenIds
from v2.engine import Engine
from v2.generate import GenerationConfig, generate
from v2.model import Network


def _stats_snapshot(engine: Engine) -> tuple[int, int, list[int], list[int]]:
    """Executed and no-skip FLOPs, executed and padding units per layer (stats.py)."""
    s = engine.stats
    units = (s.executed_units_per_layer, s.padding_units_per_layer)
    return s.executed_flops, s.baseline_flops, *(list(u) for u in units)


def _diff(a, b) -> tuple[int, int, list[int], list[int]]:
    return (
        b[0] - a[0],
        b[1] - a[1],
        *([y - x for x, y in zip(u, v, strict=True)] for u, v in ((a[2], b[2]), (a[3], b[3]))),
    )


def forwards(bench, name: str, model: Network, ids: TokenIds) -> None:
    """Latency of each forward kind through the Engine, per batch and prefix; at batches up to
    8 also with FlexAttention (`attention` flex: flash decoding, attention.py) against the
    default backend, to choose by measurement."""
    g = bench.grid
    prefixes = sorted(set(g["prefixes"]) | {g["skip_prefix"]})
    for b in g["batches"]:
        for P in prefixes:
            for attention in (None, "flex") if b <= 8 else (None,):
                tag = "" if attention is None else f" {attention}"
                if not bench.over_deadline(f"forwards {name} b{b} p{P}{tag}"):
                    _forwards_case(bench, name, model, ids, b, P, attention)
        bench.save()


def _forwards_case(bench, name, model: Network, ids: TokenIds, b: int, P: int, attention) -> None:
    g, cfg, dev, clock = bench.grid, model.cfg, bench.device, bench.clock
    B, S, V = cfg.block_size, 8, cfg.vocab_size
    clock.reset_peak()
    how = {}
    if attention is not None:
        how["attention"] = choose(dev, bench.dtype, False, name=attention)
    engine = bench.engine(model, **how)
    engine.allocate(b, P + B)
    prompt = token_tensor(ids, V, b, P, dev)
    block = token_tensor(ids, V, b, B, dev)
    full_out = torch.arange(S, 2 * S, device=dev) - 1
    sub_out = (torch.arange(S, 2 * S, device=dev) - 1 - S).clamp(min=0)

    def prefill(engine=engine, prompt=prompt):
        engine.logits(engine.prefill(prompt))

    def denoise32(engine=engine, block=block, full_out=full_out):
        engine.logits(engine.denoise(block, 0, full_out))

    def denoise8(engine=engine, block=block, sub_out=sub_out):
        engine.logits(engine.denoise(block[:, S : 2 * S], S, sub_out))

    def commit(engine=engine, block=block, P=P):
        engine.logits(engine.commit(block))
        engine.prefix_len = P  # time the same commit again

    kinds = [
        ("prefill", prefill, P, P, 1),
        ("denoise32", denoise32, B, P + B, S),
        ("denoise8", denoise8, S, P + B, S),
        ("commit", commit, B, P + B, 1),
    ]
    if attention is not None:  # the prefill is the cached forward, whatever the backend
        kinds = kinds[1:]
    prefill()  # the prefix cache every other forward attends to
    engine.begin_block()
    for kind, fn, window, keys, logit_rows in kinds:
        clock.reset_peak()
        warmup = clock.warm_up(fn, [engine], g["warmup"])
        before = _stats_snapshot(engine)
        ms = [clock.once(fn) for _ in range(g["repeats"])]
        work = _diff(before, _stats_snapshot(engine))[0] / g["repeats"]
        m = median(ms)
        wb, kvb = bytes_read(model, list(range(cfg.num_hidden_layers)), b, window, keys, logit_rows)
        row = {
            "model": name,
            "kind": kind,
            "batch": b,
            "prefix": P,
            "attention": engine.attention.name,
            "window": window,
            "tokens": b * window,
            "median_ms": m,
            "min_ms": min(ms),
            "max_ms": max(ms),
            "repeats": len(ms),
            "warmup_calls": warmup,
            **roofline(m, wb, kvb, work, bench.bw, bench.rate),
            "peak_memory_bytes": clock.peak(),
        }
        bench.data["forwards"].append(row)
        bench.log(
            f"{name} {kind:9s} b{b:<2d} p{P:<4d} {engine.attention.name:6s} {m:8.2f} ms "
            f" bound {row['bound_ms']:7.2f} ms ({row['bound_fraction']:.0%})"
        )


def skip(bench, name: str, model: Network, ids: TokenIds) -> None:
    """Denoise forwards (32-token window) under forced skip rates vs no policy, timed in
    interleaved rounds (every configuration once per round, the order reversed every other
    round) so that drift over the run falls on all of them alike."""
    g, cfg, dev, clock = bench.grid, model.cfg, bench.device, bench.clock
    B, S, V, P, L = cfg.block_size, 8, cfg.vocab_size, g["skip_prefix"], cfg.num_hidden_layers
    for b in g["skip_batches"]:
        if bench.over_deadline(f"skip {name} b{b}"):
            continue
        clock.reset_peak()
        prompt = token_tensor(ids, V, b, P, dev)
        g_ = torch.Generator(device=dev).manual_seed(b)
        # A block whose tokens change between steps (as decoding changes them), so that the token
        # policy's cosines are not all 1.
        blocks = [token_tensor(ids, V, b, B, dev) for _ in range(g["skip_steps"] + 1)]
        for i, blk in enumerate(blocks[1:], 1):
            flip = torch.rand(blk.shape, device=dev, generator=g_) < 0.1 * i
            blk[flip] = ids.mask
        out_pos = torch.arange(S, 2 * S, device=dev) - 1
        runs = []
        for label, policy, rate in skip_policies(L):
            e = bench.engine(model, policy)
            e.allocate(b, P + B)
            e.prefill(prompt)
            runs.append((label, policy, rate, e, []))
        # warm-up rounds (compiles, records, captures) until a whole round makes none
        warm = functools.partial(_skip_round, clock, runs[::-1], blocks, out_pos, None)
        warmup = clock.warm_up(warm, [r[3] for r in runs])
        for r in range(1, 1 + g["skip_rounds"]):
            _skip_round(clock, runs if r % 2 else runs[::-1], blocks, out_pos, r)
        base_ms = base_bytes = None
        for label, policy, rate, e, samples in runs:
            # reuse_k2: the skipping (odd) steps; its cycle mean is reported beside.
            chosen = [s for s in samples if s[0] % 2] if label.startswith("reuse_k") else samples
            m = median([s[1] for s in chosen])
            ex = sum(s[2][0] for s in chosen)
            bl = sum(s[2][1] for s in chosen)
            executed = [sum(s[2][2][i] for s in chosen) for i in range(L)]
            padding = [sum(s[2][3][i] for s in chosen) for i in range(L)]
            units = [e - p for e, p in zip(executed, padding, strict=True)]  # useful units
            ran = [i for i in range(L) if executed[i] > 0]
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
                "min_ms": min(s[1] for s in chosen),
                "max_ms": max(s[1] for s in chosen),
                "samples": len(chosen),
                "wall_ratio": m / base_ms if base_ms else None,
                "flops_ratio": ex / bl if bl else None,
                "units_ratio": sum(units) / (len(chosen) * b * B * L),
                "units_ratio_per_layer": [u / (len(chosen) * b * B) for u in units],
                # executed units that are not useful (a compacted layout's bucket slots, what a
                # masked layout ran and discarded), over all units
                "padding_ratio": sum(padding) / (len(chosen) * b * B * L),
                "bytes_ratio": (wb + kvb) / base_bytes if base_bytes else None,
                "layers_run": len(ran),
                "graph_sets": len(e.graphs.sets),
                "graph_failures": len(e.graphs.failures),
                "warmup_rounds": warmup,
            }
            if label.startswith("reuse_k"):
                cycle = median([s[1] for s in samples if s[0] % 2 == 0])
                row["cycle_wall_ratio"] = (m + cycle) / (2 * base_ms) if base_ms else None
            bench.data["skip"].append(row)
            bench.log(
                f"{name} skip b{b:<2d} {label:15s} {m:8.2f} ms  wall x{row['wall_ratio']:.3f}  "
                f"FLOPs x{row['flops_ratio']:.3f}"
            )
        for run in runs:
            run[3].cache = None
        bench.save()


def _skip_round(clock, runs, blocks, out_pos, timed: int | None) -> None:
    """One round of the skip section: each run in turn decodes a block (step 0 computes
    everything, steps 1.. may skip); with `timed`, each skipping step's time and statistics
    are added to its run's samples."""
    for _label, _policy, _rate, e, samples in runs:
        e.begin_block()
        e.logits(e.denoise(blocks[0], 0, out_pos))
        for step in range(1, len(blocks)):
            before = _stats_snapshot(e)
            ms = clock.once(lambda e=e, blk=blocks[step]: e.logits(e.denoise(blk, 0, out_pos)))
            if timed:
                samples.append((step, ms, _diff(before, _stats_snapshot(e))))


def e2e(bench, name: str, model: Network, ids: TokenIds) -> None:
    """generate() end to end with ignore_eos under a forced commit schedule: k slots committed
    per row and denoise forward (k = 1 is threshold 1), with the sub-block cache off and on, at
    each batch. Measured on the real loop, not projected. The forwards (logits included) are
    marked by the engine's timer; the rest of the wall time is the loop."""
    g = bench.grid
    for b in g["e2e_batches"]:
        for block_cache in g["e2e_block_cache"]:
            for k in g["e2e_schedules"]:
                if bench.over_deadline(f"e2e {name} b{b} k{k} cache {block_cache}"):
                    continue
                _e2e_case(bench, name, model, ids, b, (k, block_cache))
                bench.save()


def _e2e_case(bench, name: str, model: Network, ids: TokenIds, b: int, schedule) -> None:
    g, cfg, clock = bench.grid, model.cfg, bench.clock
    k, block_cache = schedule
    prompts = [ordinary_tokens(ids, cfg.vocab_size, g["prompt_tokens"], r) for r in range(b)]
    gc = GenerationConfig(
        max_new_tokens=g["new_tokens"],
        threshold=1.0,
        ignore_eos=True,
        commit_per_forward=k,
        use_block_cache=block_cache,
    )
    engine = bench.engine(model, None, block_size=cfg.block_size, block_cache=block_cache)
    # warm-up: compiles, records and captures, until a whole generation makes none
    warmup = clock.warm_up(
        functools.partial(generate, model, prompts, ids, gc, engine=engine), [engine]
    )
    clock.reset_peak()
    walls, fwd, result = [], [], None
    for _ in range(g["e2e_repeats"]):
        engine.timer = timer = ForwardTimer(clock)
        clock.sync()
        t = time.perf_counter()
        result = generate(model, prompts, ids, gc, engine=engine)
        clock.sync()
        walls.append(time.perf_counter() - t)
        engine.timer = None
        fwd.append(timer.total_ms() / 1e3)
    st, wall = result.stats, median(walls)
    n_fwd = sum(st.forwards.values())
    row = {
        "model": name,
        "batch": b,
        "commit_per_forward": k,
        "block_cache": block_cache,
        "prompt_tokens": g["prompt_tokens"],
        "new_tokens": g["new_tokens"],
        "repeats": len(walls),
        "wall_s": wall,
        "walls_s": walls,
        "generated_tokens": st.generated_tokens,
        "tokens_per_s": st.generated_tokens / wall,
        "forwards": dict(st.forwards),
        "forwards_total": n_fwd,
        "forwards_per_s": n_fwd / wall,
        "tokens_per_forward": st.tokens_per_forward,
        "forward_sum_s": median(fwd),
        "loop_overhead": median([w / f - 1 for w, f in zip(walls, fwd, strict=True)]),
        "executed_flops": st.executed_flops,
        "achieved_tflops": st.executed_flops / wall / 1e12,
        "graph_sets": st.graph_sets,
        "graph_failures": st.graph_failures,
        "warmup_generations": warmup,
        "peak_memory_bytes": clock.peak(),
    }
    bench.data["e2e"].append(row)
    bench.log(
        f"{name} e2e b{b:<2d} k{k} cache {'on ' if block_cache else 'off'} "
        f"{row['tokens_per_s']:9.1f} tokens/s {row['forwards_per_s']:7.1f} forwards/s, "
        f"{row['tokens_per_forward']:.2f} tokens/forward, loop +{row['loop_overhead']:.1%} "
        f"over the forwards ({n_fwd} forwards, {wall:.2f} s)"
    )


def tokens_per_forward(bench, name: str, model: Network, ids: TokenIds) -> None:
    """The tiny model on its own test problems (threshold 1 and 0.9, batch 32): how many tokens a
    trained model commits per forward, onto which the large shapes' forwards/s are projected."""
    from v2.bench.models import TINY_CHECKPOINT
    from v2.checkpoint import load_tokenizer
    from v2.tiny.data import read_jsonl
    from v2.tiny.train import prompt_text

    if name != "tiny":
        return
    tok, _ = load_tokenizer(TINY_CHECKPOINT)
    problems = read_jsonl(TINY_CHECKPOINT.parent / "data" / "test.jsonl")[: g_problems(bench)]
    prompts = [
        tok.encode(prompt_text(tok, p["question"]), add_special_tokens=False) for p in problems
    ]
    for threshold in (1.0, 0.9):
        gc = GenerationConfig(max_new_tokens=256, threshold=threshold)
        total = None
        for i in range(0, len(prompts), 32):
            st = generate(model, prompts[i : i + 32], ids, gc).stats
            if total is None:
                total = st
            else:
                total.add(st)
        bench.data["tokens_per_forward"].append(
            {
                "model": name,
                "threshold": threshold,
                "problems": len(prompts),
                "batch": 32,
                "tokens_per_forward": total.tokens_per_forward,
            }
        )
        bench.log(f"{name} threshold {threshold}: {total.tokens_per_forward:.2f} tokens/forward")
    bench.save()


def g_problems(bench) -> int:
    return bench.grid["tpf_problems"]


def hf_ar(bench, name: str, model: Network, ids: TokenIds) -> None:
    """The fair autoregressive baseline: transformers' Qwen2ForCausalLM on the same weights,
    `generate` with a static cache (which transformers compiles with torch.compile on a GPU),
    greedy, the same prompt and number of new tokens, EOS ignored."""
    from v2.bench.hf import hf_model, hf_tokens_per_s

    g = bench.grid
    if name not in g["ar_models"]:
        return
    hf = hf_model(model)
    for b in g["ar_batches"]:
        if bench.over_deadline(f"ar {name} b{b}"):
            continue
        prompts = token_tensor(ids, model.cfg.vocab_size, b, g["prompt_tokens"], bench.device)
        row = hf_tokens_per_s(hf, prompts, g["new_tokens"], g["ar_repeats"], bench.clock)
        row.update(model=name, batch=b, prompt_tokens=g["prompt_tokens"])
        dllm = e2e_row(bench.data["e2e"], name, b)  # k = 1, no sub-block cache
        row["dllm_tokens_per_s"] = dllm and dllm["tokens_per_s"]
        row["dllm_over_ar"] = dllm and dllm["tokens_per_s"] / row["tokens_per_s"]
        bench.data["ar"].append(row)
        bench.log(
            f"{name} HF AR b{b:<2d} {row['tokens_per_s']:9.1f} tokens/s "
            f"(compile + warm-up {row['warmup_s']:.0f} s; dLLM/AR "
            f"{row['dllm_over_ar'] or float('nan'):.2f})"
        )
        bench.save()
    del hf


def profile(bench, name: str, model: Network, ids: TokenIds) -> None:
    """torch.profiler over denoise forwards (32-token window, prefix 512) per batch, with no
    policy and with 0 % and 50 % forced token reuse (0 %: the reuse machinery alone): kernel
    time by class, kernels per forward, GPU idle share, host synchronisations and the top
    kernels by time."""
    from v2.bench.forced import ForcedTokenReuse
    from v2.bench.profiling import breakdown

    g, cfg, dev = bench.grid, model.cfg, bench.device
    B, P, V = cfg.block_size, g["skip_prefix"], cfg.vocab_size
    out = torch.arange(7, 15, device=dev)
    for b in g["skip_batches"]:
        for label, make in (
            ("none", lambda: None),
            ("token_reuse_0", lambda: ForcedTokenReuse(0.0)),
            ("token_reuse_50", lambda: ForcedTokenReuse(0.5)),
        ):
            e = bench.engine(model, make())
            e.allocate(b, P + B)
            e.prefill(token_tensor(ids, V, b, P, dev))
            blocks = [token_tensor(ids, V, b, B, dev) for _ in range(2)]
            blocks[1][:, ::3] = ids.mask
            e.begin_block()

            def step(e=e, blocks=blocks):
                e.logits(e.denoise(blocks[1], 0, out))

            e.logits(e.denoise(blocks[0], 0, out))
            for _ in range(3):
                step()
            row = breakdown(step, forwards=5, device=dev)
            row.update(model=name, batch=b, prefix=P, policy=label)
            bench.data["profile"].append(row)
            bench.log(
                f"{name} profile b{b:<2d} {label:15s} {row['wall_ms']:.2f} ms/forward, "
                f"{row['kernels_per_forward']:.0f} kernels, idle {row['gpu_idle_share']:.1%}, "
                f"{row['host_syncs_per_forward']:.1f} syncs"
            )
            e.cache = None
    bench.save()


def verify(bench, name: str, model: Network, ids: TokenIds) -> None:
    """Speculative decoding's verify forward (a causal window of S + 1 tokens over the verifier's
    own cache: a causal engine's, v2/engine.py) against a denoise forward over the 32-token
    block, per batch and prefix; each through the engine as configured (CUDA graphs on a GPU)
    and eagerly, so that the kind of forward and the way it runs are told apart."""
    for b in bench.grid["batches"]:
        for P in bench.grid["prefixes"]:
            if not bench.over_deadline(f"verify {name} b{b} p{P}"):
                _verify_case(bench, name, model, ids, b, P)
        bench.save()


def _verify_case(bench, name: str, model: Network, ids: TokenIds, b: int, P: int) -> None:
    g, cfg, dev, clock = bench.grid, model.cfg, bench.device, bench.clock
    B, S, V, L = cfg.block_size, 8, cfg.vocab_size, cfg.num_hidden_layers
    prompt = token_tensor(ids, V, b, P, dev)
    block = token_tensor(ids, V, b, B, dev)
    rows = torch.arange(b, device=dev)
    at = torch.full((b,), P, device=dev)
    window, width = block[:, : S + 1], at.new_full((b,), S + 1)
    out = torch.arange(S - 1, 2 * S - 1, device=dev)

    def made(eager: bool, **kind) -> Engine:
        """An engine as the run configures it, or one with no graphs and no compilation."""
        how = dict(cuda_graphs=False, compile=False) if eager else {}
        e = Engine(model, **how, **kind) if eager else bench.engine(model, **kind)
        e.allocate(b, P + B)
        return e

    # (kind, window, logit rows, forward, engine: its executed FLOPs, warmed up)
    verifies, denoises = [], []
    for eager in (False, True):
        tail = "_eager" if eager else ""
        v = made(eager, causal=True)
        v.prefill(prompt, last=False)  # the prefix's causal K/V
        fn = lambda v=v: v.logits(v.verify(window, rows, at, width))  # noqa: E731
        verifies.append((f"verify{S + 1}{tail}", S + 1, S + 1, fn, v))
        e = made(eager)
        e.prefill(prompt)
        e.begin_block()
        fn = lambda e=e: e.logits(e.denoise(block, 0, out))  # noqa: E731
        denoises.append((f"denoise32{tail}", B, S, fn, e))
    runs = verifies + denoises
    rows_out = []
    for kind, w, logit_rows, fn, engine in runs:
        warmup = clock.warm_up(fn, [engine], g["warmup"])
        before = engine.stats.executed_flops
        ms = [clock.once(fn) for _ in range(g["repeats"])]
        work = (engine.stats.executed_flops - before) / g["repeats"]
        m = median(ms)
        wb, kvb = bytes_read(model, list(range(L)), b, w, P + w, logit_rows)
        rows_out.append(
            {
                "model": name,
                "kind": kind,
                "batch": b,
                "prefix": P,
                "window": w,
                "median_ms": m,
                "min_ms": min(ms),
                "max_ms": max(ms),
                "repeats": len(ms),
                "warmup_calls": warmup,
                **roofline(m, wb, kvb, work, bench.bw, bench.rate),
            }
        )
    base = next(r["median_ms"] for r in rows_out if r["kind"] == "denoise32")
    for row in rows_out:
        row["vs_denoise32"] = row["median_ms"] / base
        bench.data["verify"].append(row)
        bench.log(
            f"{name} {row['kind']:16s} b{b:<2d} p{P:<4d} {row['median_ms']:8.2f} ms "
            f"(x{row['vs_denoise32']:.2f} of denoise32)"
        )
