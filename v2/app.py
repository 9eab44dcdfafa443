"""A web app that shows block diffusion decoding step by step, with the compute-skipping policies:

    python -m v2.app --model v2/tiny/checkpoint [--host 127.0.0.1] [--port 7860] [--share]

Chat with the model (its chat template, the conversation as history); the answer streams as it
is decoded. Beside it, the current block at every denoise forward (prompt, masked, newly committed
and already committed tokens), the forward's plan per layer and block position (computed, reused,
passed, not run) and its statistics; a slider replays the forwards of the last answer. The
decoding settings and the policy with its options are controls; the policies and their options
come from the registry (v2/policies.py). One model: requests queue and run one at a time.
It binds 127.0.0.1 unless told otherwise; a public link only with --share.
"""

from __future__ import annotations

import argparse
import html
import os
import queue
import sys
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home at launch

import torch  # noqa: E402

from v2.chat import ChatError, ChatSession, StepRecord  # noqa: E402
from v2.checkpoint import CheckpointError  # noqa: E402
from v2.generate import (  # noqa: E402
    FastDLLM,
    GenerationConfig,
    add_model_arguments,
    load_from_args,
)
from v2.observer import NOT_RUN  # noqa: E402
from v2.policies import options_of, policy_names  # noqa: E402
from v2.policy import COMPUTE, PASS, REUSE  # noqa: E402

STATE_STYLE = {
    "prompt": "background:#eef0f3;color:#555",
    "masked": "background:#d0d4da;color:#8a8f98",
    "new": "background:#1f9d55;color:#fff;font-weight:bold",
    "committed": "background:#cfe8ff;color:#123",
    "outside": "background:#fff;color:#bbb",
}
PLAN_STYLE = {
    COMPUTE: ("#2b6cb0", "computed"),
    REUSE: ("#f0a030", "reused"),
    PASS: ("#9f7aea", "passed"),
    NOT_RUN: ("#ffffff", "not run"),
}
CSS = """
#block span { display:inline-block; margin:1px; padding:1px 3px; border-radius:3px;
  font-family:monospace; white-space:pre; min-width:0.8em; }
#heatmap table { border-collapse:collapse; }
#heatmap td { width:11px; height:11px; padding:0; border:1px solid #e2e2e2; }
#heatmap th { font-size:10px; font-weight:normal; padding:0 4px; text-align:right; }
.legend { display:inline-block; width:11px; height:11px; border:1px solid #ccc; margin:0 3px; }
"""


# ---- rendering (plain functions of a StepRecord) -------------------------------------------------


def render_block(r: StepRecord) -> str:
    spans = []
    for j, (tok, state) in enumerate(zip(r.tokens, r.states, strict=True)):
        text = "░" if state == "masked" else tok.replace("\n", "⏎") or "∅"
        spans.append(
            f'<span class="tok {state}" style="{STATE_STYLE[state]}" '
            f'title="block position {j}: {state}">{html.escape(text)}</span>'
        )
    legend = " ".join(
        f'<span style="{style}">{name}</span>'
        for name, style in STATE_STYLE.items()
        if name != "outside"
    )
    return f'<div id="block-tokens">{"".join(spans)}</div><div><small>{legend}</small></div>'


