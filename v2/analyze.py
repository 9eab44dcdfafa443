"""A look inside the decoding: per layer and per denoise step, what the compute-skipping policies
threshold, and where the prediction settles. Turns looking into choosing a threshold.

    python -m v2.analyze --model v2/tiny/checkpoint --task tiny_gsm --n 16 --chat \\
        --max-new-tokens 128 --out docs/results/analysis/tiny

For the decoding that `generate` runs (with `--policy ...`, under that policy), a `Recorder`
(an observer, v2/observer.py) sees every layer's input of every denoise forward and records:

(a) layer cosine: per row, the mean over its in-scope window positions of cos(x_l, x_{l-1}), the
    inputs of consecutive layers (what the layer policy thresholds; l >= 1);
(b) token cosine: per (row, position), cos(x_l now, x_l at the previous denoise forward of the
    same block where the position was in scope) (what the token policy thresholds);
(c) logit lens: at every masked position p, the head (final norm + lm_head) applied to the
    hidden state that predicts it (position p - 1, as the decoder reads it) after d = 0 .. L
    layers; d = L is the model's prediction. "Holds from depth d": the lens prediction equals
    the final one at every depth >= d.

Out (in --out): analysis.json (the aggregates, the command and, per policy, the threshold that
would skip 10 / 25 / 50 % of the units in scope on this data) and analysis.png (heatmaps).

Skip fractions are read off the recorded scores, a unit being skipped when its score is above
the threshold: token = units of layers >= 1 with a reference; layer = (row, layer) decisions,
layers 0 and L-1 protected, weighted by the row's positions, ignoring `max_consecutive_skips`;
exit = a predicting unit at layer l whose lens top probability after some depth in
[1, l] is above the threshold (check_every 1, min_layer 1). They describe this run; a policy
that skips changes the run (compare with --policy active).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from layer_skip_generation_functions import row_cosine
from token_skip_generation_functions import cosine_and_remember
from v2.observer import Observer
from v2.policy import ForwardContext, Policy

ROOT = Path(__file__).resolve().parents[1]
FRACTIONS = (0.1, 0.25, 0.5)


@dataclass
class ForwardRecord:
    """One denoise forward. Units in scope are listed row-major (torch boolean indexing order)."""

    step: int
    window_start: int
    scope: torch.Tensor  # [rows, w] bool
    layer_cos: list[torch.Tensor] = field(default_factory=list)  # per layer l>=1: [busy rows]
    token_cos: list[torch.Tensor] = field(default_factory=list)  # per layer: [units] (nan: none)
    targets: torch.Tensor | None = None  # [rows, w] bool: units predicting a masked position
    lens_token: list[torch.Tensor] = field(default_factory=list)  # per depth 0..L: [targets]
    lens_prob: list[torch.Tensor] = field(default_factory=list)  # per depth 0..L: [targets]


class Recorder(Observer):
    """Records (a), (b), (c) of the module docstring for every denoise forward it watches."""

    def __init__(self, model, mask_id: int):
        self.mask_embedding = model.embed_tokens.weight[mask_id].detach()
        self.norm, self.head = model.norm, model.lm_head
        self.forwards: list[ForwardRecord] = []
        self.progress: tqdm | None = None

    def on_hidden(self, depth: int, x: torch.Tensor, ctx: ForwardContext) -> None:
        scope = ctx.units
        if depth == 0:
            if ctx.step == 0:  # a new block
                self.previous: list[torch.Tensor] | None = None  # per layer [rows, B, hidden]
                self.seen: list[torch.Tensor] | None = None
            self.record = r = ForwardRecord(ctx.step, ctx.window_start, scope.to("cpu", copy=True))
            # x is the embedding: a masked position is one whose input is the mask's embedding;
            # the unit before it predicts it.
            masked = (x == self.mask_embedding.to(x.dtype)).all(-1) & scope
            targets = torch.zeros_like(masked)
            targets[:, :-1] = masked[:, 1:]
            r.targets = targets & scope
        elif depth < ctx.num_layers:
            busy = scope.any(1)
            self.record.layer_cos.append(row_cosine(x, self.last_input, scope)[busy].cpu())
        if depth < ctx.num_layers:
            self.last_input = x.clone()
            self.record.token_cos.append(self._token_cosine(depth, x, ctx))
        self._lens(x)
        if depth == ctx.num_layers:
            self.forwards.append(self.record)
            if self.progress is not None:
                self.progress.update(1)

    def _lens(self, x: torch.Tensor) -> None:
        r = self.record
        logits = self.head(self.norm(x[r.targets])).float()
        prob, token = F.softmax(logits, -1).max(-1)
        r.lens_token.append(token.cpu())
        r.lens_prob.append(prob.cpu())

    def _token_cosine(self, layer: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.previous is None:
            shape = (x.shape[0], ctx.block_size)
            self.previous = [
                torch.zeros(*shape, x.shape[-1], dtype=x.dtype, device=x.device)
                for _ in range(ctx.num_layers)
            ]
            self.seen = [
                torch.zeros(shape, dtype=torch.bool, device=x.device) for _ in range(ctx.num_layers)
            ]
        w = slice(ctx.window_start, ctx.window_start + x.shape[1])
        prev, seen = self.previous[layer][:, w], self.seen[layer][:, w]  # views: updated in place
        cos = cosine_and_remember(x, prev, seen, ctx.units)
        cos = torch.where(cos < -1.5, float("nan"), cos)  # no reference yet
        return cos[ctx.units].cpu()


# ---- aggregates -----------------------------------------------------------------------------


def _mean(values: list[torch.Tensor]) -> float | None:
    v = torch.cat(values).double() if values else torch.zeros(0)
    v = v[~v.isnan()]
    return float(v.mean()) if v.numel() else None


def holds_from(tokens: list[torch.Tensor]) -> torch.Tensor:
    """Per target, the smallest depth d from which the lens prediction equals the final one
    (depth L) at every depth >= d. tokens: per depth 0..L, [targets]."""
    t = torch.stack(tokens)  # [L+1, targets]
    agree = t == t[-1]
    # d holds iff agree[d:] all true: a reverse cumulative product.
    suffix = agree.flip(0).int().cumprod(0).flip(0)
    return (suffix.shape[0] - suffix.sum(0)).long()


def skip_scores(forwards: list[ForwardRecord], num_layers: int) -> dict[str, np.ndarray]:
    """Per policy, one score per unit in scope (every layer of every recorded forward): the unit
    is skipped at a threshold below its score; -inf = never skipped (module docstring)."""
    token, layer, exit_ = [], [], []
    L, ninf = num_layers, float("-inf")
    for r in forwards:
        per_row = r.scope.sum(1)
        busy = per_row > 0
        for i in range(L):
            c = r.token_cos[i].double()
            token.append(torch.full_like(c, ninf) if i == 0 else torch.nan_to_num(c, nan=ninf))
            if i == 0 or i == L - 1:
                layer.append(torch.full((int(per_row.sum()),), ninf, dtype=torch.float64))
            else:
                layer.append(r.layer_cos[i - 1].double().repeat_interleave(per_row[busy]))
        # exit: per target, the running maximum of the lens probability over depths 1..l
        probs = torch.stack(r.lens_prob[1:L]).double()  # depths 1..L-1 = inputs of layers 1..
        running = probs.cummax(0).values  # [L-1, targets]
        targets_in_scope = r.targets[r.scope]
        for i in range(L):
            s = torch.full((int(r.scope.sum()),), ninf, dtype=torch.float64)
            if i >= 1:
                s[targets_in_scope] = running[i - 1]
            exit_.append(s)
    scores = {"token": token, "layer": layer, "exit": exit_}
    return {k: torch.cat(v).numpy() for k, v in scores.items()}


def thresholds(scores: np.ndarray, fractions=FRACTIONS) -> dict[str, dict]:
    """For each fraction f, the highest threshold that skips at least f of the units (a unit is
    skipped when its score is above the threshold), and the fraction it skips; None where no
    threshold can (too many units are never skipped)."""
    out = {}
    s = np.sort(scores)[::-1]  # descending
    n = s.size
    for f in fractions:
        k = int(np.ceil(f * n))  # skip at least k units: threshold just below the k-th highest
        if n == 0 or k == 0 or not np.isfinite(s[k - 1]):
            out[str(f)] = None
            continue
        below = s[s < s[k - 1]]
        t = float(below[0]) if below.size and np.isfinite(below[0]) else float(s[k - 1]) - 1e-6
        out[str(f)] = {"threshold": t, "skipped": float((scores > t).mean())}
    return out


def aggregate(forwards: list[ForwardRecord], num_layers: int) -> dict:
    """Means per (denoise step, layer) for the heatmaps; holds-from histogram; thresholds."""
    L = num_layers
    steps = max(r.step for r in forwards) + 1 if forwards else 0
    layer_cos = [[[] for _ in range(L)] for _ in range(steps)]
    token_cos = [[[] for _ in range(L)] for _ in range(steps)]
    agree = [[[] for _ in range(L + 1)] for _ in range(steps)]
    holds: list[torch.Tensor] = []
    holds_by_step: list[list[torch.Tensor]] = [[] for _ in range(steps)]
    for r in forwards:
        for i in range(L):
            if i >= 1:
                layer_cos[r.step][i].append(r.layer_cos[i - 1])
            token_cos[r.step][i].append(r.token_cos[i])
        final = r.lens_token[-1]
        for d in range(L + 1):
            agree[r.step][d].append((r.lens_token[d] == final).double())
        h = holds_from(r.lens_token)
        holds.append(h)
        holds_by_step[r.step].append(h.double())
    allholds = torch.cat(holds) if holds else torch.zeros(0, dtype=torch.long)
    return {
        "num_layers": L,
        "forwards": len(forwards),
        "targets": int(allholds.numel()),
        "by_step_layer": {
            "layer_cosine": [[_mean(c) for c in row] for row in layer_cos],
            "token_cosine": [[_mean(c) for c in row] for row in token_cos],
            "lens_agreement": [[_mean(c) for c in row] for row in agree],
        },
        "holds_from_depth": {
            "histogram": torch.bincount(allholds, minlength=L + 1).tolist(),
            "mean": float(allholds.double().mean()) if allholds.numel() else None,
            "mean_by_step": [_mean(h) for h in holds_by_step],
        },
        "thresholds": {k: thresholds(v) for k, v in skip_scores(forwards, L).items()},
    }


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("layer_cosine", "(a) cos(x_l, x_{l-1}), row mean", "layer l"),
        ("token_cosine", "(b) cos(x_l, previous step)", "layer l"),
        ("lens_agreement", "(c) lens = final prediction", "depth d (layers run)"),
    ]
    # two by two, at a size where a panel's labels and colour bar read at 100 dpi
    fig, grid = plt.subplots(2, 2, figsize=(11, 8))
    axes = grid.ravel()
    for ax, (key, name, ylabel) in zip(axes, panels, strict=False):
        data = np.array(
            [[np.nan if v is None else v for v in row] for row in result["by_step_layer"][key]]
        ).T  # [layers, steps]
        im = ax.imshow(data, aspect="auto", origin="lower", cmap="viridis", interpolation="none")
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("denoise step of the block")
        ax.set_ylabel(ylabel)
        fig.colorbar(im, ax=ax)
    h = result["holds_from_depth"]["histogram"]
    ax = axes[3]
    ax.bar(range(len(h)), h)
    ax.set_title("(d) depth from which the final prediction holds", fontsize=11)
    ax.set_xlabel("depth d")
    ax.set_ylabel("masked positions x forwards")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- command line ---------------------------------------------------------------------------

TASKS = {
    "tiny_gsm": ROOT / "v2/tiny/data/test.jsonl",
    "tiny_gsm_hard": ROOT / "v2/tiny/data/hard_test.jsonl",
}


def task_prompts(name: str, n: int) -> list[str]:
    """The first n questions of a task whose data is in the repository."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    from v2.tiny.data import read_jsonl

    return [q["question"] for q in read_jsonl(TASKS[name])[:n]]


