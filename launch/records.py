"""The driver's side of metrics: a live progress line, msgpack records, summary.md, loss plot.

records.msgpack is a stream of msgpack maps, appended and flushed as they arrive so a crash
loses nothing already received:

    {"type": "meta",  ...}          the job config, once per driver start
    {"type": "event", "event": ...} worker started, failure noticed, restart, resume, ...
    {"type": "step",  "step", "loss", "tokens", "seconds", "peak_mem_bytes", "attempt", ...}
    {"type": "eval",  "metric", ...} one number of an evaluation (models/evaluate.py)
    {"type": "final", ...}          digest, exactness error, totals

`read_records(path)` gives them back as a list. A step that is re-run after a restart appears
again with a higher attempt; the summary and the plot use the latest attempt of each step.
Evaluation records also get tables in summary.md and PNGs beside it (eval_report.py).

The progress line is tqdm's: a live bar with its ETA on a terminal, one formatted line per step
elsewhere (logs keep no carriage returns). With `tensorboard=True` every step and evaluation
number is also written as TensorBoard scalars (event files beside records.msgpack).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import msgpack
from tqdm import tqdm

from . import eval_report

RECORDS = "records.msgpack"
SUMMARY = "summary.md"
PLOT = "loss.png"


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS
    with open(path, "rb") as f:
        return list(msgpack.Unpacker(f, raw=False, strict_map_key=False))


BAR = "step {n_fmt}/{total_fmt} [{bar:20}] {elapsed}<{remaining}{postfix}"
"""The progress line: steps, bar, elapsed < ETA, then (tqdm's ', ') rate, loss, memory and
attempt."""


def tensorboard_problem() -> str | None:
    """Why TensorBoard event files cannot be written here, or None when they can."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        return (f"log.tensorboard = true needs the tensorboard package ({err}); "
                f"pip install tensorboard, or set log.tensorboard = false")
    return None


def _tensorboard_writer(out: Path):
    problem = tensorboard_problem()
    if problem:
        raise ValueError(problem)
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out))


def _mib(n) -> str:
    return f"{(n or 0) / 2**20:.0f} MiB"