def render_heatmap(r: StepRecord) -> str:
    rows = []
    for layer, codes in enumerate(r.plan):
        cells = "".join(
            f'<td style="background:{PLAN_STYLE[c][0]}" title="layer {layer}, position {j}: '
            f'{PLAN_STYLE[c][1]}"></td>'
            for j, c in enumerate(codes)
        )
        rows.append(f"<tr><th>layer {layer}</th>{cells}</tr>")
    legend = " ".join(
        f'<span class="legend" style="background:{color}"></span>{name}'
        for color, name in PLAN_STYLE.values()
    )
    return (
        f"<div><small>units per layer (rows) and block position (columns): {legend}</small></div>"
        f"<table>{''.join(rows)}</table>"
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render_stats(r: StepRecord, n_steps: int | None = None) -> str:
    f, t = r.forward, r.total
    plan = torch.tensor(r.plan)
    counts = {name: int((plan == code).sum()) for code, (_, name) in PLAN_STYLE.items()}
    of = f" of {n_steps}" if n_steps else ""
    w0, w = r.window
    rows = [
        (
            "denoise forward",
            f'<span id="step-label">{r.index + 1}{of}</span> (block at {r.block_start}, '
            f"its forward {r.step + 1}, window {w0}..{w0 + w - 1})",
        ),
        ("tokens per forward (so far)", f"{t['tokens_per_forward']:.2f}"),
        ("executed FLOPs / no skipping, this forward", _pct(f["flops_ratio"])),
        (
            "executed FLOPs / no skipping, so far",
            f'<span id="flops-total">{_pct(t["flops_ratio"])}</span>',
        ),
        ("tokens/s (so far)", f"{t['tokens_per_second']:.1f}"),
        (
            "units this forward",
            f"{counts['computed']} computed, {counts['reused']} reused, {counts['passed']} passed",
        ),
    ]
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="stats">{body}</table>'


def render_final(turn_stats: dict, finish: str) -> str:
    s = turn_stats
    return (
        f"<p><b>Last answer</b> ({finish}): {s['generated_tokens']} tokens, "
        f"{s['tokens_per_forward']:.2f} tokens per forward, executed FLOPs "
        f'<span id="flops-answer">{_pct(s["flops_ratio"])}</span> of no skipping, '
        f"{s['tokens_per_second']:.1f} tokens/s</p>"
    )


# ---- the app ------------------------------------------------------------------------------------


class App:
    """One loaded model, one chat session object (requests run one at a time), a stop flag."""

    def __init__(self, lm: FastDLLM, config: GenerationConfig | None = None):
        self.lm = lm
        self.session = ChatSession(lm, config)
        self.session.start_over = "press Clear to start over"  # the page's button, no /reset
        self.stop = threading.Event()

    def request_stop(self) -> None:
        self.stop.set()

    def configure(self, settings: dict, policy: str, options: dict) -> None:
        """Apply the page's controls to the session (ChatError on bad values)."""
        s = self.session
        for name, value in settings.items():
            if value is None and name not in ("block_size", "seed"):
                raise ChatError(f"{name} is empty")
            if name in ("block_size", "seed", "max_new_tokens", "small_block_size"):
                value = None if value is None else int(value)
            s.set(name, value)
        s.set_policy(policy, {k: ("" if v is None else str(v)) for k, v in options.items()})

    def respond(self, message: str, history: list, settings: dict, policy: str, options: dict):
        """Yields (history, status, stats, block, heatmap, steps) while the answer decodes."""
        try:
            self.configure(settings, policy, options)
            if not message or not message.strip():
                raise ChatError("type a message first")
        except ChatError as e:
            yield history, f"**error:** {e}", None, None, None, None
            return
        self.session.history = [
            {"role": m["role"], "content": _text(m["content"])} for m in history or []
        ]
        shown = [*(history or []), {"role": "user", "content": message}]
        yield [*shown, {"role": "assistant", "content": "…"}], "decoding…", None, None, None, None
        updates: queue.Queue = queue.Queue()
        self.stop.clear()

        def run():
            try:
                updates.put(("done", self.session.reply(message, updates.put, self.stop)))
            except ChatError as e:
                updates.put(("error", f"**error:** {e}"))
            except Exception as e:  # anything else: one line on the page, the app serves on
                first = (str(e).splitlines() or [""])[0]
                updates.put(("error", f"**error:** {type(e).__name__}: {first}"))

        threading.Thread(target=run, daemon=True).start()
        while True:
            item = updates.get()
            if isinstance(item, StepRecord):
                if not updates.empty():  # behind: show the newest step only
                    continue
                answer = {"role": "assistant", "content": item.text or "…"}
                yield (
                    [*shown, answer],
                    f"decoding… forward {item.index + 1}",
                    render_stats(item),
                    render_block(item),
                    render_heatmap(item),
                    None,
                )
                continue
            kind, payload = item
            if kind == "error":
                yield history, payload, None, None, None, None
                return
            turn = payload
            shown.append({"role": "assistant", "content": turn.text})
            last = turn.steps[-1] if turn.steps else None
            status = render_final(turn.stats.to_dict(), turn.finish_reason)
            if self.session.note:  # the policy can skip nothing: say so, as every entry point
                status = f"**note:** {self.session.note}\n\n{status}"
            yield (
                shown,
                status,
                render_stats(last, len(turn.steps)) if last else "",
                render_block(last) if last else "",
                render_heatmap(last) if last else "",
                turn.steps,
            )
            return


def _text(content) -> str:
    """A Chatbot message's content as text (Gradio 6 may give a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return content.get("text", "")
    return str(content)


def build(app: App):
    """The Gradio page (a gr.Blocks) for `app`."""
    import gradio as gr

    cfg, model_cfg = app.session.config, app.lm.model.cfg
    with gr.Blocks(title="Fast-dLLM v2: see it decode") as demo:
        gr.Markdown(
            "### Fast-dLLM v2: block diffusion decoding, step by step\n"
            "Masked, newly committed and committed tokens of the current block at every denoise "
            "forward; under a policy, which units each layer computed, reused or passed."
        )
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Chat", elem_id="chat", height=330, render_markdown=False)
                message = gr.Textbox(label="Message", elem_id="message", lines=2)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                with gr.Accordion("Decoding", open=True):
                    controls = {
                        "threshold": gr.Slider(
                            0.05, 1.0, cfg.threshold, step=0.01, label="threshold",
                            elem_id="threshold",
                        ),
                        "block_size": gr.Number(
                            cfg.block_size or model_cfg.block_size, precision=0,
                            label="block size", elem_id="block_size",
                        ),
                        "small_block_size": gr.Number(
                            cfg.small_block_size, precision=0, label="sub-block size",
                            elem_id="small_block_size",
                        ),
                        "use_block_cache": gr.Checkbox(
                            cfg.use_block_cache, label="sub-block cache", elem_id="use_block_cache"
                        ),
                        "temperature": gr.Slider(
                            0.0, 2.0, cfg.temperature, step=0.05, label="temperature",
                            elem_id="temperature",
                        ),
                        "top_p": gr.Slider(
                            0.05, 1.0, cfg.top_p, step=0.05, label="top-p", elem_id="top_p"
                        ),
                        "max_new_tokens": gr.Slider(
                            1, model_cfg.max_position_embeddings, cfg.max_new_tokens, step=1,
                            label="max new tokens", elem_id="max_new_tokens",
                        ),
                    }  # fmt: skip
                with gr.Accordion("Compute skipping", open=True):
                    policy = gr.Dropdown(
                        list(policy_names()), value="none", label="policy", elem_id="policy"
                    )
                    groups, options = {}, {}
                    for name in policy_names()[1:]:
                        with gr.Group(visible=False) as groups[name]:
                            for d in options_of(name):
                                options[name, d.name] = gr.Textbox(
                                    label=f"{d.name} ({d.type_name})",
                                    placeholder="default",
                                    elem_id=f"opt-{name}-{d.name}",
                                    max_lines=1,
                                )
        gr.Markdown("#### The decoding, forward by forward")
        with gr.Row():
            with gr.Column(scale=3):
                block = gr.HTML(elem_id="block")
                heatmap = gr.HTML(elem_id="heatmap")
            with gr.Column(scale=2):
                stats = gr.HTML(elem_id="stats")
                replay = gr.Slider(  # 1 = the first forward, as the step label counts
                    1, 2, 1, step=1, label="replay: denoise forward of the last answer",
                    elem_id="replay", interactive=True,
                )  # fmt: skip
        steps = gr.State([])

        setting_names = list(controls)
        option_keys = list(options)

        def respond(message_, history, policy_, *values):
            settings = dict(zip(setting_names, values[: len(setting_names)], strict=True))
            chosen = {
                opt: v
                for (name, opt), v in zip(option_keys, values[len(setting_names) :], strict=True)
                if name == policy_
            }
            for out in app.respond(message_, history, settings, policy_, chosen):
                hist, stat, st, bl, hm, recs = out
                skip = gr.skip()
                slider = skip
                if recs is not None:
                    slider = gr.Slider(1, max(len(recs), 2), len(recs), step=1)
                yield (
                    hist,
                    skip if stat.startswith("**error") else "",
                    stat,
                    skip if st is None else st,
                    skip if bl is None else bl,
                    skip if hm is None else hm,
                    skip if recs is None else recs,
                    slider,
                )

        inputs = [message, chat, policy, *controls.values(), *options.values()]
        outputs = [chat, message, status, stats, block, heatmap, steps, replay]
        send.click(respond, inputs, outputs, concurrency_limit=1, concurrency_id="model")
        message.submit(respond, inputs, outputs, concurrency_limit=1, concurrency_id="model")
        stop.click(app.request_stop, None, None, queue=False)
        clear.click(
            lambda: ([], "", "", "", "", [], gr.Slider(1, 2, 1)),
            None,
            [chat, status, stats, block, heatmap, steps, replay],
            queue=False,
        )

        def show_group(name):
            return [gr.Group(visible=n == name) for n in groups]

        policy.change(show_group, policy, list(groups.values()), queue=False)

        def show_step(i, recs):
            if not recs:
                return gr.skip(), gr.skip(), gr.skip()
            r = recs[min(max(int(i), 1), len(recs)) - 1]  # the slider counts from 1
            return render_stats(r, len(recs)), render_block(r), render_heatmap(r)

        replay.input(show_step, [replay, steps], [stats, block, heatmap], queue=False)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kw):
    """Start the server (the page's CSS goes here in Gradio 6)."""
    return demo.launch(server_name=host, server_port=port, share=share, css=CSS, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m v2.app",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: Gradio's (7860 or next free)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        lm = load_from_args(args)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch(build(App(lm)), args.host, args.port, args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
