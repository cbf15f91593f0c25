"""A sweep's plots: final loss, held-out loss, tokens/s and peak memory per rank against N (log2 x axis), one
line per label (model variant, the other swept values, the attention strategy).

Built on bare matplotlib Figures, not pyplot, so no global figure or backend state is touched
(the same rule as launch/records.py's loss plot).
"""

from __future__ import annotations

import math
from pathlib import Path

METRICS = (
    # (file, row key, y label, scale of the stored value)
    ("sweep_loss.png", "final_loss", "final loss (train, last 10% of steps)", 1.0),
    ("sweep_heldout_loss.png", "heldout_loss", "held-out loss at N ([eval] at_end)", 1.0),
    ("sweep_tokens_per_s.png", "tokens_per_s", "tokens/s", 1.0),
    ("sweep_peak_mem.png", "peak_mem_bytes", "peak memory per rank (MiB)", 2.0**-20),
)
COMBINED = "sweep.png"
"""All of them side by side: the one to show in a README."""


def _tokens(n: int) -> str:
    """1024 -> '1K', 1048576 -> '1M', 96 -> '96'."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _lines(rows: list[dict], key: str, scale: float) -> dict[str, tuple[list, list]]:
    """label -> (N values, metric values) over the completed points, sorted by N."""
    lines: dict[str, list] = {}
    for r in rows:
        value = r.get(key)
        if r.get("status") != "completed" or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or not r.get("seq_len"):
            continue
        lines.setdefault(r["label"] or r["name"], []).append((int(r["seq_len"]), value * scale))
    return {label: tuple(map(list, zip(*sorted(pts)))) for label, pts in lines.items()}


def _draw(ax, rows: list[dict], key: str, label: str, scale: float) -> None:
    xs = set()
    for name, (n, y) in _lines(rows, key, scale).items():
        ax.plot(n, y, marker="o", markersize=4, label=name)
        xs.update(n)
    xs = sorted(xs)
    ax.set_xscale("log", base=2)
    if xs:
        ax.set_xticks(xs, [_tokens(x) for x in xs])
    ax.set_xlabel("N (tokens per sequence)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def write_plots(root: Path, rows: list[dict], title: str = "") -> list[str]:
    """Write the three PNGs and the combined one into `root`; their names (none without
    matplotlib or without a completed point)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return []
    if not any(r.get("status") == "completed" for r in rows):
        return []
    # held-out loss only where some point evaluated ([eval] at_end)
    metrics = [m for m in METRICS if any(_lines(rows, m[1], m[3]).values())]
    names = []
    for name, key, label, scale in metrics:
        fig = Figure(figsize=(6, 3.8))
        ax = fig.add_subplot()
        _draw(ax, rows, key, label, scale)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(root) / name, dpi=90)
        names.append(name)
    fig = Figure(figsize=(5 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (_, key, label, scale) in zip(axes, metrics):
        _draw(ax, rows, key, label, scale)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=max(1, len(labels)), fontsize=9)
    fig.suptitle(title, fontsize=10, y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 0.9))
    fig.savefig(Path(root) / COMBINED, dpi=80)
    return [COMBINED] + names
