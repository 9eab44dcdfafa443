"""v2.report: tables and Pareto plots from records (summary.json, v2/record.py)."""

from __future__ import annotations

import json
from pathlib import Path

from v2 import record, report

PNG = b"\x89PNG\r\n\x1a\n"


def summary_dict(
    policy: dict | None = None,
    accuracy: float = 0.99,
    n: int = 100,
    executed_flops: int = 1000,
    baseline_flops: int = 1000,
    tokens_per_second: float = 50.0,
    limit: int | None = None,
    task: str = "tiny_gsm",
    threshold: float = 0.9,
    decode_row_forwards: int = 400,
    padding_units: int | None = 0,
) -> dict:
    """A summary.json in the adapter's schema, with numbers a test can check (units: FLOPs /
    10; padding_units None: a record from before padding was counted apart)."""
    policy = policy or {"policy": "none"}
    executed, baseline = executed_flops // 10, baseline_flops // 10
    stats = {
        "forwards": {"prefill": 4, "denoise_full": 0, "denoise_sub": 30, "commit": 10},
        "row_forwards": {
            "prefill": n,
            "denoise_full": 0,
            "denoise_sub": decode_row_forwards - n,
            "commit": n,
        },
        "generated_tokens": 20 * n,
        "tokens_per_forward": 20 * n / decode_row_forwards,
        "executed_units": executed,
        "baseline_units": baseline,
        "executed_flops": executed_flops,
        "baseline_flops": baseline_flops,
        "flops_ratio": executed_flops / baseline_flops,
        "skip_rate_per_layer": [0.0, 0.1],
        "executed_units_per_layer": [1, 1],
        "baseline_units_per_layer": [1, 1],
        "wall_seconds": 20 * n / tokens_per_second,
        "tokens_per_second": tokens_per_second,
    }
    if padding_units is not None:
        useful = executed - padding_units
        stats.update(
            useful_units=useful,
            padding_units=padding_units,
            skip_rate_per_layer=[1 - useful / baseline] * 2,
            padding_rate_per_layer=[padding_units / baseline] * 2,
        )
    se = (accuracy * (1 - accuracy) / max(n - 1, 1)) ** 0.5
    metrics = {
        "exact_match,strict-match": {"value": accuracy - 0.01, "stderr": se},
        "exact_match,flexible-extract": {"value": accuracy, "stderr": se},
    }
    return {
        "schema": 1,
        "model": "tiny",
        "pretrained": "v2/tiny/checkpoint",
        "config": {
            "policy": policy,
            "threshold": threshold,
            "block_size": 32,
            "small_block_size": 8,
            "use_block_cache": False,
            "max_new_tokens": 256,
            "temperature": 0.0,
            "top_p": 1.0,
            "batch_size": 32,
            "release_recipe": False,
            "dtype": "float32",
            "num_processes": 1,
        },
        "limit": limit,
        "smoke_test": limit is not None,
        "tasks": {task: {"n": n, "metrics": metrics, "stats": stats}},
        "stats": stats,
        "env": {"git_commit": "abc1234def", "gpu": "cpu", "torch": "2.13", "python": "3.11"},
        "results_file": "results_2026.json",
    }


def write_summary(run_dir: Path, summary: dict, model: str = "tiny") -> Path:
    path = run_dir / model / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))
    return path


def make_sweep(root: Path) -> Path:
    """baseline, a token and a layer configuration, and a --limit run that must stay out."""
    sweep = root / "tiny_default"
    write_summary(sweep / "baseline", summary_dict(accuracy=0.99, tokens_per_second=50.0))
    write_summary(
        sweep / "token_ct0.95",
        summary_dict(
            {"policy": "token", "cosine_threshold": 0.95},
            accuracy=0.97,
            executed_flops=800,
            baseline_flops=1000,
            tokens_per_second=60.0,
        ),
    )
    write_summary(
        sweep / "layer_ct0.99",
        summary_dict(
            {"policy": "layer", "cosine_threshold": 0.99},
            accuracy=0.95,
            executed_flops=1100,  # more forwards than the baseline: a net loss end to end
            baseline_flops=1400,
            tokens_per_second=40.0,
        ),
    )
    limited = summary_dict({"policy": "token", "cosine_threshold": 0.9}, limit=4, n=4)
    write_summary(sweep / "_limit4" / "token_ct0.9", limited)
    (sweep / "_manifests").mkdir()
    return sweep


