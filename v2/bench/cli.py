"""`python -m v2.bench`: runs the sections for each model, writes <out>/<name>.json (rewritten
after every section so a killed run keeps what it measured), .md and .png."""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from v2.bench import sections
from v2.bench.models import MODELS, load
from v2.bench.report import markdown, targets, update_readme, write_plot
from v2.bench.roofline import measure_bandwidth, measure_matmul, nbytes
from v2.bench.timing import Clock
from v2.engine import Engine
from v2.record import write_text

GRIDS = {
    "full": dict(
        batches=(1, 8, 32),
        prefixes=(512,),
        warmup=2,
        repeats=7,
        e2e_batches=(1, 8, 32),
        e2e_schedules=(1, 2, 3, 5),  # slots committed per forward (1: threshold 1)
        e2e_block_cache=(False, True),
        e2e_repeats=2,
        prompt_tokens=100,
        new_tokens=256,
        skip_batches=(1, 32),
        skip_prefix=512,
        skip_rounds=4,
        skip_steps=4,
        ar_models=("7b",),
        ar_batches=(1, 32),
        ar_repeats=2,
        tpf_problems=128,
    ),
    "quick": dict(
        batches=(1, 32),
        prefixes=(512,),
        warmup=1,
        repeats=3,
        e2e_batches=(1,),
        e2e_schedules=(1, 3),
        e2e_block_cache=(False, True),
        e2e_repeats=1,
        prompt_tokens=100,
        new_tokens=64,
        skip_batches=(1, 32),
        skip_prefix=512,
        skip_rounds=2,
        skip_steps=2,
        ar_models=("7b", "test"),
        ar_batches=(1,),
        ar_repeats=1,
        tpf_problems=32,
    ),
}
SECTIONS = ("forwards", "skip", "e2e", "hf_ar", "tokens_per_forward", "verify")


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
        # given to every engine the sections build (what --no-forward-graphs changes)
        self.engine_options = {"forward_graphs": not args.no_forward_graphs}
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
            "engine_options": self.engine_options,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": 0.0,
            "complete": False,
            "models": {},
            "forwards": [],
            "e2e": [],
            "skip": [],
            "ar": [],
            "tokens_per_forward": [],
            "verify": [],  # speculative decoding's verify forward vs a denoise forward
            "profile": [],
            "targets": [],
            "errors": [],
            "skipped": [],
            "notes": [
                "Weights are random (no download); timing does not depend on their values.",
                "Bounds: bw_bound = (weight bytes touched + K/V bytes read) / measured copy "
                "bandwidth; compute_bound = engine-counted executed FLOPs / measured matmul rate.",
                "Forward latency includes the logits of the rows whose logits are used.",
                "Forced skipping: each configuration has its own engine and prefix cache; each "
                "block starts with one all-compute forward that is not timed; rounds interleave "
                "the configurations (order reversed every other round) after warm-up rounds that "
                "end once a round records and captures nothing new.",
                "token_reuse_K is the token policy's fixed-ratio variant (cosine + top-k per row "
                "and layer, layers >= 1) at K %: its time includes the policy's own work.",
                "The AR baseline is transformers' Qwen2ForCausalLM on the same weights, generate "
                "with a static cache (compiled by transformers with torch.compile on a GPU).",
            ],
        }

    def continue_from(self, path: Path) -> None:
        """Start from an earlier record (`--continue`): same device, grid and engine options;
        its rows of the sections this run does not measure are kept, with what it said."""
        earlier = json.loads(path.read_text())
        for key in ("gpu", "device", "grid", "dtype", "engine_options"):
            if earlier.get(key) != self.data[key]:
                raise ValueError(
                    f"its {key} is {earlier.get(key)!r}, this run's {self.data[key]!r}: the "
                    "timings would not compare"
                )
        rerun = set(self.args.sections) | ({"profile"} if self.args.profile else set())
        for section in (*SECTIONS, "profile"):
            if section not in rerun:
                self.data[section] = earlier.get(section, [])
        for key in ("errors", "skipped"):  # an error names its section, a skip starts with it
            self.data[key] = [
                e
                for e in earlier.get(key, [])
                if (e["section"] if isinstance(e, dict) else e.split()[0]) not in rerun
            ]
        self.data["models"] = earlier.get("models", {})
        self.data["continues"] = {
            "command": earlier["command"],
            "started": earlier["started"],
            "kept": [s for s in (*SECTIONS, "profile") if s not in rerun and earlier.get(s)],
            "elapsed_s": earlier.get("elapsed_s"),
        }

    def engine(self, model, policy=None, **options) -> Engine:
        """An engine for a section, with the run's engine options."""
        return Engine(model, policy, **{**self.engine_options, **options})

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
        write_text(self.out / f"{self.name}.json", json.dumps(self.data, indent=1) + "\n")
        write_text(self.out / f"{self.name}.md", markdown(self.data))
        if plot:
            try:
                write_plot(self.data, self.out / f"{self.name}.png")
            except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the data
                self.data["plot_error"] = f"{type(e).__name__}: {e}"
                self.log(f"no plot: {self.data['plot_error']}")
                write_text(self.out / f"{self.name}.json", json.dumps(self.data, indent=1) + "\n")

    def error(self, section: str, model: str | None, e: BaseException) -> None:
        self.data["errors"].append(
            {"section": section, "model": model, "error": f"{type(e).__name__}: {e}"}
        )
        self.log(f"ERROR in {section} ({model}): {type(e).__name__}: {e}")
        traceback.print_exc()
        sys.stderr.flush()
        if self.clock.cuda:
            torch.cuda.empty_cache()

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
        need = need + 2 * 32 + 16
        chosen = [s for s in SECTIONS if s in self.args.sections]
        if self.args.profile:
            chosen.append("profile")
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
            except Exception as e:  # noqa: BLE001
                self.error("build", name, e)
                continue
            for section in chosen:
                if self.over_deadline(f"{section} {name}"):
                    continue
                try:
                    getattr(sections, section)(self, name, model, ids)
                except Exception as e:  # noqa: BLE001 - keep measuring the other sections
                    self.error(section, name, e)
                self.save()
            del model
            if self.clock.cuda:
                torch.cuda.empty_cache()
            self.save(plot=True)
        self.data["complete"] = True
        self.save(plot=True)
        self.log(f"done: {self.out / self.name}.{{json,md,png}}")
        return self.data


def slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' -> 'cpu'."""
    words = [w for w in re.split(r"[\s_-]+", device_name.lower()) if w]
    words = [w for w in words if w not in ("nvidia", "geforce", "tesla", "rtx")]
    for w in words:
        if re.search(r"\d", w):
            return re.sub(r"[^a-z0-9.]+", "", w) or "device"
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m v2.bench",
        description="Wall-clock of the engine's forwards, forced skipping, end-to-end generation "
        "and a compiled autoregressive baseline, next to bounds measured on the same device.",
    )
    p.add_argument(
        "--models",
        default="7b,1.5b,tiny",
        help=f"comma-separated, from {', '.join(MODELS)} (default 7b,1.5b,tiny)",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, from {', '.join(SECTIONS)} (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="a reduced grid")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile denoise forwards (kernel time by class, kernels, idle, host syncs)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default=None, help="file stem (default: a slug of the GPU name)")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=540.0,
        help="skip work not yet started after this many seconds (default 540)",
    )
    p.add_argument(
        "--no-forward-graphs",
        action="store_true",
        help="engines run every forward's layer loop, one CUDA graph per layer step, instead of "
        "replaying whole forwards (to measure what forward graphs change)",
    )
    p.add_argument(
        "--continue",
        dest="continue_from",
        metavar="JSON",
        default=None,
        help="add this run's sections to an earlier record of the same device and grid (its "
        "rows of other sections are kept, rows of sections run again are replaced): a bench "
        "longer than one job in two, one record and one set of targets",
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
        update_readme(Path(args.readme), Path(__file__).resolve().parents[2] / "README.md")
        return 0
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    unknown += [s for s in args.sections if s not in SECTIONS]
    if unknown:
        print(f"error: unknown model(s) or section(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cpu" and any(m in ("7b", "1.5b") for m in args.models):
        print("error: the 7b / 1.5b shapes are GPU-only (built on the device)", file=sys.stderr)
        return 2
    if args.profile and torch.device(args.device).type != "cuda":
        print("error: --profile needs a CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args, argv)
    if args.continue_from:
        try:
            bench.continue_from(Path(args.continue_from))
        except (OSError, ValueError) as e:
            print(f"error: --continue {args.continue_from}: {e}", file=sys.stderr)
            return 2
    data = bench.run()
    return 1 if data["errors"] else 0
