"""Skipping at fixed rates, for timing, built on the real policies (so the time includes what the
real ones cost: the token policy's cosines and top-k, the engine's plan execution)."""

from __future__ import annotations

from layer_skip_generation_functions import LayerReusePolicy, LayerSkipPolicy
from token_skip_generation_functions import TokenSkipPolicy
from v2.policy import ALL_COMPUTE, ALL_PASS, ForwardContext, Policy, Uniform


class ForcedTokenReuse(TokenSkipPolicy):
    """The token policy's fixed-ratio variant, on at every rate: reuse `rate` of each row's
    positions (the most similar) in layers >= 1; rate 0 runs the machinery and reuses nothing."""

    name = "forced_token_reuse"

    def __init__(self, rate: float):
        super().__init__(reuse_ratio=rate)
        self.rate = rate

    @property
    def enabled(self) -> bool:
        return True


class ForcedLayerPass(LayerSkipPolicy):
    """The layer policy with its decision forced: PASS `n` layers spread evenly between the first
    and the last (which it protects), in every row, with no cosine computed."""

    name = "forced_layer_pass"

    def __init__(self, n: int):
        super().__init__(cosine_threshold=0.0)
        self.n = n
        self.passed: list[int] = []

    def begin_block(self, batch_size: int, block_size: int, num_layers: int) -> None:
        self.passed = spread_layers(self.n, num_layers)

    def begin_forward(self, ctx: ForwardContext) -> None:
        pass

    def plan(self, layer: int, ctx: ForwardContext) -> Uniform:
        return ALL_PASS if layer in self.passed else ALL_COMPUTE

    def config(self) -> dict:
        return {"policy": self.name, "n": self.n, "layers": self.passed}


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


def skip_policies(num_layers: int) -> list[tuple[str, Policy | None, float]]:
    """(label, policy, nominal skip rate) for the forced-rate section."""
    out: list[tuple[str, Policy | None, float]] = [
        ("none", None, 0.0),
        ("disabled", TokenSkipPolicy(cosine_threshold=1.0), 0.0),
    ]
    inner = (num_layers - 1) / num_layers  # layer 0 always computes
    for k in range(4):
        out.append((f"token_reuse_{25 * k}", ForcedTokenReuse(k / 4), inner * k / 4))
    for n in (0, 4, 8):
        m = len(spread_layers(scaled(n, num_layers), num_layers))
        out.append((f"layer_pass_{n}", ForcedLayerPass(scaled(n, num_layers)), m / num_layers))
    layers = middle_layers(scaled(12, num_layers), num_layers)
    reuse = LayerReusePolicy(reuse_k=2, layer_subset=layers)
    out.append(("reuse_k2_12", reuse, len(layers) / num_layers))
    return out