def table_rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]


def test_table_baseline_first_and_both_flops_ratios(tmp_path):
    sweep = make_sweep(tmp_path)
    md_path, plots, rows = report.build(sweep)
    assert md_path == sweep / "_report" / "results.md"
    md = md_path.read_text()
    assert [r.config_id for r in rows] == ["baseline", "token_ct0.95", "layer_ct0.99"]
    body = table_rows(md.split("## Runs")[0])[1:]
    assert body[0].startswith("| **baseline** | 100 | 99.00 ± 1.00 | 50.0 ‡ |")
    token = next(line for line in body if line.startswith("| token_ct0.95"))
    cells = [c.strip() for c in token.strip("|").split("|")]
    # config, n, accuracy, tokens/s, tokens/fwd, fwd/problem, FLOPs/fwd, FLOPs vs baseline,
    # skip, padding
    assert cells[1] == "100" and cells[2].startswith("97.00 ± ")
    assert cells[3] == "60.0 ‡" and cells[4] == "5.00" and cells[5] == "4.0"
    assert cells[6] == "80.0 %" and cells[7] == "80.0 %" and cells[8] == "20.0 %"
    assert cells[9] == "0.0 %"
    layer = next(r for r in rows if r.config_id == "layer_ct0.99")
    assert round(layer.flops_ratio, 4) == round(1100 / 1400, 4)
    assert layer.end_to_end_ratio == 1.1  # per forward saves, end to end costs more
    assert "_limit4" not in md and "Smoke test" not in md
    assert "exact_match,flexible-extract" in md
    assert len(plots) == 2
    for p in plots:
        assert p.exists() and p.read_bytes()[:8] == PNG
        assert f"![{p.stem}]({p.name})" in md


def test_limit_runs_only_on_request_and_labelled(tmp_path):
    sweep = make_sweep(tmp_path)
    _, _, rows = report.build(sweep, include_limit=True, out=tmp_path / "with_limit")
    limited = [r for r in rows if r.limit]
    assert [r.config_id for r in limited] == ["_limit4/token_ct0.9"]
    assert limited[0].baseline is None  # a smoke run is never compared with a full baseline
    md = (tmp_path / "with_limit" / "results.md").read_text()
    assert "Smoke test" in md and "4 (limit 4)" in md
    # a _limit folder given directly is its own sweep, labelled as a smoke test
    md, _, rows = report.build(sweep / "_limit4")
    assert [r.config_id for r in rows] == ["token_ct0.9"] and rows[0].smoke
    assert md.read_text().startswith("# Results: tiny_default/_limit4\n")


def test_metric_choice_and_override(tmp_path):
    sweep = make_sweep(tmp_path)
    rows = report.collect(sweep, metric="exact_match,strict-match")
    assert {r.metric for r in rows} == {"exact_match,strict-match"}
    assert report.main_metric({"acc,none": {}, "acc_norm,none": {}}) == "acc,none"
    assert report.main_metric({"foo": {}}) == "foo"


def test_resumed_runs_are_flagged(tmp_path):
    sweep = make_sweep(tmp_path)
    (sweep / "token_ct0.95" / "DONE").write_text(json.dumps({"resumed_from_cache": True}))
    md = report.build(sweep)[0].read_text()
    assert "| token_ct0.95 † |" in md and "resumed from lm_eval's request cache" in md


def with_coverage(summary: dict, decoded: int, cached: int) -> dict:
    for t in summary["tasks"].values():
        t["stats_problems"], t["cached_problems"] = decoded, cached
    return summary