def analyze(lm, texts: list[str], config, policy: Policy | None = None, chat: bool = False):
    """Runs the decoding watched by a Recorder; returns (aggregates, records, generation
    result)."""
    recorder = Recorder(lm.model, lm.ids.mask)
    with tqdm(desc="denoise forwards", unit="fwd", leave=False) as bar:
        recorder.progress = bar
        result = lm.generate(texts, config, policy, chat=chat, observer=recorder)
    recorder.progress = None
    out = aggregate(recorder.forwards, lm.model.cfg.num_hidden_layers)
    return out, recorder.forwards, result


def build_parser() -> argparse.ArgumentParser:
    from v2.generate import add_generation_arguments, add_model_arguments
    from v2.policies import add_policy_arguments

    p = argparse.ArgumentParser(prog="python -m v2.analyze", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="repeat for a batch")
    src.add_argument("--task", help=f"prompts from a task: {', '.join(TASKS)}")
    p.add_argument("--n", type=int, default=None, help="problems of --task (default 16)")
    p.add_argument("--chat", action="store_true", help="apply the chat template")
    add_generation_arguments(
        p, ("max_new_tokens", "threshold", "block_size", "small_block_size", "use_block_cache")
    )
    p.add_argument(
        "--out", type=Path, default=Path("analysis"), help="output directory (default ./analysis)"
    )
    add_policy_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from v2.checkpoint import CheckpointError
    from v2.generate import GenerationError, config_from_args, load_from_args
    from v2.policies import baseline_note, given_options, policy_from_args

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt and args.n is not None:
        parser.error("--n counts the problems of --task; with --prompt, the prompts are the batch")
    try:
        policy = policy_from_args(args)
        texts = args.prompt or task_prompts(args.task, 16 if args.n is None else args.n)
        lm = load_from_args(args)
        if note := baseline_note(policy, given_options(args), lm.model.cfg.num_hidden_layers):
            print(f"note: {note}", file=sys.stderr)
        config = config_from_args(args)
        out, _, result = analyze(lm, texts, config, policy, chat=args.chat)
    except (CheckpointError, GenerationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m v2.analyze " + " ".join(argv)
    policy_name = policy.name if policy else "no policy"
    record = {
        "command": command,
        "prompts": len(texts),
        "policy": policy.config() if policy else {"policy": "none"},
        "generated_tokens": result.stats.generated_tokens,
        "executed_flops_fraction": result.stats.to_dict()["flops_ratio"],
        **out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "analysis.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(out, args.out / "analysis.png", f"{args.model}: {len(texts)} prompts, {policy_name}")
    for name, th in out["thresholds"].items():
        cells = [
            f"{f}: {'-' if v is None else format(v['threshold'], '.4f')}" for f, v in th.items()
        ]
        print(f"{name} threshold to skip " + ", ".join(cells))
    print(f"wrote {args.out / 'analysis.json'} and {args.out / 'analysis.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
