"""The run's loss.png says which run it is and shows the accuracy curve where there is one.

The figure object is inspected (title, lines and their data), not the pixels.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("matplotlib")

from seqshard.launch.records import PLOT, Recorder, loss_figure  # noqa: E402

META = {"name": "demo", "task": "train", "model_kind": "transformer", "workers": 2, "dp": 1,
        "ulysses": 1, "ring": 2, "config": {"train": {"seq_len": 128}}}


def _lines(fig, label):
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == label]


def _recorder(tmp_path, meta, accuracies):
    rec = Recorder(tmp_path, meta, total_steps=len(accuracies), progress=False)
    for step, acc in enumerate(accuracies, 1):
        rec.add({"type": "step", "step": step, "loss": 4.0 / step, "accuracy": acc,
                 "tokens": 256, "seconds": 0.1, "peak_mem_bytes": 0, "attempt": 0})
    return rec


def test_plot_has_the_runs_title_and_its_accuracy_curve(tmp_path):
    rec = _recorder(tmp_path, META, [0.125, 0.25, 0.5])
    fig = rec.figure()
    title = fig.axes[0].get_title()
    for part in ("demo", "transformer", "N = 128", "2 workers"):
        assert part in title, (part, title)
    (loss,) = _lines(fig, "loss")
    assert list(loss.get_xdata()) == [1, 2, 3] and list(loss.get_ydata()) == [4.0, 2.0, 4.0 / 3]
    (acc,) = _lines(fig, "accuracy")
    assert list(acc.get_ydata()) == [0.125, 0.25, 0.5]
    assert acc.axes is not loss.axes  # its own 0..1 axis, not squeezed under the loss scale
    rec.finish({"status": "completed"})
    assert (tmp_path / PLOT).stat().st_size > 0


def test_plot_without_accuracy_has_no_accuracy_line(tmp_path):
    # the probe task reports NaN accuracy (it measures none): no empty second axis either
    probe = {k: v for k, v in META.items() if k != "model_kind"} | {"task": "probe"}
    fig = _recorder(tmp_path, probe, [math.nan, math.nan]).figure()
    assert not _lines(fig, "accuracy") and len(fig.axes) == 1
    assert "probe" in fig.axes[0].get_title()


def test_loss_figure_skips_steps_without_accuracy():
    # an accuracy of NaN on some steps (e.g. not measured then) leaves a gap, not a fake zero
    fig = loss_figure([1, 2, 3], [3.0, 2.0, 1.0], [0.5, math.nan, 0.75], title="t")
    (acc,) = _lines(fig, "accuracy")
    assert list(acc.get_xdata()) == [1, 3] and list(acc.get_ydata()) == [0.5, 0.75]