def test_statistics_over_part_of_the_problems_are_marked(tmp_path):
    """A record resumed from the request cache (its statistics cover 30 of 100 problems) is
    marked † with its counts and no end-to-end ratio; a clean one (100 of 100) is not."""
    sweep = tmp_path / "tiny_default"
    write_summary(sweep / "baseline", with_coverage(summary_dict(), 100, 0))
    token = summary_dict({"policy": "token", "cosine_threshold": 0.95}, executed_flops=300)
    write_summary(sweep / "token_ct0.95", with_coverage(token, 30, 70))
    # a DONE that says "resumed" (its cache held answers) but counts that say every problem
    # was decoded: the counts win
    (sweep / "baseline" / "DONE").write_text(json.dumps({"resumed_from_cache": True}))
    rows = {r.config_id: r for r in report.collect(sweep)}
    assert rows["token_ct0.95"].partial_stats and not rows["baseline"].partial_stats
    assert rows["token_ct0.95"].end_to_end_ratio is None
    assert rows["token_ct0.95"].forwards_per_problem == (400 - 100 + 100) / 30  # per decoded
    md = report.build(sweep)[0].read_text()
    table = table_rows(md)
    assert any(line.startswith("| token_ct0.95 † | 100 |") for line in table)
    assert any(line.startswith("| **baseline** | 100 |") for line in table)
    assert "30 of 100 (70 cached)" in md and "| 100 of 100 |" in md
    assert "† statistics over part of the problems" in md and "--force ID" in md

    clean = tmp_path / "clean"
    write_summary(clean / "baseline", with_coverage(summary_dict(), 100, 0))
    md = report.build(clean)[0].read_text()
    assert "†" not in md and "| 100 of 100 |" in md


def test_old_records_without_counts_still_read(tmp_path):
    sweep = make_sweep(tmp_path)
    rows = report.collect(sweep)
    assert all(r.stats_problems is None and not r.partial_stats for r in rows)
    md = report.build(sweep)[0].read_text()
    assert "†" not in md and "| stats cover |" in md
    d = summary_dict()
    assert record.Record.from_dict(d).tasks["tiny_gsm"].partial_stats is None
    assert "stats_problems" not in record.Record.from_dict(d).to_dict()["tasks"]["tiny_gsm"]
    bad = with_coverage(summary_dict(n=10), 11, 0)
    assert any("stats_problems" in x for x in record.problems(bad))


def test_plots_name_every_point_in_a_legend_and_the_baseline_apart(tmp_path):
    """No text on the points (labels cannot overlap): a legend names each configuration, the
    baseline has its own hollow star, and the axes hold every point with its error bar."""
    import matplotlib

    matplotlib.use("Agg")
    sweep = make_sweep(tmp_path)
    rows = [r for r in report.collect(sweep) if r.task == "tiny_gsm"]
    style = report.styles(rows)
    assert style["baseline"]["marker"] == "*" and style["baseline"]["mfc"] == "none"
    others = [style[r.config_id] for r in rows if not r.is_baseline]
    assert len({(s["marker"], s["color"]) for s in others}) == len(others)
    assert all(s["color"] != "tab:red" for s in others)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    pts = [(r, report.flops_x(r), None) for r in rows]
    report.draw(ax, pts, style)
    labels = ax.get_legend_handles_labels()[1]
    assert {r.config_id for r in rows} <= set(labels) and "baseline accuracy" in labels
    assert not ax.texts
    lo, hi = ax.get_ylim()
    assert all(lo < 100 * (r.value - r.stderr) and 100 * (r.value + r.stderr) < hi for r in rows)
    lo, hi = ax.get_xlim()
    assert all(lo < x < hi for _, x, _ in pts)
    plt.close(fig)


def one_row(config_id: str, summary: dict) -> report.Row:
    (row,) = report.rows_from_summary(config_id, Path(config_id), record.Record.from_dict(summary))
    return row


def marker_centres(ax) -> list[tuple[str, tuple[float, float], float]]:
    """(legend label, centre in points, markersize) of every marker drawn by an errorbar."""
    scale = 72 / ax.figure.dpi
    out = []
    for c in ax.containers:
        line = c.lines[0]
        (x,), (y,) = line.get_data()
        px, py = ax.transData.transform((x, y))
        out.append((c.get_label(), (px * scale, py * scale), line.get_markersize()))
    return out


