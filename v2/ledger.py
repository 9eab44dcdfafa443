"""The engine's statistics as its forwards run (stats.py says what each count means).

What the host knows is counted at once; what only the device knows (units a plan reused, the
useful units of planned layers, attention pairs counted on the device, a plan's quota overflow)
accumulates in one device tensor, read with one synchronisation when the statistics are read.

A forward replayed from its record (cuda_graphs.ForwardRecorder) does not run its layer loop,
so the loop's host-side counts are kept as effects, typed values applied when the loop runs and
again at every replay: `LayerWork`, `Reused` (and `Referenced`, the reuse state's, layer_plans.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2 import flops
from v2.forward import Kind
from v2.model import ModelConfig
from v2.stats import Stats


@dataclass(frozen=True)
class LayerWork:
    """`rows` through layer `layer`'s matmuls (its executed units), of which useful: the units
    in scope (a dense layer; the forward's, not the recorded one's: layouts that do not depend
    on the scope's size are replayed for any size) or, `planned`, the units its plan computed
    (counted on the device); its attention's (query, key) pairs: pairs0 + pairs1 x keys."""

    layer: int
    rows: int
    planned: bool
    pairs0: int
    pairs1: int


@dataclass(frozen=True)
class Reused:
    """Layer `layer` reused every unit in scope."""

    layer: int


class Ledger:
    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.cfg = cfg
        L = cfg.num_hidden_layers
        # What only the device knows, per layer: units reused, useful units of planned layers,
        # attention pairs, plan overflows (layer_step.settle adds to them). `settled_rows`: the
        # rows executed by those planned layers (host known), so that padding = rows - useful.
        self.counters = torch.zeros(4, L, dtype=torch.long, device=device)
        self.layer_ids = [torch.tensor([i], device=device) for i in range(L)]
        self.scope = 0  # units in scope of the forward running (its effects' "every unit")
        self.reset()

    def reset(self) -> None:
        L = self.cfg.num_hidden_layers
        self.stats = Stats(L)
        self.counters.zero_()
        self.settled_rows = [0] * L

    def read(self) -> tuple[Stats, bool]:
        """The statistics so far, with the device's counters added (a synchronisation), and
        whether a plan computed more units than its quota allowed."""
        st = self.stats
        reused, useful, pairs, overflow = self.counters.tolist()
        self.counters.zero_()
        for i in range(self.cfg.num_hidden_layers):
            st.padding_units_per_layer[i] += self.settled_rows[i] - useful[i]
            st.reused_units_per_layer[i] += reused[i]
        self.settled_rows = [0] * self.cfg.num_hidden_layers
        st.executed_flops += flops.work(self.cfg, pairs=sum(pairs))
        return st, any(overflow)

    def forward(self, kind: str, rows: int, scope: int) -> None:
        """A forward of `kind` over `rows` rows with `scope` units in scope (each layer's
        baseline units)."""
        st = self.stats
        if kind == Kind.VERIFY:  # the causal decodes' count (stats.py)
            st.verify_forwards += 1
            st.verify_row_forwards += rows
        else:
            st.forwards[kind] += 1
            st.row_forwards[kind] += rows
        for i in range(self.cfg.num_hidden_layers):
            st.baseline_units_per_layer[i] += scope
        self.scope = scope

    def exact(self, units: int, keys: int, logit_rows: int) -> None:
        """An exact forward (prefill): `units` per layer, each over `keys` keys, every one of
        them executed and in the baseline."""
        cfg, st = self.cfg, self.stats
        for i in range(cfg.num_hidden_layers):
            st.executed_units_per_layer[i] += units
        total = cfg.num_hidden_layers * units
        work = flops.work(cfg, rows=total, pairs=total * keys, logit_rows=logit_rows)
        st.executed_flops += work
        st.baseline_flops += work

    def window(self, keys: int, logit_rows: int) -> None:
        """A window forward's baseline (every unit in scope through every layer, each over
        `keys` keys) and the logits of both (its layers' executed work comes as effects)."""
        cfg, st = self.cfg, self.stats
        units = self.scope * cfg.num_hidden_layers
        st.baseline_flops += flops.work(cfg, units, units * keys, logit_rows)
        st.executed_flops += flops.work(cfg, logit_rows=logit_rows)

    def apply(self, effect: LayerWork | Reused, keys: int) -> None:
        """One effect of a layer loop, with the forward's key count."""
        st = self.stats
        if isinstance(effect, Reused):
            st.reused_units_per_layer[effect.layer] += self.scope
            return
        i, rows = effect.layer, effect.rows
        st.executed_units_per_layer[i] += rows
        if effect.planned:
            self.settled_rows[i] += rows
        else:
            st.padding_units_per_layer[i] += rows - self.scope
        pairs = effect.pairs0 + effect.pairs1 * keys
        st.executed_flops += flops.work(self.cfg, rows, pairs)
