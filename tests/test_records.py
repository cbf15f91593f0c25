"""The driver's records: the tqdm progress line, evaluation tables and PNGs, TensorBoard."""

from __future__ import annotations

import io

import pytest

from seqshard.launch.records import Recorder, read_records

META = {"name": "t", "task": "train", "workers": 2, "dp": 1, "ulysses": 1, "ring": 2}


def _step(s: int) -> dict:
    return {"type": "step", "step": s, "loss": 2.0 / s, "tokens": 64, "seconds": 0.5,
            "peak_mem_bytes": 2**21, "attempt": 0, "accuracy": 0.5, "lr": 1e-3}


EVALS = (
    [{"type": "eval", "metric": "loss_by_position", "length": n, "bucket": i, "start": s,
      "end": e, "loss": 3.0 - i * 0.25 + n / 1000, "tokens": 4 * (e - s), "step": 3,
      "eval_id": 7} for n in (32, 64) for i, (s, e) in enumerate([(0, 1), (1, 5), (5, n - 1)])]
    + [{"type": "eval", "metric": "passkey", "length": n, "depth": d, "accuracy": a,
        "samples": 4, "digits": 5, "step": 3, "eval_id": 7}
       for n, d, a in ((32, 0.0, 1.0), (32, 1.0, 0.75), (64, 0.0, 0.5), (64, 1.0, 0.25))])


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_is_tqdm_with_an_eta_on_a_terminal_and_in_a_log(tmp_path):
    log = io.StringIO()
    rec = Recorder(tmp_path / "log", META, total_steps=4, stream=log)
    for s in (1, 2):
        rec.add(_step(s))
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[1].startswith("step 2/4 [") and "<" in lines[1]  # elapsed<ETA
    assert lines[1].endswith(", 128 tok/s | loss 1.0000 | mem 2 MiB | attempt 0")
    term = Terminal()
    rec = Recorder(tmp_path / "tty", META, total_steps=4, stream=term)
    for s in (1, 2, 3):
        rec.add(_step(s))
    rec.add({"type": "restart", "attempt": 1, "reason": "rank 1: died"})
    rec.finish({"status": "completed"})
    shown = term.getvalue()
    assert "\r" in shown and "step 3/4" in shown and "loss 0.6667" in shown
    assert "[seqshard] restart: attempt=1, reason=rank 1: died\n" in shown


def test_eval_records_reach_records_summary_and_pngs(tmp_path):
    rec = Recorder(tmp_path, META, total_steps=3, progress=False)
    for s in (1, 2, 3):
        rec.add(_step(s))
    for r in EVALS:
        rec.add(r)
    summary = rec.finish({"status": "completed"}).read_text()
    assert [r for r in read_records(tmp_path) if r["type"] == "eval"] == EVALS
    assert "## Loss by position" in summary and "| positions | N = 32 | N = 64 |" in summary
    assert "| 1-4 | 2.7820 | 2.8140 |" in summary
    assert "## Passkey retrieval accuracy" in summary
    assert "| 64 | 0.50 | 0.25 |" in summary and "| context | depth 0 | depth 1 |" in summary
    assert (tmp_path / "loss_by_position.png").stat().st_size > 0
    assert (tmp_path / "passkey.png").stat().st_size > 0
    # a later evaluation (seqshard eval) replays the run and reports its own numbers
    again = Recorder(tmp_path, META, total_steps=3, progress=False, replay=True)
    again.add({**EVALS[-1], "accuracy": 1.0, "eval_id": 8})
    summary = again.finish({"status": "evaluated"}).read_text()
    assert "loss 2.00000 -> 0.66667" in summary  # the training part is kept
    # only the newest evaluation's numbers (it measured one passkey cell)
    assert "| 64 | 1.00 |" in summary and "Loss by position" not in summary


def test_tensorboard_event_files_beside_the_records(tmp_path):
    from seqshard.launch.records import tensorboard_problem

    if tensorboard_problem():
        with pytest.raises(ValueError, match="pip install tensorboard"):
            Recorder(tmp_path, META, total_steps=1, progress=False, tensorboard=True)
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = Recorder(tmp_path, META, total_steps=2, progress=False, tensorboard=True)
    for r in [_step(1), _step(2), *EVALS]:
        rec.add(r)
    rec.finish({"status": "completed"})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/tokens_per_s", "eval/loss_by_position/N=64",
            "eval/passkey/N=32"} <= set(tags)
    assert [round(e.value, 4) for e in events.Scalars("train/loss")] == [2.0, 1.0]
    assert [e.step for e in events.Scalars("eval/passkey/N=32")] == [0, 100]