def test_no_point_hides_behind_another():
    """Configurations on one spot (layer_ct0.95 exactly on the baseline, as in the main job's
    FLOPs plot; a third one too) are drawn apart, each joined to the point, and listed under
    the plot; their error bars stay on the data; a point on its own stays where it is."""
    import matplotlib.pyplot as plt

    from v2.plotting import GAP

    rows = [
        one_row("baseline", summary_dict(accuracy=0.997)),
        one_row("layer_ct0.95", summary_dict({"policy": "layer"}, accuracy=0.997)),
        one_row("reuse_k1", summary_dict({"policy": "reuse", "reuse_k": 1}, accuracy=0.997)),
        one_row("token_rr0.75", summary_dict({"policy": "token"}, accuracy=0.999)),
    ]
    pts = [(r, x, None) for r, x in zip(rows, (0.0, 0.0, 0.0, 59.0), strict=True)]
    fig, notes = report.build_figure([("saved (%)", pts)], rows, "t")
    try:
        ax = fig.axes[0]
        drawn = marker_centres(ax)
        assert [d[0] for d in drawn] == [r.config_id for r in rows]
        for i, (a, pa, sa) in enumerate(drawn):
            for b, pb, sb in drawn[i + 1 :]:
                apart = ((pa[0] - pb[0]) ** 2 + (pa[1] - pb[1]) ** 2) ** 0.5
                assert apart >= (sa + sb) / 2 + GAP - 1e-6, (a, b)
        # the baseline stays on its point, the lone configuration too
        assert ax.containers[0].lines[0].get_data() == ([0.0], [99.7])
        assert ax.containers[3].lines[0].get_data() == ([59.0], [99.9])
        # every error bar is drawn at its configuration's data point
        for c, x in zip(ax.containers, (0.0, 0.0, 0.0, 59.0), strict=True):
            bars = c.lines[2][0].get_segments()
            assert all(seg[0][0] == x for seg in bars)
        assert notes == [
            "overlapping markers drawn apart (a gray spoke to each one's point): "
            "baseline, layer_ct0.95, reuse_k1"
        ]
    finally:
        plt.close(fig)


