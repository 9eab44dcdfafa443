"""No point hidden behind another: markers that would overlap on a plot are drawn around their
common point instead (v2.report's Pareto plots, v2.tune's trials plot).

Draw every marker at its data point first, lay the figure out (`tight_layout`: the axes' size in
points must be final), then call `separate`: markers whose drawn discs overlap (in points, from
their sizes) form a group; a group's anchor (the baseline) stays on its point, the others move
onto a ring around it, each joined to its own point by a thin gray spoke (with no anchor, a small
black dot marks the common point). The ring keeps the members' directions from the common point
where they lie apart, and starts sideways for exact twins (a lone twin keeps its height). Only
markers move: error bars stay where the data are. The caller names each group under the plot,
so that what coincides is also listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GAP = 1.5  # points between the edges of two markers that do not overlap
SPOKE = "0.45"


@dataclass
class Marker:
    name: str
    x: float
    y: float
    line: object  # the matplotlib Line2D that draws the marker (moved by `separate`)
    size: float  # its markersize: the disc it covers, in points
    anchor: bool = False  # stays on its point when in a group (the baseline)


def _points(ax, xy) -> list[tuple[float, float]]:
    """Data coordinates -> points on the figure."""
    scale = 72.0 / ax.figure.dpi
    return [(px * scale, py * scale) for px, py in ax.transData.transform(xy)]


def groups(ax, markers: list[Marker]) -> list[list[int]]:
    """Indices of the markers that overlap as the axes are laid out now, one list per group of
    two or more (chained: a touches b, b touches c), in drawing order."""
    n = len(markers)
    if n < 2:
        return []
    at = _points(ax, [(m.x, m.y) for m in markers])
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            reach = (markers[i].size + markers[j].size) / 2 + GAP
            if math.dist(at[i], at[j]) < reach:
                parent[root(j)] = root(i)
    found: dict[int, list[int]] = {}
    for i in range(n):
        found.setdefault(root(i), []).append(i)
    return [g for g in found.values() if len(g) > 1]


def separate(ax, markers: list[Marker]) -> list[list[str]]:
    """Move overlapping markers onto rings around their common point (module docstring);
    returns the names of each group, its anchor first. Freezes the axes' limits."""
    found = groups(ax, markers)
    if not found:
        return []
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    to_px = ax.figure.dpi / 72.0
    back = ax.transData.inverted()
    names = []
    for g in found:
        members = [markers[i] for i in g]
        anchor = next((m for m in members if m.anchor), None)
        ring = [m for m in members if m is not anchor]
        if anchor is not None:
            cx, cy = ax.transData.transform((anchor.x, anchor.y))
        else:
            at = ax.transData.transform([(m.x, m.y) for m in members])
            cx, cy = at.mean(0)
        biggest = max(m.size for m in ring)
        inner = anchor.size / 2 if anchor is not None else 0.0
        radius = max(  # points: clear of the anchor, and room on the ring for every marker
            inner + biggest / 2 + 2 * GAP,
            sum(m.size + 2 * GAP for m in ring) / (2 * math.pi),
            biggest,
        )
        z = min(m.line.get_zorder() for m in members)  # spokes under every marker
        n = len(ring)
        # Where the members lie apart, the ring keeps their directions from the centre (sorted by
        # angle, the first on its own); exact twins go sideways first (one or two keep their
        # height: accuracy is read against the baseline's line), four on the diagonals.
        offsets = [
            (px - cx, py - cy) for px, py in ax.transData.transform([(m.x, m.y) for m in ring])
        ]
        if any(math.hypot(*o) > 0.5 for o in offsets):
            angles = [math.degrees(math.atan2(oy, ox)) for ox, oy in offsets]
            order = sorted(range(n), key=lambda k: angles[k])
            ring = [ring[k] for k in order]
            start = angles[order[0]]
        else:
            start = 180 / n if n % 4 == 0 else 0.0
        for k, m in enumerate(ring):
            a = math.radians(start + 360 * k / n)
            r = radius * to_px
            x, y = back.transform((cx + r * math.cos(a), cy + r * math.sin(a)))
            m.line.set_data([x], [y])
            m.line.set_clip_on(False)
            ax.plot([m.x, x], [m.y, y], color=SPOKE, lw=0.6, zorder=z - 0.5, clip_on=False)
        if anchor is None:
            x, y = back.transform((cx, cy))
            top = max(m.line.get_zorder() for m in members)
            ax.plot([x], [y], marker="o", ms=2.5, color="k", ls="none", zorder=top + 0.5)
        others = [m.name for m in members if m is not anchor]  # in drawing order
        names.append(([anchor.name] if anchor is not None else []) + others)
    return names


def spots_text(found: list[list[str]]) -> str:
    """The note that lists each group."""
    return "overlapping markers drawn apart (a gray spoke to each one's point): " + "; ".join(
        ", ".join(g) for g in found
    )
