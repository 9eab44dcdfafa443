"""What a generation call reports: forwards by kind, tokens, executed work and wall-clock.

Executed FLOPs are counted from the shapes the engine actually ran (v2/flops.py): per executed
(row, position, layer) unit 2 x (the layer's matmul weights) plus 4 x (keys its query's scores
are computed over, masked ones included) x (attention width), and 2 x hidden x vocab per logit
row. Baseline figures count the same forwards with every unit computed, so executed / baseline
is the per-forward saving; compare two runs' executed FLOPs for the end-to-end saving (skipping
changes how many forwards a block takes).

Units, per layer (compute-skipping.md section 5):
- baseline: the units in scope, what the same forwards run with no skipping;
- executed: every unit (row slot) fed through the layer's matmuls, padding included;
- padding: executed units that are not useful: rows waiting for the batch or finished but still
  in it, cache rows that hold no sequence, slots of a compacted layout past its units (the graph
  bucket), units run and discarded by a masked layout (out of scope, or reused / passed by the
  plan). Real work, in the executed FLOPs, but never counted as (negative) skipping;
- useful = executed - padding: units in scope that the plan computed;
- skipped = baseline - useful: units the plan reused (`reused_units_per_layer`) or passed.
So skip rate = 1 - useful / baseline (0 for no policy), padding rate = padding / baseline, and
executed / baseline = 1 - skip rate + padding rate. `padding_separated` is False for statistics
read from a record written before padding was counted apart (its executed units include
padding that cannot be told apart any more).

Causal decodes (speculative.py) add the verifier's causal forwards of the full model
(`verify_forwards`, per call and per row) and the tokens its drafts proposed and it kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORWARD_KINDS = ("prefill", "denoise_full", "denoise_sub", "commit")
# counts kept per layer, as `<name>_units_per_layer`
PER_LAYER = ("executed", "baseline", "reused", "padding")
SPECULATIVE_COUNTS = ("verify_forwards", "verify_row_forwards", "drafted_tokens", "accepted_tokens")


@dataclass
class Stats:
    num_layers: int
    forwards: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FORWARD_KINDS, 0))
    row_forwards: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FORWARD_KINDS, 0))
    generated_tokens: int = 0
    executed_flops: int = 0
    baseline_flops: int = 0
    executed_units_per_layer: list[int] = field(default_factory=list)
    baseline_units_per_layer: list[int] = field(default_factory=list)
    # Units the policy's plans reused (decided on the device; where a forward is too small for
    # skipping to pay, the engine may have run them anyway and discarded the result).
    reused_units_per_layer: list[int] = field(default_factory=list)
    # Executed units that are not useful (module docstring); executed - padding = useful.
    padding_units_per_layer: list[int] = field(default_factory=list)
    padding_separated: bool = True
    wall_seconds: float = 0.0
    # The engine's CUDA graph sets (distinct shapes / layouts captured) and failed captures, so far.
    graph_sets: int = 0
    graph_failures: int = 0
    # Causal decodes (speculative.py): verifier forwards, drafted and accepted tokens.
    verify_forwards: int = 0
    verify_row_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    def __post_init__(self) -> None:
        for name in PER_LAYER:
            attr = f"{name}_units_per_layer"
            setattr(self, attr, getattr(self, attr) or [0] * self.num_layers)

    @property
    def executed_units(self) -> int:
        return sum(self.executed_units_per_layer)

    @property
    def baseline_units(self) -> int:
        return sum(self.baseline_units_per_layer)

    @property
    def padding_units(self) -> int:
        return sum(self.padding_units_per_layer)

    @property
    def useful_units_per_layer(self) -> list[int]:
        """Executed units in scope that the plan computed (executed - padding)."""
        return [
            e - p
            for e, p in zip(
                self.executed_units_per_layer, self.padding_units_per_layer, strict=True
            )
        ]

    @property
    def useful_units(self) -> int:
        return self.executed_units - self.padding_units

    @property
    def decode_row_forwards(self) -> int:
        """Row-forwards that produce tokens: denoise, commit and verify (prefill is prompt work)."""
        r = self.row_forwards
        return r["denoise_full"] + r["denoise_sub"] + r["commit"] + self.verify_row_forwards

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per (row, decoding forward): 1.0 is autoregressive speed."""
        return self.generated_tokens / max(self.decode_row_forwards, 1)

    @property
    def tokens_per_verify_forward(self) -> float | None:
        """Generated tokens per (row, full-model causal forward) of a causal decode: 1.0 for the
        autoregressive decode, 1 + accepted drafts per verify forward for a speculative one;
        None for a decode with no verify forward (block diffusion)."""
        if not self.verify_row_forwards:
            return None
        return self.generated_tokens / self.verify_row_forwards

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def skip_rate_per_layer(self) -> list[float]:
        """1 - useful / baseline units per layer: the share the plans reused or passed (0 with
        no policy, whatever the padding)."""
        return [
            1.0 - u / b if b else 0.0
            for u, b in zip(self.useful_units_per_layer, self.baseline_units_per_layer, strict=True)
        ]

    def padding_rate_per_layer(self) -> list[float]:
        """Padding / baseline units per layer."""
        return [
            p / b if b else 0.0
            for p, b in zip(
                self.padding_units_per_layer, self.baseline_units_per_layer, strict=True
            )
        ]

    def add(self, other: Stats) -> None:
        for kind in FORWARD_KINDS:
            self.forwards[kind] += other.forwards[kind]
            self.row_forwards[kind] += other.row_forwards[kind]
        self.generated_tokens += other.generated_tokens
        self.executed_flops += other.executed_flops
        self.baseline_flops += other.baseline_flops
        self.wall_seconds += other.wall_seconds
        for name in PER_LAYER:
            mine, theirs = (getattr(s, f"{name}_units_per_layer") for s in (self, other))
            for i in range(self.num_layers):
                mine[i] += theirs[i]
        self.padding_separated = self.padding_separated and other.padding_separated
        self.graph_sets = max(self.graph_sets, other.graph_sets)
        self.graph_failures = max(self.graph_failures, other.graph_failures)
        for name in SPECULATIVE_COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def since(self, earlier: Stats) -> Stats:
        """The work done after `earlier`, a copy of these statistics taken before (for one
        forward's share). Time and tokens are left to the caller."""
        d = Stats(
            self.num_layers,
            graph_sets=self.graph_sets,
            graph_failures=self.graph_failures,
            padding_separated=self.padding_separated and earlier.padding_separated,
        )
        for kind in FORWARD_KINDS:
            d.forwards[kind] = self.forwards[kind] - earlier.forwards[kind]
            d.row_forwards[kind] = self.row_forwards[kind] - earlier.row_forwards[kind]
        d.executed_flops = self.executed_flops - earlier.executed_flops
        d.baseline_flops = self.baseline_flops - earlier.baseline_flops
        for name in PER_LAYER:
            now, then = (getattr(s, f"{name}_units_per_layer") for s in (self, earlier))
            setattr(d, f"{name}_units_per_layer", [a - b for a, b in zip(now, then, strict=True)])
        return d

    def to_dict(self) -> dict:
        """Everything a record keeps. The padding fields (useful_units, padding_units and their
        per-layer lists, padding_rate_per_layer) are left out for statistics that do not
        separate padding: a reader tells the two kinds apart by "padding_units"."""
        padding = {
            "useful_units": self.useful_units,
            "padding_units": self.padding_units,
            "useful_units_per_layer": self.useful_units_per_layer,
            "padding_units_per_layer": list(self.padding_units_per_layer),
            "padding_rate_per_layer": self.padding_rate_per_layer(),
        }
        return {
            "forwards": dict(self.forwards),
            "row_forwards": dict(self.row_forwards),
            "generated_tokens": self.generated_tokens,
            "tokens_per_forward": self.tokens_per_forward,
            "executed_units": self.executed_units,
            "baseline_units": self.baseline_units,
            "executed_flops": self.executed_flops,
            "baseline_flops": self.baseline_flops,
            "flops_ratio": self.executed_flops / self.baseline_flops
            if self.baseline_flops
            else 1.0,
            "skip_rate_per_layer": self.skip_rate_per_layer(),
            "executed_units_per_layer": list(self.executed_units_per_layer),
            "baseline_units_per_layer": list(self.baseline_units_per_layer),
            "reused_units_per_layer": list(self.reused_units_per_layer),
            **(padding if self.padding_separated else {}),
            "wall_seconds": self.wall_seconds,
            "tokens_per_second": self.tokens_per_second,
            "graph_sets": self.graph_sets,
            "graph_failures": self.graph_failures,
            **{name: getattr(self, name) for name in SPECULATIVE_COUNTS},
            "tokens_per_verify_forward": self.tokens_per_verify_forward,
            "acceptance_rate": self.acceptance_rate,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        """Statistics from `to_dict`'s output; from a record written before padding was
        counted apart (no "padding_units"), with `padding_separated` False (skip rates as
        recorded there: 1 - executed / baseline units, padding in the executed units)."""
        separated = "padding_units" in d
        s = cls(
            num_layers=len(d["executed_units_per_layer"]),
            executed_units_per_layer=list(d["executed_units_per_layer"]),
            baseline_units_per_layer=list(d["baseline_units_per_layer"]),
            reused_units_per_layer=list(d.get("reused_units_per_layer") or []),
            padding_units_per_layer=list(d.get("padding_units_per_layer") or []),
            padding_separated=separated,
            graph_sets=d.get("graph_sets", 0),
            graph_failures=d.get("graph_failures", 0),
        )
        s.forwards.update(d["forwards"])
        s.row_forwards.update(d["row_forwards"])
        s.generated_tokens = d["generated_tokens"]
        s.executed_flops, s.baseline_flops = d["executed_flops"], d["baseline_flops"]
        s.wall_seconds = d["wall_seconds"]
        for name in SPECULATIVE_COUNTS:
            setattr(s, name, d.get(name, 0))
        return s