def test_overlap_is_measured_on_the_drawn_markers():
    """Markers overlap by their size in points on the axes as laid out: a point 1 % of the
    axis away from the baseline's star is hidden by it, one half an axis away is not, and a
    chain (a on b, b on c) is one group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from v2.plotting import Marker, groups, separate

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)

    def marker(name, x, y, size=6, anchor=False):
        (line,) = ax.plot([x], [y], marker="o", ms=size)
        return Marker(name, x, y, line, size, anchor)

    ms = [
        marker("base", 50, 50, size=17, anchor=True),
        marker("near", 51, 50),
        marker("far", 0, 0),
        marker("a", 90, 90),
        marker("b", 92, 90),
        marker("c", 94, 90),
    ]
    assert groups(ax, ms) == [[0, 1], [3, 4, 5]]
    assert separate(ax, ms) == [["base", "near"], ["a", "b", "c"]]
    assert groups(ax, ms[:1] + ms[2:3]) == []
    assert ms[0].line.get_data() == ([50], [50]) and ms[2].line.get_data() == ([0], [0])
    drawn = [Marker(m.name, *(v[0] for v in m.line.get_data()), m.line, m.size) for m in ms]
    assert groups(ax, drawn) == []  # where they are drawn now, nothing overlaps
    plt.close(fig)


def test_padding_is_its_own_column_and_never_negative_skipping(tmp_path):
    """The baseline runs padding (a third more units than in scope) and skips nothing: skip
    rate 0, padding 32.9 %, FLOPs/fwd above 100 % (padding is executed work). A policy's skip
    rate is its useful units' saving, its padding apart. A record written before padding was
    counted apart shows the skip rate it recorded, marked, and no padding."""
    sweep = tmp_path / "padded"
    write_summary(
        sweep / "baseline",
        summary_dict(executed_flops=13290, baseline_flops=10000, padding_units=329),
    )
    token = summary_dict(
        {"policy": "token", "cosine_threshold": 0.95},
        executed_flops=12000,
        baseline_flops=10000,
        padding_units=400,
    )
    write_summary(sweep / "token_ct0.95", token)
    old = summary_dict(
        {"policy": "token"}, executed_flops=13210, baseline_flops=10000, padding_units=None
    )
    old["stats"]["skip_rate_per_layer"] = [-0.321, -0.321]
    write_summary(sweep / "old_token", old)
    md = report.build(sweep)[0].read_text()
    main = {
        line.split("|")[1].strip(" *"): [c.strip() for c in line.strip("|").split("|")]
        for line in table_rows(md.split("## Runs")[0])
        if line.count("|") == 11
    }
    assert main["baseline"][6:] == ["132.9 %", "100.0 %", "0.0 %", "32.9 %"]
    assert main["token_ct0.95"][6:] == ["120.0 %", "90.3 %", "20.0 %", "40.0 %"]
    assert main["old_token"][8:] == ["-32.1 % ¶", "-"]
    assert report.NOT_SEPARATED_NOTE in md
    per_layer = {
        line.split("|")[1].strip(): line
        for line in table_rows(md)
        if line.count("|") == 4 and "per layer" not in line
    }
    assert per_layer["baseline"] == "| baseline | 0.00 0.00 | 0.33 0.33 |"
    assert per_layer["token_ct0.95"] == "| token_ct0.95 | 0.20 0.20 | 0.40 0.40 |"
    assert per_layer["old_token"] == "| old_token | -0.32 -0.32 ¶ | - |"
    rows = {r.config_id: r for r in report.collect(sweep)}
    assert rows["baseline"].padding_separated and not rows["old_token"].padding_separated
    # a clean sweep of new records has no such note
    write_summary(tmp_path / "clean" / "baseline", summary_dict(padding_units=5))
    assert report.NOT_SEPARATED not in report.build(tmp_path / "clean")[0].read_text()


def test_nothing_measured_shows_no_numbers(tmp_path):
    """A configuration whose every answer came from lm_eval's request cache (the rerun after a
    Ctrl-C: stats_problems 0, generated_tokens 0, no forward) shows `-` for tokens/s, tokens
    per forward, FLOPs, skip rate and padding (not 0.0, not 100 %), and both plots leave it
    out with the same note; so does an older record with no counts but nothing decoded."""
    sweep = tmp_path / "resumed"
    write_summary(sweep / "baseline", with_coverage(summary_dict(), 100, 0))
    empty = summary_dict({"policy": "layer", "cosine_threshold": 0.95}, executed_flops=0)
    for stats in (empty["stats"], empty["tasks"]["tiny_gsm"]["stats"]):
        stats.update(
            generated_tokens=0,
            tokens_per_forward=0.0,
            executed_units=0,
            baseline_units=0,
            executed_flops=0,
            baseline_flops=0,
            flops_ratio=1.0,
            wall_seconds=0.0,
            tokens_per_second=0.0,
            forwards=dict.fromkeys(stats["forwards"], 0),
            row_forwards=dict.fromkeys(stats["row_forwards"], 0),
        )
    empty["speed"] = {"processes": 1, "wall_seconds": 0.0, "tokens_per_second": 0.0}
    write_summary(sweep / "layer_ct0.95", with_coverage(empty, 0, 100))
    older = json.loads(json.dumps(empty))
    del older["tasks"]["tiny_gsm"]["stats_problems"], older["tasks"]["tiny_gsm"]["cached_problems"]
    write_summary(sweep / "layer_ct0.99", older)
    md = report.build(sweep)[0].read_text()
    rows = {r.config_id: r for r in report.collect(sweep)}
    assert rows["baseline"].measured
    for cid in ("layer_ct0.95", "layer_ct0.99"):
        r = rows[cid]
        assert not r.measured
        assert r.tokens_per_second is r.tokens_per_forward is r.flops_ratio is None
        assert r.skip_rate is r.padding_rate is r.end_to_end_ratio is None
        line = next(x for x in table_rows(md) if x.startswith(f"| {cid} §"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3:] == ["-"] * 7, line
        assert cells[2].startswith("99.00 ± ")  # the accuracy is a measurement of every problem
    assert report.NOTHING_NOTE in md
    trows = list(rows.values())
    label, pts, flops_note = report.flops_data(trows)
    panels, speed_note = report.speed_data(trows)
    for drawn in (pts, panels[0][1]):
        assert [p[0].config_id for p in drawn] == ["baseline"]
    note = f"not drawn: layer_ct0.95, layer_ct0.99 ({report.NOTHING} {report.NOTHING_WHY})"
    assert flops_note == note and speed_note.endswith(note)


def test_a_folder_of_sweeps_gives_one_page_each(tmp_path, capsys):
    root = tmp_path / "data"
    make_sweep(root)
    other = root / "second"
    write_summary(other / "baseline", summary_dict(accuracy=0.5))
    out = tmp_path / "pages"
    assert report.main([str(root), "--out", str(out)]) == 0
    for name in ("tiny_default", "second"):
        md = (out / f"{name}.md").read_text()
        assert md.startswith(f"# Results: {name}\n")
        assert f"Generated by `python -m v2.report {root} --out {out}`" in md
        for kind in ("flops", "speed"):
            png = out / f"{name}_pareto_{kind}_tiny_gsm.png"
            assert png.read_bytes()[:8] == PNG and f"]({png.name})" in md


def test_records_read_by_runner_checker_and_report_alike(tmp_path):
    """One schema: what the runner's check rejects, the report does not read either."""
    from v2 import record
    from v2.runs import state as runs_state

    good = summary_dict()
    rec = record.Record.from_dict(good)
    assert record.Record.from_dict(rec.to_dict()) == rec and rec.runner == "lm_eval"
    expect = {"tasks": ["tiny_gsm"], "limit": None, "policy": "none"}
    for broken in ({**good, "schema": 2}, {**good, "stats": {}}, {**good, "runner": "x"}):
        path = write_summary(tmp_path / "b", broken)
        assert runs_state.check_summary(path, expect) == record.problems(broken) != []
        assert report.newest_summary(tmp_path / "b") is None
        assert record.read(path) is None
    path = write_summary(tmp_path / "g", good)
    assert runs_state.check_summary(path, expect) == []
    assert report.newest_summary(tmp_path / "g")[1] == rec