class Recorder:
    """Receives records (from worker actors or, under torchrun, from rank 0 itself)."""

    def __init__(self, out_dir: Path, meta: dict, total_steps: int, *, progress: bool = True,
                 stream=None, tensorboard: bool = False, replay: bool = False):
        """replay: first take the steps and evaluations already in out_dir's records.msgpack
        (`seqshard eval` adds to a finished run, and its summary keeps the training part)."""
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.total = total_steps
        self.show = progress
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.steps: dict[int, dict] = {}
        self.events: list[dict] = []
        self.evals: list[dict] = []
        self.meta = meta
        self.started = time.time()
        if replay and (self.out / RECORDS).exists():
            for record in read_records(self.out):
                if record.get("type") == "step":
                    self.steps[int(record["step"])] = record
                elif record.get("type") == "eval":
                    self.evals.append(record)
        self._tb = _tensorboard_writer(self.out) if tensorboard else None
        self._bar, self._pace = None, None
        if self.show and self.tty and total_steps > len(self.steps):  # something to train
            self._bar = tqdm(total=total_steps, initial=len(self.steps), file=self.stream,
                             bar_format=BAR, dynamic_ncols=True, leave=True)
        self._file = open(self.out / RECORDS, "ab")
        self._write({"type": "meta", "time": self.started, **meta})

    def _write(self, record: dict) -> None:
        self._file.write(msgpack.packb(record, use_bin_type=True))
        self._file.flush()

    # --- incoming --------------------------------------------------------------------------
    def add(self, record: dict) -> None:
        kind = record.get("type")
        if kind == "step":
            record = {**record, "time": time.time()}  # when the driver received it
            self.steps[int(record["step"])] = record
            self._write(record)
            self._progress(record)
            self._scalars(record)
        elif kind == "eval":
            self.evals.append(record)
            self._write(record)
            self._eval_scalar(record)
        else:
            self.event(kind, **{k: v for k, v in record.items() if k != "type"})

    def event(self, event: str, **fields) -> None:
        record = {"type": "event", "event": event, "time": time.time(), **fields}
        self.events.append(record)
        self._write(record)
        if event not in ("worker_started",):
            self._line(f"[seqshard] {event}: " + ", ".join(f"{k}={v}" for k, v in fields.items()),
                       final=True)

    # --- progress line ---------------------------------------------------------------------
    def _line(self, text: str, final: bool = False) -> None:
        if not self.show:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)  # above the live bar, which redraws below
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def _progress(self, r: dict) -> None:
        rate = r["tokens"] / r["seconds"] if r.get("seconds") else float("nan")
        postfix = (f"{rate:,.0f} tok/s | loss {r['loss']:.4f} | mem "
                   f"{_mib(r.get('peak_mem_bytes'))} | attempt {r.get('attempt', 0)}")
        if not self.show:
            return
        if self._bar is not None:
            self._bar.n = min(int(r["step"]), self.total)
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.refresh()
            return
        # no terminal: one plain line per step, formatted (bar and ETA) by tqdm all the same
        now, step = time.time(), int(r["step"])
        if self._pace is None:
            self._pace = (now, step)
        since, first = self._pace
        # the ETA's pace: steps received since the first one (worker start-up excluded), or
        # until there are two, the step's own time
        rate = ((step - first) / (now - since) if step > first and now > since
                else (1.0 / r["seconds"] if r.get("seconds") else None))
        self._line(tqdm.format_meter(min(step, self.total), self.total, now - self.started,
                                     bar_format=BAR, postfix=postfix, rate=rate))

    # --- TensorBoard -----------------------------------------------------------------------
    def _scalars(self, r: dict) -> None:
        if self._tb is None:
            return
        step = int(r["step"])
        for name in ("loss", "accuracy", "lr", "peak_mem_bytes"):
            value = r.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"train/{name}", value, step)
        if r.get("seconds"):
            self._tb.add_scalar("train/tokens_per_s", r["tokens"] / r["seconds"], step)
        self._tb.flush()

    def _eval_scalar(self, r: dict) -> None:
        if self._tb is None:
            return
        if r.get("metric") == "loss_by_position" and math.isfinite(r["loss"]):
            # x = the bucket's last position, so each length's curve reads as loss by position
            self._tb.add_scalar(f"eval/loss_by_position/N={r['length']}", r["loss"], r["end"] - 1)
        elif r.get("metric") == "passkey":
            self._tb.add_scalar(f"eval/passkey/N={r['length']}", r["accuracy"],
                                int(round(100 * r["depth"])))  # x = depth in percent
        self._tb.flush()

    # --- the end ---------------------------------------------------------------------------
    def curve(self) -> tuple[list[int], list[float]]:
        steps = sorted(self.steps)
        return steps, [float(self.steps[s]["loss"]) for s in steps]

    def plot_args(self) -> tuple[list[int], list[float], list, str]:
        """(steps, losses, accuracies, title): what `loss_figure` and `write_plot` take."""
        steps, losses = self.curve()
        return steps, losses, [self.steps[s].get("accuracy") for s in steps], plot_title(self.meta)

    def figure(self):
        """The loss plot as a matplotlib Figure (what finish() saves as loss.png)."""
        return loss_figure(*self.plot_args())

    def finish(self, final: dict) -> Path:
        """Write the final record, summary.md and the loss plot; return the summary's path."""
        final = {"type": "final", "time": time.time(), "wall_s": time.time() - self.started, **final}
        self._write(final)
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        plot_note = write_plot(self.out / PLOT, *self.plot_args())
        eval_notes = eval_report.write_plots(self.out, self.evals, plot_title(self.meta))
        text = self.summary(final, plot_note)
        if self.evals:  # summary_lines opens with a blank line
            text += "\n".join(eval_report.summary_lines(self.evals, eval_notes)) + "\n"
        (self.out / SUMMARY).write_text(text)
        return self.out / SUMMARY

    def summary(self, final: dict, plot_note: str) -> str:
        steps, losses = self.curve()
        recs = [self.steps[s] for s in steps]
        tok = sum(r["tokens"] for r in recs)
        secs = sum(r["seconds"] for r in recs)
        restarts = [e for e in self.events if e["event"] == "restart"]
        m = self.meta
        lines = [
            f"# seqshard run: {m.get('name', 'job')}",
            "",
            f"- task: {m.get('task')}" + (f", model {m['model_kind']}" if m.get("model_kind") else ""),
            f"- mesh: {m.get('workers')} workers = dp {m.get('dp')} x ulysses {m.get('ulysses')}"
            f" x ring {m.get('ring')} ({m.get('backend', '?')})",
            f"- status: **{final.get('status', '?')}** after {final.get('attempts', 1)} attempt(s),"
            f" {len(restarts)} restart(s); wall {final['wall_s']:.1f} s",
            f"- steps: {steps[-1] if steps else 0}/{self.total}"
            + (f", loss {losses[0]:.5f} -> {losses[-1]:.5f}" if losses else ""),
            f"- throughput: {tok / secs:,.0f} tokens/s over the steps (time inside step())"
            if secs > 0 else "- throughput: n/a",
            f"- peak memory: {_mib(max((r.get('peak_mem_bytes') or 0) for r in recs))}"
            if recs else "- peak memory: n/a",
        ]
        if final.get("mesh"):
            lines.append(f"- rank 0: {final['mesh']}")
        if final.get("exactness") is not None:
            lines.append(f"- exactness (sharded vs unsharded, N = {final.get('exactness_seq_len')}):"
                         f" max abs diff {final['exactness']:.3g}")
        if final.get("resumed_from"):
            lines.append(f"- resumed from checkpoint step {final['resumed_from']}")
        if final.get("digest"):
            lines.append(f"- final state sha256: `{final['digest'][:16]}...`")
        if final.get("error"):
            lines.append(f"- error: {final['error']}")
        for e in restarts:
            lines.append(f"- restart {e.get('attempt')}: {e.get('reason', '')}")
        lines.append(f"- plot: {plot_note}")
        if recs:
            # accuracy only where the task measures one (the recall task does, the probe not)
            acc = any(_measured(r.get("accuracy")) for r in recs)
            head = "| step | loss |" + (" accuracy |" if acc else "") + " tokens/s | peak mem | attempt |"
            lines += ["", head, "|" + "---:|" * (head.count("|") - 1)]
            stride = max(1, math.ceil(len(recs) / 20))
            for r in recs[::stride] + ([recs[-1]] if (len(recs) - 1) % stride else []):
                rate = r["tokens"] / r["seconds"] if r["seconds"] else float("nan")
                lines.append(f"| {r['step']} | {r['loss']:.5f} |"
                             + (f" {r.get('accuracy', float('nan')):.3f} |" if acc else "")
                             + f" {rate:,.0f} | {_mib(r.get('peak_mem_bytes'))} |"
                             f" {r.get('attempt', 0)} |")
        return "\n".join(lines) + "\n"


