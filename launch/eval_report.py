"""Evaluation records -> summary tables and PNGs (loss by position, passkey heatmap).

The records are those of models/evaluate.py, as they arrive in records.msgpack:

    {"type": "eval", "metric": "loss_by_position", "length", "bucket", "start", "end", "loss", "tokens"}
    {"type": "eval", "metric": "passkey", "length", "depth", "accuracy", "samples", "digits"}

Figures are built on bare matplotlib Figures (no pyplot state), like the loss plot.
"""

from __future__ import annotations

import math
from pathlib import Path

LOSS_PLOT = "loss_by_position.png"
PASSKEY_PLOT = "passkey.png"


def _latest(records: list[dict], metric: str) -> list[dict]:
    """The records of `metric` from the newest evaluation only (a run evaluated twice keeps
    both in records.msgpack; the report shows the last one, whatever it measured)."""
    if not records:
        return []
    newest = max(r.get("eval_id", 0) for r in records)
    return [r for r in records if r.get("eval_id", 0) == newest and r.get("metric") == metric]


def loss_table(records: list[dict]) -> list[str]:
    """Markdown: one row per position bucket, one column per evaluated length."""
    rows = _latest(records, "loss_by_position")
    if not rows:
        return []
    lengths = sorted({r["length"] for r in rows})
    spans = sorted({(r["start"], r["end"]) for r in rows})
    value = {(r["length"], r["start"], r["end"]): r["loss"] for r in rows}
    out = ["| positions | " + " | ".join(f"N = {n}" for n in lengths) + " |",
           "|---|" + "---:|" * len(lengths)]
    for start, end in spans:
        cells = [value.get((n, start, end)) for n in lengths]
        out.append(f"| {start}-{end - 1} | "
                   + " | ".join("" if c is None else f"{c:.4f}" for c in cells) + " |")
    return out


def passkey_table(records: list[dict]) -> list[str]:
    """Markdown: passkey accuracy, one row per context length, one column per depth."""
    rows = _latest(records, "passkey")
    if not rows:
        return []
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    value = {(r["length"], r["depth"]): r for r in rows}
    out = ["| context | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
           "|---:|" + "---:|" * len(depths)]
    for n in lengths:
        out.append(f"| {n} | " + " | ".join(
            f"{value[n, d]['accuracy']:.2f}" if (n, d) in value else "" for d in depths) + " |")
    samples = sorted({r["samples"] for r in rows})
    out.append("")
    out.append(f"(samples per cell: {', '.join(map(str, samples))}; "
               f"{rows[0].get('digits', '?')}-digit keys, teacher-forced greedy)")
    return out


def summary_lines(records: list[dict], notes: dict[str, str]) -> list[str]:
    """The summary.md section for the evaluation ([] when nothing was evaluated)."""
    lines = []
    loss, passkey = loss_table(records), passkey_table(records)
    if loss:
        lines += ["", "## Loss by position (held-out, mean per position bucket)", "", *loss,
                  "", f"plot: {notes.get(LOSS_PLOT, 'not written')}"]
    if passkey:
        lines += ["", "## Passkey retrieval accuracy", "", *passkey, "",
                  f"plot: {notes.get(PASSKEY_PLOT, 'not written')}"]
    return lines


def loss_figure(records: list[dict], title: str = ""):
    """One curve per evaluated length: mean loss against position (log axis, bucket middle)."""
    from matplotlib.figure import Figure

    rows = _latest(records, "loss_by_position")
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for n in sorted({r["length"] for r in rows}):
        mine = sorted((r for r in rows if r["length"] == n and math.isfinite(r["loss"])),
                      key=lambda r: r["start"])
        xs = [max(0.5, (r["start"] + r["end"] - 1) / 2) for r in mine]
        ax.plot(xs, [r["loss"] for r in mine], marker="o", markersize=3, label=f"N = {n}")
    ax.set_xscale("log")
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel("mean next-token loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def passkey_figure(records: list[dict], title: str = ""):
    """Heatmap of accuracy: context length (rows) by depth (columns), 0..1."""
    from matplotlib.figure import Figure

    rows = _latest(records, "passkey")
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = [[math.nan] * len(depths) for _ in lengths]
    for r in rows:
        grid[lengths.index(r["length"])][depths.index(r["depth"])] = r["accuracy"]
    fig = Figure(figsize=(1.2 + 0.8 * len(depths), 1.2 + 0.5 * len(lengths)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("depth of the key")
    ax.set_ylabel("context length")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if math.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.5 else "black")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_plots(out: Path, records: list[dict], title: str = "") -> dict[str, str]:
    """Write the PNGs the records allow; {file name: what happened} for the summary."""
    notes = {}
    todo = [(LOSS_PLOT, "loss_by_position", loss_figure), (PASSKEY_PLOT, "passkey", passkey_figure)]
    for name, metric, figure in todo:
        if not _latest(records, metric):
            continue
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            notes[name] = "skipped (matplotlib is not installed: pip install matplotlib)"
            continue
        figure(records, title).savefig(Path(out) / name, dpi=100)
        notes[name] = name
    return notes