def test_pareto_front():
    pts = [(0, 99), (10, 98), (20, 99.5), (30, 90), (25, 80)]
    assert report.pareto_front(pts) == [(20, 99.5), (30, 90)]


def test_cli(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    assert report.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| **baseline** |" in out and "plot: " in out
    assert (tmp_path / "out" / "pareto_speed_tiny_gsm.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 1
    assert "error: no summary.json" in capsys.readouterr().err
    assert list(empty.iterdir()) == []  # no empty page left behind
    assert report.main([str(sweep), "--out", str(tmp_path / "o2"), "--metric", "bogus"]) == 0
    assert "no record has the metric 'bogus'" in capsys.readouterr().err


def test_baseline_is_the_same_decoding_threshold(tmp_path):
    sweep = make_sweep(tmp_path)
    at_one = summary_dict({"policy": "token", "cosine_threshold": 0.95}, threshold=1.0)
    write_summary(sweep / "thr1.0_token_ct0.95", at_one)
    rows = {r.config_id: r for r in report.collect(sweep)}
    assert rows["token_ct0.95"].baseline is rows["baseline"]
    assert rows["thr1.0_token_ct0.95"].baseline is None  # the baseline ran at threshold 0.9
    assert rows["thr1.0_token_ct0.95"].end_to_end_ratio is None


def test_speed_is_labelled_spread_or_not_comparable(tmp_path):
    """One timed pass is marked ‡ (not comparable); repeated rounds show median [min - max];
    a CPU run says its timings are not results; a data-parallel run shows aggregate tokens/s
    over the run's wall (not the ranks' summed walls) and tokens/s per GPU."""
    sweep = tmp_path / "results" / "speed"
    cpu = summary_dict(tokens_per_second=50.0)
    write_summary(sweep / "baseline", cpu)
    rounds = summary_dict({"policy": "token", "cosine_threshold": 0.95}, tokens_per_second=40.0)
    rounds["env"]["gpu"] = "NVIDIA H200"
    rounds["speed"] = {"processes": 1, "tokens_per_second_rounds": [61.0, 59.0, 70.0]}
    write_summary(sweep / "token_ct0.95", rounds)
    dp = summary_dict({"policy": "layer", "cosine_threshold": 0.99}, tokens_per_second=25.0)
    dp["env"]["gpu"] = "NVIDIA H200"
    dp["config"]["num_processes"] = 2
    # two ranks of 40 s each decoding 2000 tokens: summed walls say 25 tokens/s, the run 50
    dp["speed"] = {"processes": 2, "wall_seconds": 40.0, "tokens_per_second": 50.0}
    write_summary(sweep / "layer_ct0.99", dp)
    md_path, _, rows = report.build(sweep)
    md = md_path.read_text()
    cells = {
        line.split("|")[1].strip(" *"): line.split("|")[4].strip()
        for line in table_rows(md.split("## Runs")[0])[1:]
        if line.count("|") == 11  # the main table (the per-layer table follows)
    }
    assert cells["baseline"] == "50.0 ‡"
    assert cells["token_ct0.95"] == "61.0 [59.0 - 70.0]"
    assert cells["layer_ct0.99"] == "50.0 ‡ (2 GPUs: 25.0/GPU)"
    layer = next(r for r in rows if r.config_id == "layer_ct0.99")
    assert layer.tokens_per_second == 50.0 and layer.tokens_per_second_per_gpu == 25.0
    assert "CPU run**: tokens/s measured on a CPU are not results" in md
    assert "‡ tokens/s from a single timed pass: not comparable" in md
    # a data-parallel summary without "speed" (before it existed): no aggregate to show
    del dp["speed"]
    write_summary(sweep / "layer_ct0.99", dp)
    layer = next(r for r in report.collect(sweep) if r.config_id == "layer_ct0.99")
    assert layer.tokens_per_second is None and report.speed_text(layer) == "-"


def test_docs_results_pages_are_the_committed_records_regenerated(tmp_path):
    """docs/results/<sweep>.md is what `python -m v2.report docs/results/data --out docs/results`
    makes of the committed records (every record there is valid)."""
    from v2 import record

    repo = Path(__file__).resolve().parent.parent
    data, pages = repo / "docs" / "results" / "data", repo / "docs" / "results"
    command = "python -m v2.report docs/results/data --out docs/results"
    sweeps = report.sweeps_in(data)
    assert len(sweeps) >= 6
    for path in data.glob("*/*/*/summary.json"):
        assert record.read(path) is not None, path
    for d in sweeps:
        md, _, _ = report.build(d, tmp_path, command=command, stem=d.name)
        assert md.read_text() == (pages / f"{d.name}.md").read_text(), d.name


def test_the_report_and_the_runners_status_share_one_order(tmp_path, capsys):
    """Where the sweep is known (the runner's --status and closing report) its file's order,
    with the runs numbered in it; the report used its own order (baseline, policy, id) there."""
    import yaml

    from v2.runs import cli as runs_cli
    from v2.runs import state as runs_state
    from v2.runs import sweep as runs_sweep

    grid = [
        {"policy": "layer", "cosine_threshold": 0.99},
        {"policy": "none"},
        {"policy": "token", "cosine_threshold": 0.95},
    ]
    path = tmp_path / "sweep.yaml"
    data = {"name": "tiny_default", "pretrained": "v2/tiny/checkpoint", "tasks": ["tiny_gsm"]}
    path.write_text(yaml.safe_dump({**data, "grid": grid}))
    sweep = runs_sweep.load_sweep(path, tmp_path / "results")
    ids = [c.id for c in sweep.configs]
    assert ids == ["layer_ct0.99", "baseline", "token_ct0.95"]
    root = make_sweep(tmp_path / "results")  # records of these three ids (and a --limit run)
    assert root == sweep.results
    for n, c in enumerate(sweep.configs):  # one run each: the numbers show the order
        found = root / c.id / "tiny" / "summary.json"
        found.write_text(json.dumps({**json.loads(found.read_text()), "date": f"2026-0{n + 1}"}))

    runs_cli.finish_report(root, None, ids)
    page = capsys.readouterr().out
    body = table_rows(page.split("## Runs")[0])[1:4]  # the task's table
    assert [line.split(" | ")[0].strip("|* ") for line in body] == ids
    runs = table_rows(page.split("## Runs")[1])[1:4]
    assert [line.split(" | ")[:2] for line in runs] == [
        [f"| {i}", str(n)] for n, i in enumerate(ids, 1)
    ]
    states = {c.id: runs_state.State("missing") for c in sweep.configs}
    rows, _ = runs_cli.status_rows(sweep, list(reversed(sweep.configs)), states, None)
    assert [r[0] for r in rows] == ids
    # records found on disk, no sweep known: the documented order, baseline first
    _, _, rows = report.build(root, out=tmp_path / "disk")
    assert [r.config_id for r in rows] == ["baseline", "token_ct0.95", "layer_ct0.99"]
    assert sorted(ids, key=lambda i: report.run_order(i, ids)) == ids