def _measured(value) -> bool:
    """An accuracy that was measured: a finite number (tasks without one report NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_title(meta: dict) -> str:
    """'<job name>: <model kind or task>, N = <seq_len>, <workers> workers'; what the meta
    does not hold is left out (seq_len comes from the train config, when it names one)."""
    seq_len = ((meta.get("config") or {}).get("train") or {}).get("seq_len")
    parts = [meta.get("model_kind") or meta.get("task"),
             f"N = {seq_len}" if seq_len else None,
             f"{meta['workers']} workers" if meta.get("workers") else None]
    return f"{meta.get('name', 'job')}: " + ", ".join(p for p in parts if p)


def loss_figure(steps: list[int], losses: list[float], accuracies: list | None = None,
                title: str = ""):
    """Loss per step and, on a second y axis (0..1), accuracy at the steps that measured one.

    Built on a bare matplotlib Figure, not pyplot, so no global figure or backend state is
    touched (the driver may run inside an interactive session).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(steps, losses, marker="o", markersize=3, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    measured = [(s, a) for s, a in zip(steps, accuracies or []) if _measured(a)]
    if measured:
        acc_ax = ax.twinx()
        acc_steps, acc_values = zip(*measured)
        acc_ax.plot(acc_steps, acc_values, color="tab:orange", marker="s", markersize=3,
                    label="accuracy")
        acc_ax.set_ylim(0.0, 1.0)
        # each axis label in its line's colour says which curve it measures (a legend would
        # sit on one of the curves somewhere along the run)
        for axis, line in ((ax, ax.get_lines()[0]), (acc_ax, acc_ax.get_lines()[0])):
            axis.set_ylabel(line.get_label(), color=line.get_color())
    fig.tight_layout()
    return fig


def write_plot(path: Path, steps: list[int], losses: list[float], accuracies: list | None = None,
               title: str = "") -> str:
    """Save `loss_figure` as a PNG; without matplotlib, say so and skip."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "skipped (matplotlib is not installed: pip install matplotlib)"
    if not steps:
        return "skipped (no steps)"
    loss_figure(steps, losses, accuracies, title).savefig(path, dpi=100)
    return str(path.name)
